// The fused 8-bit optimizer update for XLA:GPU (CUDA), as one XLA FFI handler.
//
// The operands, results, attributes and their validation are optax8_ffi.h's, shared with the
// CPU kernel (optax8_cpu.cc), and so are the per-block results: for each quantization block,
// decode the moments, run the family's float32 math (optax8_math.h, compiled here for the
// device), take the new absmax and re-encode. The codes and absmax equal the CPU kernel's bit
// for bit, given the same inputs and no subnormal floats (XLA:CPU flushes those to zero,
// XLA:GPU does not).
//
// One warp updates one quantization block, holding up to kChunk of its elements in registers:
// every load of a chunk is issued before the first use, then the block's peak claim is a
// warp reduction and the lanes encode and store. A block longer than kChunk is stepped twice:
// once for its peak, once more to store it (the same arithmetic gives the same values). A
// persistent grid of thread blocks walks the quantization blocks, each thread block copying the
// code tables into its shared memory once. Everything runs on XLA's stream: no allocation, no
// synchronisation, no host copy (hp is read on the device), and the launch depends only on the
// shapes and attributes, so the call may be captured into a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "optax8_ffi.h"
#include "optax8_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

template <class F>
__device__ __forceinline__ uint32_t EncodeMoment(int k, float x) {
  return (kSignedMaskOf<F> >> k) & 1u ? Encode<true>(x) : Encode<false>(x);
}

// The new moments of a lane's elements of one chunk: lane + kWarp * i for i < kItems.
template <int K>
struct Chunk {
  float moments[K][kItems];
};

// Steps the lane's elements of [start, start + n), n <= kChunk, with GuardedStep (as the CPU
// kernel); elements whose gradient is not zero set `touched`. Stores the update when kStore (it
// needs no absmax, so it leaves the registers at once). Elements at or past n compute on zeros
// and are never stored.
// Under the fused apply step (kApply in kFlags: job.param) the gradient is clipped first and the
// new parameter stored in place of the update. A template flag, so that the update's kernels carry
// none of its code.
template <class F, int kFlags, class T, bool kStore>
__device__ __forceinline__ void StepChunk(const Job& job, int64_t start, int n, int lane,
                                          const float (&absmax)[F::kMoments], const typename F::Consts& consts,
                                          const ApplyScalars& apply, Chunk<F::kMoments>& out, bool& touched) {
  constexpr int K = F::kMoments;
  const T* g = static_cast<const T*>(job.g) + start;
  const T* p = static_cast<const T*>(job.param) + start;
  T* u = static_cast<T*>(job.update) + start;
  constexpr bool kApplies = (kFlags & kApply) != 0;
  const bool clips = kApplies && apply.Clips();  // the same for the whole grid
  float grad[kItems];
  uint32_t codes[K][kItems];
  // Every load first, so that all of them are in flight together.
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = i * kWarp + lane;
    const bool valid = j < n;
    grad[i] = valid ? ToFloat(g[j]) : 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) codes[k][i] = valid ? job.moments[k].codes[start + j] : 0u;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (i * kWarp >= n) break;  // the same for the whole warp
    float m[K];
#pragma unroll
    for (int k = 0; k < K; ++k) m[k] = DecodeMoment<F>(k, codes[k][i], absmax[k]);
    const float update = GuardedStep<F, kFlags>(clips ? ClipGradient(grad[i], apply) : grad[i], m, consts, touched);
    // In place when the update aliases the gradient: every element was read above; the
    // parameter's element is read just before its new value overwrites it.
    const int j = i * kWarp + lane;
    if (kStore && j < n) u[j] = FromFloat<T>(kApplies ? AppliedParameter(ToFloat(p[j]), update, apply) : update);
#pragma unroll
    for (int k = 0; k < K; ++k) out.moments[k][i] = m[k];
  }
}

// The running peak claim (ClaimBits) of the lane's elements below n.
template <class F>
__device__ __forceinline__ void AccumulatePeak(const Chunk<F::kMoments>& chunk, int n, int lane,
                                               uint32_t (&peak)[F::kMoments]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (i * kWarp + lane >= n) break;
#pragma unroll
    for (int k = 0; k < F::kMoments; ++k) {
      const float x = chunk.moments[k][i];
      peak[k] = max(peak[k], (kSignedMaskOf<F> >> k) & 1u ? ClaimBits<true>(x) : ClaimBits<false>(x));
    }
  }
}

