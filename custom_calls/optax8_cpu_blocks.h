// The CPU kernel's block walk, compiled once per instruction set (optax8_cpu_<isa>.cc): per
// block of the last axis, decode the moments, GuardedStep of the family's float32 math
// (optax8_math.h), take the new absmax and re-encode, the re-encoding interleaved with the next
// block's step and the memory a little ahead prefetched. S is the set's vector operations
// (optax8_avx2.h's Avx2, optax8_avx512.h's Avx512) or NoVectors; the elements past the last
// whole vector, and every element under NoVectors, take the scalar path, with the same bits.
//
// Free of the standard library's templates (the units' copies would be merged at link time);
// the calling unit passes in the scratch memory.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_CPU_BLOCKS_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_CPU_BLOCKS_H_

#include <cstdint>
#include <cstring>
#include <utility>

#include "optax8_job.h"
#include "optax8_math.h"

// No iteration of the loop that follows reads what another one writes (an output may be an
// input itself, element for element). Saying so spares the compiler's run-time alias checks,
// which it gives up on past a handful of pointers.
#if defined(__clang__)
#define OPTAX8_NO_ALIAS_IN_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define OPTAX8_NO_ALIAS_IN_LOOP _Pragma("GCC ivdep")
#else
#define OPTAX8_NO_ALIAS_IN_LOOP
#endif

