// The CUDA kernel's device code (optax8_cuda.cu launches it): for each quantization block,
// decode the moments, run the family's float32 math (optax8_math.h, compiled here for the
// device), take the new absmax and re-encode. Apart from the CUDA headers it needs only the
// kernels' shared headers, so that benchmarks/cuda_sass.py compiles it alone and
// custom_calls/tests/cuda_kernel_emulation_test.cc runs it on the host.
//
// One warp updates one quantization block, holding up to kChunk of its elements in registers:
// every load of a chunk is issued before the first use, then the block's peak claim is a
// warp reduction and the lanes encode and store. A whole, aligned 256-element block (the
// default, in rows whose length is a multiple of 8) gives each lane 8 contiguous elements,
// loaded and stored as 16- and 8-byte vectors; other blocks take lanes strided by the warp. A
// block longer than kChunk is stepped twice: once for its peak, once more to store it (the same
// arithmetic gives the same values). A
// persistent grid of thread blocks walks the quantization blocks, each thread block copying the
// code tables into its shared memory once. Everything runs on XLA's stream: no allocation, no
// synchronisation, no host copy (hp is read on the device), and the launch depends only on the
// shapes and attributes, so the call may be captured into a CUDA graph.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_CUDA_KERNEL_CUH_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_CUDA_KERNEL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "optax8_job.h"
#include "optax8_math.h"

namespace optax8 {
namespace {

constexpr int kWarp = 32;
// Elements a lane holds per chunk; kChunk = 256, the default block size, is one chunk.
constexpr int kItems = 8;
constexpr int kChunk = kWarp * kItems;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

// Bit k: moment k of family F uses the signed map (a constant that device code can read).
template <class F>
inline constexpr uint32_t kSignedMaskOf = SignedMaskOf<F>();

// The shared-memory tables a family's kernel reads: all of them, or the signed ones (laid out
// first) when no moment uses the unsigned map.
template <class F>
inline constexpr size_t kSharedTableBytes =
    kSignedMaskOf<F> == (1u << F::kMoments) - 1 ? offsetof(DeviceTables, unsigned_encode) : sizeof(DeviceTables);
static_assert(sizeof(DeviceTables) % 4 == 0 && offsetof(DeviceTables, unsigned_encode) % 4 == 0,
              "the tables are copied in 32-bit words");

// The gradient's dtype to float32 and back: exact, and rounding to nearest even.
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T FromFloat(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return x;
  }
}

template <class F>
__device__ __forceinline__ float DecodeMoment(int k, uint32_t code, float absmax) {
  return (kSignedMaskOf<F> >> k) & 1u ? Decode<true>(code, absmax) : Decode<false>(code, absmax);
}

// The new moments of a lane's elements of one chunk, element i being ItemIndex<kContiguous>(lane, i).
template <int K>
struct Chunk {
  float moments[K][kItems];
};

// Where a lane's kItems elements of a chunk lie: contiguous (lane * kItems + i, so that they load
// and store as 16- and 8-byte vectors: the block is one whole chunk, aligned so), or strided
// (lane + kWarp * i, for blocks of any length). The per-element arithmetic is the same.
template <bool kContiguous>
__device__ __forceinline__ int ItemIndex(int lane, int i) {
  return kContiguous ? lane * kItems + i : lane + kWarp * i;
}

// kItems contiguous elements of T (16-byte aligned) as floats, and back.
template <class T>
__device__ __forceinline__ void LoadItems(const T* p, float (&x)[kItems]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  } else {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < kItems; ++i) x[i] = ToFloat(h[i]);
  }
}

template <class T>
__device__ __forceinline__ void StoreItems(T* p, const float (&x)[kItems]) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    uint4 w;
    T* h = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int i = 0; i < kItems; ++i) h[i] = FromFloat<T>(x[i]);
    *reinterpret_cast<uint4*>(p) = w;
  }
}