template <int K>
__device__ __forceinline__ void WarpMax(uint32_t (&peak)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) peak[k] = __reduce_max_sync(0xFFFFFFFFu, peak[k]);
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

// Stores the new codes of the lane's elements below n, given the block's peaks.
template <class F>
__device__ __forceinline__ void StoreCodes(const Job& job, int64_t start, int n, int lane,
                                           const Chunk<F::kMoments>& chunk, const uint32_t (&peak)[F::kMoments]) {
  constexpr int K = F::kMoments;
  float scale[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    // As quantize_blockwise: times 1 / absmax, with 1 for an all-zero block.
    const float absmax = AbsmaxOfPeak(peak[k]);
    scale[k] = 1.0f / (absmax == 0.0f ? 1.0f : absmax);
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = i * kWarp + lane;
    if (j >= n) break;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      job.moments[k].new_codes[start + j] = static_cast<uint8_t>(EncodeMoment<F>(k, chunk.moments[k][i] * scale[k]));
    }
  }
}

// Updates the quantization block `block`: its n elements start at `offset`.
template <class F, int kFlags, class T>
__device__ __forceinline__ void UpdateBlock(const Job& job, int64_t block, int64_t offset, int64_t n, int lane,
                                            const typename F::Consts& consts, const ApplyScalars& apply) {
  constexpr int K = F::kMoments;
  float absmax[K];
  uint32_t peak[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    absmax[k] = job.moments[k].absmax[block];
    peak[k] = 0;
  }
  Chunk<K> chunk;
  // Whether the block's state changes: under kSkipZeros, only where a gradient element is not zero.
  constexpr bool kSkip = (kFlags & kSkipZeros) != 0;
  bool touched = false;
  bool block_touched = !kSkip;
  if (n > kChunk) {
    // Longer than a chunk: the peak first, then each chunk again to store it.
    for (int64_t base = 0; base < n; base += kChunk) {
      const int m = static_cast<int>(min(static_cast<int64_t>(kChunk), n - base));
      StepChunk<F, kFlags, T, false>(job, offset + base, m, lane, absmax, consts, apply, chunk, touched);
      AccumulatePeak<F>(chunk, m, lane, peak);
    }
    WarpMax(peak);
    if (kSkip) block_touched = __any_sync(0xFFFFFFFFu, touched);
  }
  for (int64_t base = 0; base < n; base += kChunk) {
    const int m = static_cast<int>(min(static_cast<int64_t>(kChunk), n - base));
    StepChunk<F, kFlags, T, true>(job, offset + base, m, lane, absmax, consts, apply, chunk, touched);
    if (n <= kChunk) {
      AccumulatePeak<F>(chunk, m, lane, peak);
      WarpMax(peak);
      if (kSkip) block_touched = __any_sync(0xFFFFFFFFu, touched);
    }
    if (block_touched) {
      StoreCodes<F>(job, offset + base, m, lane, chunk, peak);
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

// Walks each warp's quantization blocks (the grid takes them in turn; no thread block
// synchronises in here); block_length(column) is the length of a block starting at `column`.
template <class F, int kFlags, class T, class BlockLength>
__device__ __forceinline__ void WalkBlocks(const Job& job, BlockLength block_length) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  int64_t group = -1;
  typename F::Consts consts{};
  ApplyScalars apply{};
  for (int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       block < job.total_blocks; block += warps) {
    const int64_t row = block / job.row_blocks;
    const int64_t column = (block - row * job.row_blocks) * job.block_size;
    if (row / job.rows_per_group != group) {
      group = row / job.rows_per_group;
      const float* hp = job.hp + group * job.hp_stride;
      consts = F::Prepare(hp);
      if constexpr ((kFlags & kApply) != 0) apply = ApplyScalars::Of(hp + F::kNumScalars);
    }
    UpdateBlock<F, kFlags, T>(job, block, row * job.row_length + column, block_length(column), lane, consts, apply);
  }
}

// Registers bound the thread blocks per multiprocessor (the tables allow 4 on sm_90, 3 on
// sm_80); 3 (2 with three moments) leave enough registers to hold a chunk with little spilling.
template <class F, int kFlags, class T>
__global__ void __launch_bounds__(kThreads, F::kMoments > 2 ? 2 : 3) UpdateKernel(const Job job) {
  LoadSharedTables<F>();
  WalkBlocks<F, kFlags, T>(job, [&](int64_t column) { return min(job.block_size, job.row_length - column); });
}

using LaunchFn = cudaError_t (*)(cudaStream_t, const Job&);

template <class F, int kFlags, class T>
cudaError_t Launch(cudaStream_t stream, const Job& job) {
  constexpr size_t kShared = kSharedTableBytes<F>;
  const auto kernel = &UpdateKernel<F, kFlags, T>;
  int device = 0;
  int processors = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
  // More than 48 KiB of dynamic shared memory takes an opt-in, which is per device.
  if (status == cudaSuccess && kShared > 48 * 1024) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kShared));
  }
  if (status != cudaSuccess) return status;
  // Thread blocks resident per multiprocessor: the persistent grid fills them once.
  static const int resident = [kernel] {
    int blocks = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, kShared) == cudaSuccess
               ? std::max(blocks, 1)
               : 1;
  }();
  const int64_t needed = (job.total_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t grid = std::min<int64_t>(needed, static_cast<int64_t>(resident) * processors);
  kernel<<<static_cast<unsigned>(grid), kThreads, kShared, stream>>>(job);
  return cudaGetLastError();
}