namespace optax8 {
OPTAX8_ISA_NAMESPACE_BEGIN

// The scalar path only.
struct NoVectors {
  static constexpr int64_t kLanes = 0;
};

// bfloat16 and float16 conversions, exact and rounding to nearest even like XLA's.
OPTAX8_HD float Bf16ToFloat(uint16_t h) { return BitsToFloat(static_cast<uint32_t>(h) << 16); }

OPTAX8_HD uint16_t FloatToBf16(float f) {
  const uint32_t bits = FloatToBits(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

OPTAX8_HD float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, a normal float32
    return BitsToFloat(FloatToBits(static_cast<float>(mantissa) * 0x1p-24f) | sign);
  }
  const uint32_t rebiased = exponent == 0x1Fu ? 0xFFu : exponent + 112;  // inf / NaN stay so
  return BitsToFloat(sign | (rebiased << 23) | (mantissa << 13));
}

OPTAX8_HD uint16_t FloatToHalf(float f) {
  const uint32_t bits = FloatToBits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  uint32_t h;
  if (a > 0x7F800000u) {
    h = 0x7E00u | ((a >> 13) & 0x3FFu);  // quiet NaN
  } else if (a >= 0x477FF000u) {
    h = 0x7C00u;  // rounds to infinity
  } else if (a >= 0x38800000u) {  // normal half
    const uint32_t r = a - 0x38000000u;
    h = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  } else if (a >= 0x33000000u) {  // subnormal half: round mantissa * 2^(e - 126) to an integer
    const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - (a >> 23);
    const uint32_t half = 1u << (shift - 1);
    const uint32_t rest = mantissa & ((half << 1) - 1);
    h = mantissa >> shift;
    h += (rest > half || (rest == half && (h & 1u))) ? 1u : 0u;
  } else {
    h = 0;
  }
  return static_cast<uint16_t>(sign | h);
}

OPTAX8_HD const float* GradientAsFloat(const Job& job, int64_t offset, int64_t n, float* out) {
  switch (job.dtype) {
    case ElementType::kBF16: {
      const uint16_t* g = static_cast<const uint16_t*>(job.g) + offset;
      for (int64_t j = 0; j < n; ++j) out[j] = Bf16ToFloat(g[j]);
      return out;
    }
    case ElementType::kF16: {
      const uint16_t* g = static_cast<const uint16_t*>(job.g) + offset;
      for (int64_t j = 0; j < n; ++j) out[j] = HalfToFloat(g[j]);
      return out;
    }
    default:
      return static_cast<const float*>(job.g) + offset;
  }
}

// Where the block's float32 update goes: the result itself, or scratch for 16-bit results.
OPTAX8_HD float* UpdateAsFloat(const Job& job, int64_t offset, float* scratch) {
  return job.dtype == ElementType::kF32 ? static_cast<float*>(job.update) + offset : scratch;
}

OPTAX8_HD void StoreHalfUpdate(const Job& job, int64_t offset, int64_t n, const float* u) {
  uint16_t* out = static_cast<uint16_t*>(job.update) + offset;
  if (job.dtype == ElementType::kBF16) {
    for (int64_t j = 0; j < n; ++j) out[j] = FloatToBf16(u[j]);
  } else if (job.dtype == ElementType::kF16) {
    for (int64_t j = 0; j < n; ++j) out[j] = FloatToHalf(u[j]);
  }
}

static_assert(sizeof(ApplyScalars) == kApplyScalars * sizeof(float), "Job's hp layout");

// The gradient clipped as ClipGradient says, into out where it clips. Returns the gradient to use.
OPTAX8_HD const float* ClippedGradient(const float* g, int64_t n, const ApplyScalars& a, float* out) {
  if (!a.Clips()) return g;
  OPTAX8_NO_ALIAS_IN_LOOP
  for (int64_t j = 0; j < n; ++j) out[j] = ClipGradient(g[j], a);
  return out;
}

// The fused apply step's new parameter (AppliedParameter of the float32 update u), stored in
// place of the update.
template <class Load, class Store>
OPTAX8_HD void ApplyLoop(int64_t n, const float* u, const ApplyScalars& a, Load load, Store store) {
  OPTAX8_NO_ALIAS_IN_LOOP
  for (int64_t j = 0; j < n; ++j) store(j, AppliedParameter(load(j), u[j], a));
}

OPTAX8_HD void StoreParameter(const Job& job, int64_t offset, int64_t n, const float* u, const ApplyScalars& a) {
  if (job.param_dtype == ElementType::kF32) {
    const float* p = static_cast<const float*>(job.param) + offset;
    float* out = static_cast<float*>(job.update) + offset;
    ApplyLoop(n, u, a, [&](int64_t j) { return p[j]; }, [&](int64_t j, float x) { out[j] = x; });
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(job.param) + offset;
  uint16_t* out = static_cast<uint16_t*>(job.update) + offset;
  if (job.param_dtype == ElementType::kBF16) {
    ApplyLoop(n, u, a, [&](int64_t j) { return Bf16ToFloat(p[j]); },
              [&](int64_t j, float x) { out[j] = FloatToBf16(x); });
  } else {
    ApplyLoop(n, u, a, [&](int64_t j) { return HalfToFloat(p[j]); },
              [&](int64_t j, float x) { out[j] = FloatToHalf(x); });
  }
}

// codes[j] = Encode<kSigned>(values[j] * scale) for begin <= j < n.
template <class S, bool kSigned>
OPTAX8_HD void EncodeBlock(const float* __restrict__ values, float scale, int64_t begin, int64_t n,
                           uint8_t* __restrict__ codes) {
  int64_t j = begin;
  if constexpr (S::kLanes > 0) {
    for (; j + S::kLanes <= n; j += S::kLanes) {
      S::template Encode<kSigned>(S::Load(values + j) * typename S::Vec(scale), codes + j);
    }
  }
  for (; j < n; ++j) codes[j] = static_cast<uint8_t>(Encode<kSigned>(values[j] * scale));
}

// A block's new moments, waiting to be encoded: the next block's element loop encodes them a
// vector at a time between its own vectors, so that the encoder's table gathers overlap the
// step's divisions and square roots instead of following them.
template <int K>
struct PendingCodes {
  const float* moments[K] = {};
  float scale[K] = {};  // 1 / the moment's new absmax
  uint8_t* codes[K] = {};
  int64_t n = 0;     // elements; 0 when nothing waits
  int64_t done = 0;  // elements encoded so far
};

// Encodes what is left of `pending`.
template <class S, class F, size_t... k>
OPTAX8_HD void FinishCodes(std::index_sequence<k...>, PendingCodes<F::kMoments>& pending) {
  (EncodeBlock<S, F::kSigned[k]>(pending.moments[k], pending.scale[k], pending.done, pending.n, pending.codes[k]),
   ...);
  pending.n = pending.done = 0;
}

// Asks for the cache lines of the gradient, parameter and the K moments' codes at flat elements
// [offset, offset + n), ahead of their use: with this many streams in flight, the hardware
// prefetchers alone leave the block walk waiting on memory.
template <int K>
OPTAX8_HD void PrefetchElements(const Job& job, int64_t offset, int64_t n) {
  constexpr int64_t kLine = 64;
  const int64_t width = job.dtype == ElementType::kF32 ? 4 : 2;
  const char* g = static_cast<const char*>(job.g) + offset * width;
  for (int64_t b = 0; b < n * width; b += kLine) __builtin_prefetch(g + b, 1, 3);
  if (job.param != nullptr) {
    const int64_t param_width = job.param_dtype == ElementType::kF32 ? 4 : 2;
    const char* p = static_cast<const char*>(job.param) + offset * param_width;
    for (int64_t b = 0; b < n * param_width; b += kLine) __builtin_prefetch(p + b, 1, 3);
  }
  for (int k = 0; k < K; ++k) {
    for (int64_t b = 0; b < n; b += kLine) __builtin_prefetch(job.moments[k].codes + offset + b, 1, 3);
  }
}

// One block's elementwise pass: decode, GuardedStep, and the new moments' peak claim, with the
// moments unrolled at compile time (index sequence k...) so that the loops vectorize; between
// vectors, the previous block's `pending` codes. Returns whether the block's state changes
// (under kSkipZeros: some gradient element is not zero).
template <class S, class F, int kFlags, size_t... k>
OPTAX8_HD bool UpdateElements(std::index_sequence<k...>, int64_t n, const float* g,
                              const uint8_t* const (&codes)[F::kMoments], const float (&absmax)[F::kMoments],
                              const typename F::Consts& consts, float* u, float* const (&moments)[F::kMoments],
                              uint32_t (&peak)[F::kMoments], PendingCodes<F::kMoments>& pending) {
  // Local copies, so that the compiler keeps them in registers.
  const uint8_t* __restrict__ const in[F::kMoments] = {codes[k]...};
  float* __restrict__ const out[F::kMoments] = {moments[k]...};
  const float scale[F::kMoments] = {absmax[k]...};
  uint32_t top[F::kMoments] = {};
  bool touched = false;
  int64_t j = 0;
  if constexpr (S::kLanes > 0) {
    using V = typename S::Vec;
    const int64_t vector_end = n - n % S::kLanes;
    // The map entries first, into the moments' scratch (each element is read before written).
    (S::template LookupMap<F::kSigned[k]>(in[k], vector_end, out[k]), ...);
    typename S::Peak vector_top[F::kMoments] = {(static_cast<void>(k), S::NoPeak())...};
    typename S::Mask vector_touched = S::NoLanes();
    const int64_t pending_end = pending.n - pending.n % S::kLanes;
    for (; j < vector_end; j += S::kLanes) {
      if (j < pending_end) {
        ((S::template Encode<F::kSigned[k]>(S::Load(pending.moments[k] + j) * V(pending.scale[k]),
                                            pending.codes[k] + j)),
         ...);
        pending.done = j + S::kLanes;
      }
      V m[F::kMoments] = {S::Load(out[k] + j) * V(scale[k])...};  // decode
      S::Store(u + j, GuardedStep<F, kFlags>(S::Load(g + j), m, consts, vector_touched));
      ((S::Store(out[k] + j, m[k])), ...);
      ((vector_top[k] = S::template RaisePeak<F::kSigned[k]>(vector_top[k], m[k])), ...);
    }
    ((top[k] = S::PeakOf(vector_top[k])), ...);
    touched = S::Any(vector_touched);
  }
  OPTAX8_NO_ALIAS_IN_LOOP
  for (; j < n; ++j) {
    float m[F::kMoments] = {Decode<F::kSigned[k]>(in[k][j], scale[k])...};
    u[j] = GuardedStep<F, kFlags>(g[j], m, consts, touched);
    ((out[k][j] = m[k]), ...);
    ((top[k] = top[k] > ClaimBits<F::kSigned[k]>(m[k]) ? top[k] : ClaimBits<F::kSigned[k]>(m[k])), ...);
  }
  ((peak[k] = top[k]), ...);
  return (kFlags & kSkipZeros) == 0 || touched;
}

// Where a block (a flat index over rows x row_blocks) lies: its row, its first flat element and
// its length.
struct BlockSpan {
  int64_t row, offset, n;
};

OPTAX8_HD BlockSpan SpanOf(const Job& job, int64_t block) {
  const int64_t row = block / job.row_blocks;
  const int64_t column = (block - row * job.row_blocks) * job.block_size;
  const int64_t rest = job.row_length - column;
  return {row, row * job.row_length + column, job.block_size < rest ? job.block_size : rest};
}

// Updates blocks [begin, end) (flat indices over rows x row_blocks) with kScratchBlocks blocks
// of scratch.
template <class S, class F, int kFlags>
void UpdateBlocks(const Job& job, int64_t begin, int64_t end, float* scratch) {
  constexpr int K = F::kMoments;
  const int64_t bs = job.block_size;
  float* const g32 = scratch;
  float* const u32 = scratch + bs;
  // Two sets of moment scratch: one block's new moments wait in one while the next block's
  // element loop fills the other.
  float* moment_sets[2][K];
  for (int k = 0; k < K; ++k) {
    moment_sets[0][k] = scratch + (2 + k) * bs;
    moment_sets[1][k] = scratch + (2 + K + k) * bs;
  }
  PendingCodes<K> pending;
  // Blocks in order cover contiguous flat elements, so the walk prefetches a fixed distance ahead.
  constexpr int64_t kPrefetchAhead = 512;  // elements
  const BlockSpan last = SpanOf(job, end - 1);
  const int64_t walk_end = last.offset + last.n;

  int64_t group = -1;
  typename F::Consts consts{};
  ApplyScalars apply{};
  for (int64_t block = begin; block < end; ++block) {
    const auto [row, offset, n] = SpanOf(job, block);
    if (row / job.rows_per_group != group) {
      group = row / job.rows_per_group;
      const float* hp = job.hp + group * job.hp_stride;
      consts = F::Prepare(hp);
      if (job.param != nullptr) apply = ApplyScalars::Of(hp + F::kNumScalars);
    }
    const int64_t ahead = offset + kPrefetchAhead;
    if (ahead < walk_end) PrefetchElements<K>(job, ahead, n < walk_end - ahead ? n : walk_end - ahead);
    const uint8_t* codes[K];
    float absmax[K];
    uint32_t peak[K];
    for (int k = 0; k < K; ++k) {
      codes[k] = job.moments[k].codes + offset;
      absmax[k] = job.moments[k].absmax[block];
      peak[k] = 0;
    }
    // In place when the update aliases the gradient: each element is read before it is written.
    // The fused apply step keeps the update in scratch and stores the parameter instead.
    const float* g = GradientAsFloat(job, offset, n, g32);
    if (job.param != nullptr) g = ClippedGradient(g, n, apply, g32);
    float* u = job.param != nullptr ? u32 : UpdateAsFloat(job, offset, u32);
    float* const(&moments)[K] = moment_sets[block & 1];
    const bool touched = UpdateElements<S, F, kFlags>(std::make_index_sequence<K>(), n, g, codes, absmax, consts, u,
                                                      moments, peak, pending);
    FinishCodes<S, F>(std::make_index_sequence<K>(), pending);
    if (job.param != nullptr) {
      StoreParameter(job, offset, n, u32, apply);
    } else {
      StoreHalfUpdate(job, offset, n, u32);
    }
    for (int k = 0; k < K; ++k) {
      uint8_t* new_codes = job.moments[k].new_codes + offset;
      if (!touched) {  // skip_zeros, and the block's gradient is zero throughout: its state stays
        job.moments[k].new_absmax[block] = absmax[k];
        if (new_codes != codes[k]) std::memcpy(new_codes, codes[k], static_cast<size_t>(n));
        continue;
      }
      const float new_absmax = AbsmaxOfPeak(peak[k]);
      job.moments[k].new_absmax[block] = new_absmax;
      // As quantize_blockwise: times 1 / absmax, with 1 for an all-zero block.
      pending.scale[k] = 1.0f / (new_absmax == 0.0f ? 1.0f : new_absmax);
      pending.moments[k] = moments[k];
      pending.codes[k] = new_codes;
      pending.n = n;
    }
  }
  FinishCodes<S, F>(std::make_index_sequence<K>(), pending);
}

// Updates blocks [begin, end) of job with the vector operations S; false for a family or flags
// this build does not know.
template <class S>
bool RunBlocks(const Job& job, int64_t begin, int64_t end, float* scratch) {
  bool ran = false;
  VisitFamily(job.family, [&](auto family) {
    using F = decltype(family);
    ran = VisitFlags<F>(job.flags, [&](auto flags) {
      UpdateBlocks<S, F, decltype(flags)::value>(job, begin, end, scratch);
    });
  });
  return ran;
}

OPTAX8_ISA_NAMESPACE_END
}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_CPU_BLOCKS_H_