// Steps the lane's elements of [start, start + n), n <= kChunk, with GuardedStep (as the CPU
// kernel); elements whose gradient is not zero set `touched`. Stores the update when kStore (it
// needs no absmax, so it leaves the registers at once). Elements at or past n compute on zeros
// and are never stored (kContiguous: n is kChunk).
// Under the fused apply step (kApply in kFlags: job.param, of type P) the gradient is clipped
// first and the new parameter stored in place of the update. A template flag, so that the update's
// kernels carry none of its code.
template <class F, int kFlags, class T, class P, bool kStore, bool kContiguous>
__device__ __forceinline__ void StepChunk(const Job& job, int64_t start, int n, int lane,
                                          const float (&absmax)[F::kMoments], const typename F::Consts& consts,
                                          const ApplyScalars& apply, Chunk<F::kMoments>& out, bool& touched) {
  constexpr int K = F::kMoments;
  constexpr bool kApplies = (kFlags & kApply) != 0;
  using Result = std::conditional_t<kApplies, P, T>;  // the update's type, or the new parameter's
  const T* g = static_cast<const T*>(job.g) + start;
  const P* p = static_cast<const P*>(job.param) + start;
  Result* u = static_cast<Result*>(job.update) + start;
  const bool clips = kApplies && apply.Clips();  // the same for the whole grid
  float grad[kItems];
  float param[kItems];
  uint32_t codes[K][kItems];
  // Every load first, so that all of them are in flight together.
  if constexpr (kContiguous) {
    LoadItems(g + lane * kItems, grad);
    if constexpr (kApplies && kStore) LoadItems(p + lane * kItems, param);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint2 w = *reinterpret_cast<const uint2*>(job.moments[k].codes + start + lane * kItems);
#pragma unroll
      for (int i = 0; i < kItems; ++i) codes[k][i] = __byte_perm(i < 4 ? w.x : w.y, 0, 0x4440 | (i % 4));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = ItemIndex<false>(lane, i);
      const bool valid = j < n;
      grad[i] = valid ? ToFloat(g[j]) : 0.0f;
#pragma unroll
      for (int k = 0; k < K; ++k) codes[k][i] = valid ? job.moments[k].codes[start + j] : 0u;
    }
  }
  float update[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (!kContiguous && i * kWarp >= n) break;  // the same for the whole warp
    float m[K];
#pragma unroll
    for (int k = 0; k < K; ++k) m[k] = DecodeMoment<F>(k, codes[k][i], absmax[k]);
    update[i] = GuardedStep<F, kFlags>(clips ? ClipGradient(grad[i], apply) : grad[i], m, consts, touched);
#pragma unroll
    for (int k = 0; k < K; ++k) out.moments[k][i] = m[k];
    if constexpr (!kContiguous && kStore) {
      // In place when the update aliases the gradient: every element was read above; the
      // parameter's element is read just before its new value overwrites it.
      const int j = ItemIndex<false>(lane, i);
      if (j < n) u[j] = FromFloat<Result>(kApplies ? AppliedParameter(ToFloat(p[j]), update[i], apply) : update[i]);
    }
  }
  if constexpr (kContiguous && kStore) {
    if constexpr (kApplies) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) update[i] = AppliedParameter(param[i], update[i], apply);
    }
    StoreItems(u + lane * kItems, update);
  }
}

// A block's peak claims (ClaimBits) as floats: per signed moment the largest value and the
// smallest (whose magnitude, stretched, is the negatives' claim), per unsigned moment the
// largest magnitude. Monotone rounding makes the stretch of the smallest the largest stretched
// claim, and for the non-negative finite claims the float order is their bits' order.
template <int K>
struct Peaks {
  float high[K], low[K];
};

template <class F, bool kContiguous>
__device__ __forceinline__ void AccumulatePeak(const Chunk<F::kMoments>& chunk, int n, int lane,
                                               Peaks<F::kMoments>& peaks) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (!kContiguous && ItemIndex<false>(lane, i) >= n) break;
#pragma unroll
    for (int k = 0; k < F::kMoments; ++k) {
      const float x = chunk.moments[k][i];
      if ((kSignedMaskOf<F> >> k) & 1u) {
        peaks.high[k] = fmaxf(peaks.high[k], x);
        peaks.low[k] = fminf(peaks.low[k], x);
      } else {
        peaks.high[k] = fmaxf(peaks.high[k], fabsf(x));
      }
    }
  }
}