// A family's kernels for one subset of its flags, by gradient dtype.
struct Launchers {
  LaunchFn f32, bf16, f16;
};

template <class F, int kFlags>
inline constexpr Launchers kLaunchers = {&Launch<F, kFlags, float>, &Launch<F, kFlags, __nv_bfloat16>,
                                         &Launch<F, kFlags, __half>};

// Validates the call (optax8_ffi.h, as the CPU handler does), then launches on XLA's stream.
ffi::Error UpdateImpl(cudaStream_t stream, ffi::AnyBuffer g, ffi::Buffer<ffi::F32> hp, ffi::RemainingArgs state,
                      ffi::Result<ffi::AnyBuffer> update, ffi::RemainingRets new_state, std::string_view family,
                      int64_t block_size, int64_t flags, int64_t signed_mask) {
  Job job{};
  ffi::Error checked = PrepareJob(g, hp, state, update, new_state, family, block_size, flags, signed_mask, &job);
  if (checked.failure()) return checked;
  if (job.total_blocks == 0) return ffi::Error::Success();

  const Launchers* launchers = nullptr;
  VisitFamily(job.family, [&](auto family_tag) {
    using F = decltype(family_tag);
    VisitFlags<F>(job.flags, [&](auto flags_tag) {
      constexpr int kFlags = decltype(flags_tag)::value;
      launchers = job.param != nullptr ? &kLaunchers<F, kFlags | kApply> : &kLaunchers<F, kFlags>;
    });
  });
  const LaunchFn launch = job.dtype == GradientType::kBF16  ? launchers->bf16
                          : job.dtype == GradientType::kF16 ? launchers->f16
                                                            : launchers->f32;
  const cudaError_t status = launch(stream, job);
  if (status != cudaSuccess) {
    // The error may also come from earlier asynchronous work on this device.
    return ffi::Error::Internal(std::string("optax8: CUDA kernel launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace optax8

// Exported with default visibility: the library is built with hidden symbols otherwise.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* Optax8CudaUpdate(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optax8CudaUpdate, optax8::UpdateImpl,
                              optax8::BindUpdate<xla::ffi::PlatformStream<cudaStream_t>>());

// The XLA FFI API version this library was compiled against, major * 1000 + minor.
extern "C" __attribute__((visibility("default"))) int Optax8CudaFfiApiVersion() {
  return XLA_FFI_API_MAJOR * 1000 + XLA_FFI_API_MINOR;
}

// The families, scalars and flags this library was built with (optax8_ffi.h's Contract).
extern "C" __attribute__((visibility("default"))) const char* Optax8CudaContract() {
  static const std::string contract = optax8::Contract();
  return contract.c_str();
}