// The block's peak claim bits per moment, over the warp.
template <class F>
__device__ __forceinline__ void WarpPeak(const Peaks<F::kMoments>& peaks, uint32_t (&peak)[F::kMoments]) {
#pragma unroll
  for (int k = 0; k < F::kMoments; ++k) {
    float claim = fabsf(peaks.high[k]);
    if ((kSignedMaskOf<F> >> k) & 1u) claim = fmaxf(claim, fabsf(peaks.low[k]) * kNegativeStretch);
    peak[k] = __reduce_max_sync(0xFFFFFFFFu, __float_as_uint(claim));
  }
}

// Copies the codes of the lane's elements below n where the update does not run in place.
template <int K>
__device__ __forceinline__ void KeepCodes(const Job& job, int64_t start, int n, int lane) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (job.moments[k].new_codes == job.moments[k].codes) continue;
    for (int j = lane; j < n; j += kWarp) job.moments[k].new_codes[start + j] = job.moments[k].codes[start + j];
  }
}

// As quantize_blockwise: each moment's codes encode its values times 1 / absmax (times 1 for an
// all-zero block). With several moments, lane k computes moment k's reciprocal and the warp
// shares them, so that the kernel holds one reciprocal's code, not one per moment.
template <int K>
__device__ __forceinline__ void BlockScales(const uint32_t (&peak)[K], int lane, float (&scale)[K]) {
  uint32_t mine = peak[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mine = lane == k ? peak[k] : mine;
  const float absmax = AbsmaxOfPeak(mine);
  const float reciprocal = 1.0f / (absmax == 0.0f ? 1.0f : absmax);
#pragma unroll
  for (int k = 0; k < K; ++k) scale[k] = K == 1 ? reciprocal : __shfl_sync(0xFFFFFFFFu, reciprocal, k);
}

// Stores the new codes of the lane's elements below n, given the block's peaks: contiguous ones
// as one 8-byte word per moment, packed from EncodeSum's top bytes.
template <class F, bool kContiguous>
__device__ __forceinline__ void StoreCodes(const Job& job, int64_t start, int n, int lane,
                                           const Chunk<F::kMoments>& chunk, const uint32_t (&peak)[F::kMoments]) {
  constexpr int K = F::kMoments;
  float scale[K];
  BlockScales(peak, lane, scale);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    uint32_t sum[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (!kContiguous && i * kWarp >= n) break;  // the same for the whole warp; the stores check j < n
      const float x = chunk.moments[k][i] * scale[k];
      sum[i] = (kSignedMaskOf<F> >> k) & 1u ? EncodeSum<true>(x, EncodeTableFor<true>())
                                             : EncodeSum<false>(x, EncodeTableFor<false>());
    }
    uint8_t* codes = job.moments[k].new_codes + start;
    if constexpr (kContiguous) {
      // Byte 3 of each sum, four to a word.
      const uint32_t low = __byte_perm(__byte_perm(sum[0], sum[1], 0x7373), __byte_perm(sum[2], sum[3], 0x7373), 0x5410);
      const uint32_t high = __byte_perm(__byte_perm(sum[4], sum[5], 0x7373), __byte_perm(sum[6], sum[7], 0x7373), 0x5410);
      *reinterpret_cast<uint2*>(codes + lane * kItems) = make_uint2(low, high);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int j = ItemIndex<false>(lane, i);
        if (i * kWarp >= n) break;
        if (j < n) codes[j] = static_cast<uint8_t>(sum[i] >> 24);
      }
    }
  }
}

// Updates the quantization block `block`: its n elements start at `offset` (kContiguous: n is
// kChunk, and offset a multiple of kItems).
template <class F, int kFlags, class T, class P, bool kContiguous>
__device__ __forceinline__ void UpdateBlock(const Job& job, int64_t block, int64_t offset, int64_t n, int lane,
                                            const typename F::Consts& consts, const ApplyScalars& apply) {
  constexpr int K = F::kMoments;
  float absmax[K];
  Peaks<K> peaks;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    absmax[k] = job.moments[k].absmax[block];
    peaks.high[k] = peaks.low[k] = 0.0f;
  }
  uint32_t peak[K];
  Chunk<K> chunk;
  // Whether the block's state changes: under kSkipZeros, only where a gradient element is not zero.
  constexpr bool kSkip = (kFlags & kSkipZeros) != 0;
  bool touched = false;
  bool block_touched = !kSkip;
  if (!kContiguous && n > kChunk) {
    // Longer than a chunk: the peak first, then each chunk again to store it.
    for (int64_t base = 0; base < n; base += kChunk) {
      const int m = static_cast<int>(min(static_cast<int64_t>(kChunk), n - base));
      StepChunk<F, kFlags, T, P, false, false>(job, offset + base, m, lane, absmax, consts, apply, chunk, touched);
      AccumulatePeak<F, false>(chunk, m, lane, peaks);
    }
    WarpPeak<F>(peaks, peak);
    if (kSkip) block_touched = __any_sync(0xFFFFFFFFu, touched);
  }
  for (int64_t base = 0; base < n; base += kChunk) {
    const int m = static_cast<int>(min(static_cast<int64_t>(kChunk), n - base));
    StepChunk<F, kFlags, T, P, true, kContiguous>(job, offset + base, m, lane, absmax, consts, apply, chunk, touched);
    if (kContiguous || n <= kChunk) {
      AccumulatePeak<F, kContiguous>(chunk, m, lane, peaks);
      WarpPeak<F>(peaks, peak);
      if (kSkip) block_touched = __any_sync(0xFFFFFFFFu, touched);
    }
    if (block_touched) {
      StoreCodes<F, kContiguous>(job, offset + base, m, lane, chunk, peak);
    } else {
      KeepCodes<K>(job, offset + base, m, lane);
    }
  }
  // The new absmax may overwrite the old one in place: every lane has read it by now.
  __syncwarp();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) job.moments[k].new_absmax[block] = block_touched ? AbsmaxOfPeak(peak[k]) : absmax[k];
  }
}

// Copies the code tables into the thread block's shared memory (before any Encode or Decode).
template <class F>
__device__ __forceinline__ void LoadSharedTables() {
  const uint32_t* from = reinterpret_cast<const uint32_t*>(&kDeviceTables);
  uint32_t* to = reinterpret_cast<uint32_t*>(kSharedTables);
  for (int w = threadIdx.x; w < static_cast<int>(kSharedTableBytes<F> / 4); w += kThreads) to[w] = from[w];
  __syncthreads();
}

// What the block walk needs beyond the Job, from the host: the divisions by per-call constants
// as multiplications, and whether every buffer is aligned for the contiguous path.
struct Walk {
  Divisor by_row_blocks, by_rows_per_group;
  bool aligned;
};

// What a hyperparameter group's blocks share: the family's constants and the apply step's
// scalars.
template <class F>
struct Group {
  typename F::Consts consts;
  ApplyScalars apply;
};

// Group `group`'s. Out of line: the walk changes group rarely (once per warp where all rows
// share one hp vector), and the reciprocals' slow paths stay out of the blocks' code.
template <class F, int kFlags>
__device__ __noinline__ Group<F> PrepareGroup(const Job& job, uint32_t group) {
  const float* hp = job.hp + static_cast<int64_t>(group) * job.hp_stride;
  Group<F> prepared{F::Prepare(hp), {}};
  if constexpr ((kFlags & kApply) != 0) prepared.apply = ApplyScalars::Of(hp + F::kNumScalars);
  return prepared;
}

// Walks each warp's quantization blocks (the grid takes them in turn; no thread block
// synchronises in here) with 32-bit block numbers (the host checks that they fit);
// shape(offset, column) is the length of the block starting at element `offset`, column
// `column`, and whether it takes the contiguous path.
template <class F, int kFlags, class T, class P, class Shape>
__device__ __forceinline__ void WalkBlocks(const Job& job, const Walk& walk, Shape shape) {
  const int lane = threadIdx.x % kWarp;
  const uint32_t warps = gridDim.x * kWarpsPerBlock;
  const uint32_t total = static_cast<uint32_t>(job.total_blocks);
  const uint32_t row_blocks = static_cast<uint32_t>(job.row_blocks);
  uint32_t group = ~0u;
  Group<F> prepared{};
  for (uint32_t block = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; block < total; block += warps) {
    const uint32_t row = walk.by_row_blocks.Divide(block);
    const int64_t column = static_cast<int64_t>(block - row * row_blocks) * job.block_size;
    const uint32_t row_group = walk.by_rows_per_group.Divide(row);
    if (row_group != group) {
      group = row_group;
      prepared = PrepareGroup<F, kFlags>(job, group);
    }
    const int64_t offset = static_cast<int64_t>(row) * job.row_length + column;
    const auto [n, contiguous] = shape(offset, column);
    if (contiguous) {
      UpdateBlock<F, kFlags, T, P, true>(job, block, offset, kChunk, lane, prepared.consts, prepared.apply);
    } else {
      UpdateBlock<F, kFlags, T, P, false>(job, block, offset, n, lane, prepared.consts, prepared.apply);
    }
  }
}

struct BlockShape {
  int64_t length;
  bool contiguous;
};

// Registers bound the thread blocks per multiprocessor (the tables allow 4 on sm_90, 3 on
// sm_80); 3 (2 with three moments) leave enough registers to hold a chunk with little spilling.
template <class F, int kFlags, class T, class P>
__global__ void __launch_bounds__(kThreads, F::kMoments > 2 ? 2 : 3) UpdateKernel(const Job job, const Walk walk) {
  LoadSharedTables<F>();
  WalkBlocks<F, kFlags, T, P>(job, walk, [&](int64_t offset, int64_t column) {
    const int64_t n = min(job.block_size, job.row_length - column);
    return BlockShape{n, walk.aligned && n == kChunk && offset % kItems == 0};
  });
}

// Whether p is a multiple of `bytes` (the null pointer is).
inline bool AlignedTo(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The Walk of a job (host code): the contiguous path loads and stores 16 bytes of gradient,
// update and parameter and 8 bytes of codes at a time.
template <class F>
Walk WalkOf(const Job& job) {
  bool aligned = AlignedTo(job.g, 16) && AlignedTo(job.update, 16) && AlignedTo(job.param, 16);
  for (int k = 0; k < F::kMoments; ++k) {
    aligned = aligned && AlignedTo(job.moments[k].codes, kItems) && AlignedTo(job.moments[k].new_codes, kItems);
  }
  return {Divisor::Of(static_cast<uint32_t>(job.row_blocks)), Divisor::Of(static_cast<uint32_t>(job.rows_per_group)),
          aligned};
}

// Calls visit(F{}, FlagsTag<flags>{}, static_cast<T*>(nullptr), static_cast<P*>(nullptr)) for the
// kernel that runs `job` (host code): its family F, its flags (with kApply under the fused apply
// step), its gradient type T and its parameter type P (T, or float under the fused apply step).
// `job` is a PrepareJob result, so the family, flags and types are known ones.
template <class Visit>
void VisitKernel(const Job& job, Visit&& visit) {
  VisitFamily(job.family, [&](auto family) {
    VisitFlags<decltype(family)>(job.flags, [&](auto flags) {
      constexpr int kFlags = decltype(flags)::value;
      auto with_types = [&](auto all_flags, auto* type) {
        using T = std::remove_pointer_t<decltype(type)>;
        if constexpr ((decltype(all_flags)::value & kApply) != 0 && !std::is_same_v<T, float>) {
          if (job.param_dtype == ElementType::kF32) return visit(family, all_flags, type, static_cast<float*>(nullptr));
        }
        return visit(family, all_flags, type, type);
      };
      auto with_flags = [&](auto all_flags) {
        switch (job.dtype) {
          case ElementType::kBF16: return with_types(all_flags, static_cast<__nv_bfloat16*>(nullptr));
          case ElementType::kF16: return with_types(all_flags, static_cast<__half*>(nullptr));
          default: return with_types(all_flags, static_cast<float*>(nullptr));
        }
      };
      if (job.param != nullptr) {
        with_flags(FlagsTag<kFlags | kApply>{});
      } else {
        with_flags(FlagsTag<kFlags>{});
      }
    });
  });
}

}  // namespace
}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_CUDA_KERNEL_CUH_
