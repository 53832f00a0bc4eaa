// The fused 8-bit optimizer update for XLA:CPU, as one XLA FFI handler.
//
// One call updates one parameter: it reads the gradient and each moment's codes and absmax
// once, and writes the update and the new codes and absmax once. Per block of the last axis:
// decode the moments, run the family's float32 math (optax8_math.h), take the new absmax,
// re-encode. Blocks are independent, so the work is split into chunks of whole blocks on
// XLA's CPU thread pool and the result does not depend on the number of threads.
//
// Operands, results and attributes are described in optax8_ffi.h. The Python side aliases
// each result to its operand, so the update runs in place. A non-finite gradient element, or a
// moment that overflows, resets that element's moments to 0 and gives it a zero update, as the
// reference does.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "optax8_avx2.h"
#include "optax8_ffi.h"
#include "optax8_math.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OPTAX8_X86 1
#endif

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

namespace ffi = xla::ffi;

namespace optax8 {
namespace {

// About this many elements per task: large enough to amortise scheduling, small enough to
// balance the threads.
constexpr int64_t kChunkElements = 1 << 14;

// XLA:CPU computes with denormals flushed to zero (inputs and results); so does the kernel,
// for the duration of a task, so that it produces the same bits.
class ScopedFlushDenormals {
 public:
  ScopedFlushDenormals() {
#if defined(OPTAX8_X86)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ | DAZ
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ | (uint64_t{1} << 24)));  // FZ
#endif
  }
  ~ScopedFlushDenormals() {
#if defined(OPTAX8_X86)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;

 private:
#if defined(OPTAX8_X86)
  unsigned saved_;
#else
  uint64_t saved_ = 0;
#endif
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

// Per-thread scratch for one block: the f32 gradient, update and moments.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(floats)) buffer.resize(floats);
  return buffer.data();
}

OPTAX8_HD const float* GradientAsFloat(const Job& job, int64_t offset, int64_t n, float* out) {
  switch (job.dtype) {
    case ffi::DataType::BF16: {
      const uint16_t* g = static_cast<const uint16_t*>(job.g) + offset;
      for (int64_t j = 0; j < n; ++j) out[j] = Bf16ToFloat(g[j]);
      return out;
    }
    case ffi::DataType::F16: {
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
  return job.dtype == ffi::DataType::F32 ? static_cast<float*>(job.update) + offset : scratch;
}

OPTAX8_HD void StoreHalfUpdate(const Job& job, int64_t offset, int64_t n, const float* u) {
  uint16_t* out = static_cast<uint16_t*>(job.update) + offset;
  if (job.dtype == ffi::DataType::BF16) {
    for (int64_t j = 0; j < n; ++j) out[j] = FloatToBf16(u[j]);
  } else if (job.dtype == ffi::DataType::F16) {
    for (int64_t j = 0; j < n; ++j) out[j] = FloatToHalf(u[j]);
  }
}

// All ones for a finite x, else 0.
OPTAX8_HD uint32_t FiniteMask(float x) { return (FloatToBits(x) & 0x7F800000u) != 0x7F800000u ? ~0u : 0u; }

// x, or +0 where mask is 0.
OPTAX8_HD float Masked(float x, uint32_t mask) { return BitsToFloat(FloatToBits(x) & mask); }

// codes[j] = Encode<kSigned>(values[j] * scale) for j < n.
template <bool kSigned>
OPTAX8_HD void EncodeBlock(const float* __restrict__ values, float scale, int64_t n, uint8_t* __restrict__ codes) {
  int64_t j = 0;
#if defined(OPTAX8_AVX2)
  for (; j + kLanes <= n; j += kLanes) Encode8<kSigned>(Vec8(_mm256_loadu_ps(values + j)) * Vec8(scale), codes + j);
#endif
  for (; j < n; ++j) codes[j] = static_cast<uint8_t>(Encode<kSigned>(values[j] * scale));
}

// One block's elementwise pass: decode, the family's math, and the new moments' peak |value|,
// with the moments unrolled at compile time (index sequence k...) so that the loop vectorizes.
template <class F, int kFlags, size_t... k>
OPTAX8_HD void UpdateElements(std::index_sequence<k...>, int64_t n, const float* g,
                              const uint8_t* const (&codes)[F::kMoments], const float (&absmax)[F::kMoments],
                              const typename F::Consts& consts, float* u,
                              float* const (&moments)[F::kMoments], uint32_t (&peak)[F::kMoments],
                              bool& touched) {
  constexpr bool kSkip = (kFlags & kSkipZeros) != 0;
  // Local copies, so that the compiler keeps them in registers.
  const uint8_t* __restrict__ const in[F::kMoments] = {codes[k]...};
  float* __restrict__ const out[F::kMoments] = {moments[k]...};
  const float scale[F::kMoments] = {absmax[k]...};
  uint32_t top[F::kMoments] = {};
  int64_t j = 0;
#if defined(OPTAX8_AVX2)
  const int64_t vector_end = n - n % kLanes;
  // The map entries first, into the moments' scratch (each element is read before written).
  (LookupMap<F::kSigned[k]>(in[k], vector_end, out[k]), ...);
  __m256i vector_top[F::kMoments] = {(static_cast<void>(k), _mm256_setzero_si256())...};
  __m256 vector_touched = _mm256_setzero_ps();
  for (; j < vector_end; j += kLanes) {
    const Vec8 gradient = _mm256_loadu_ps(g + j);
    __m256i keep = FiniteMask(gradient);
    Vec8 m[F::kMoments] = {Vec8(_mm256_loadu_ps(out[k] + j)) * Vec8(scale[k])...};  // Decode
    [[maybe_unused]] const Vec8 old[F::kMoments] = {m[k]...};
    Vec8 update = F::template Step<kFlags>(Masked(gradient, keep), m, consts);
    if constexpr (kSkip) {
      // Not zero: also NaN, which then resets below.
      const Mask8 nonzero = {_mm256_cmp_ps(gradient.v, _mm256_setzero_ps(), _CMP_NEQ_UQ)};
      vector_touched = _mm256_or_ps(vector_touched, nonzero.v);
      ((m[k] = Select(nonzero, m[k], old[k])), ...);
      update = Select(nonzero, update, Vec8(0.0f));
    }
    ((keep = _mm256_and_si256(keep, FiniteMask(m[k]))), ...);
    _mm256_storeu_ps(u + j, Masked(update, keep).v);
    ((m[k] = Masked(m[k], keep)), ...);
    ((_mm256_storeu_ps(out[k] + j, m[k].v)), ...);
    ((vector_top[k] = _mm256_max_epu32(vector_top[k], _mm256_and_si256(_mm256_castps_si256(m[k].v),
                                                                        _mm256_set1_epi32(0x7FFFFFFF)))), ...);
  }
  ((top[k] = HorizontalMax(vector_top[k])), ...);
  bool any_touched = _mm256_movemask_ps(vector_touched) != 0;
#else
  bool any_touched = false;
#endif
  OPTAX8_NO_ALIAS_IN_LOOP
  for (; j < n; ++j) {
    // A non-finite gradient element counts as 0; it, or a moment that overflows, resets the
    // element's moments and updates nothing. (Masking the bits, rather than selecting, keeps
    // the loop free of branches.)
    uint32_t keep = FiniteMask(g[j]);
    float m[F::kMoments] = {Decode<F::kSigned[k]>(in[k][j], scale[k])...};
    [[maybe_unused]] const float old[F::kMoments] = {m[k]...};
    float update = F::template Step<kFlags>(Masked(g[j], keep), m, consts);
    if constexpr (kSkip) {
      const bool nonzero = !(g[j] == 0.0f);  // also NaN, which then resets below
      any_touched |= nonzero;
      ((m[k] = nonzero ? m[k] : old[k]), ...);
      update = nonzero ? update : 0.0f;
    }
    ((keep &= FiniteMask(m[k])), ...);
    u[j] = Masked(update, keep);
    ((m[k] = Masked(m[k], keep)), ...);
    ((out[k][j] = m[k]), ...);
    // For non-negative floats the integer order of the bits is the float order.
    ((top[k] = std::max(top[k], FloatToBits(m[k]) & 0x7FFFFFFFu)), ...);
  }
  ((peak[k] = top[k]), ...);
  touched = !kSkip || any_touched;
}

// Updates blocks [begin, end) (flat indices over rows x row_blocks).
template <class F, int kFlags>
OPTAX8_HD void UpdateBlocks(const Job& job, int64_t begin, int64_t end) {
  constexpr int K = F::kMoments;
  const int64_t bs = job.block_size;
  float* const scratch = Scratch((K + 2) * bs);
  float* const g32 = scratch;
  float* const u32 = scratch + bs;
  float* moments[K];
  for (int k = 0; k < K; ++k) moments[k] = scratch + (k + 2) * bs;

  int64_t group = -1;
  typename F::Consts consts{};
  for (int64_t block = begin; block < end; ++block) {
    const int64_t row = block / job.row_blocks;
    const int64_t column = (block - row * job.row_blocks) * bs;
    const int64_t offset = row * job.row_length + column;
    const int64_t n = std::min(bs, job.row_length - column);
    if (row / job.rows_per_group != group) {
      group = row / job.rows_per_group;
      consts = F::Prepare(job.hp + group * F::kNumScalars);
    }
    const uint8_t* codes[K];
    float absmax[K];
    uint32_t peak[K];
    for (int k = 0; k < K; ++k) {
      codes[k] = job.moments[k].codes + offset;
      absmax[k] = job.moments[k].absmax[block];
      peak[k] = 0;
    }
    bool touched = true;
    // In place when the update aliases the gradient: each element is read before it is written.
    UpdateElements<F, kFlags>(std::make_index_sequence<K>(), n, GradientAsFloat(job, offset, n, g32), codes,
                              absmax, consts, UpdateAsFloat(job, offset, u32), moments, peak, touched);
    StoreHalfUpdate(job, offset, n, u32);
    if (!touched) {  // skip_zeros, and the block's gradient is zero throughout: its state stays
      for (int k = 0; k < K; ++k) {
        job.moments[k].new_absmax[block] = absmax[k];
        uint8_t* new_codes = job.moments[k].new_codes + offset;
        if (new_codes != codes[k]) std::memcpy(new_codes, codes[k], static_cast<size_t>(n));
      }
      continue;
    }
    for (int k = 0; k < K; ++k) {
      const float new_absmax = BitsToFloat(peak[k]);
      job.moments[k].new_absmax[block] = new_absmax;
      // As quantize_blockwise: times 1 / absmax, with 1 for an all-zero block.
      const float scale = 1.0f / (new_absmax == 0.0f ? 1.0f : new_absmax);
      uint8_t* new_codes = job.moments[k].new_codes + offset;
      if (F::kSigned[k]) {
        EncodeBlock<true>(moments[k], scale, n, new_codes);
      } else {
        EncodeBlock<false>(moments[k], scale, n, new_codes);
      }
    }
  }
}

using BlocksFn = void (*)(const Job&, int64_t, int64_t);

// Runs chunks [0, chunks) on the calling thread and up to num_threads - 1 pool tasks. The
// caller waits only for the chunks to finish, never for a task to start, so a busy or
// single-threaded pool cannot deadlock it; tasks that start late find no work and touch
// nothing but the shared state they own.
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> work) {
  struct Shared {
    std::function<void(int64_t)> work;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto shared = std::make_shared<Shared>();
  shared->work = std::move(work);
  shared->chunks = chunks;
  auto drain = [](Shared& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.chunks; i = s.next.fetch_add(1)) {
      s.work(i);
      if (s.done.fetch_add(1) + 1 == s.chunks) {
        std::lock_guard<std::mutex> lock(s.mutex);
        s.finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, drain] { drain(*shared); });
  drain(*shared);
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == chunks; });
}

ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::Buffer<ffi::F32> hp, ffi::RemainingArgs state,
                      ffi::Result<ffi::AnyBuffer> update, ffi::RemainingRets new_state, std::string_view family,
                      int64_t block_size, int64_t flags, int64_t signed_mask) {
  BlocksFn blocks_fn = nullptr;
  Job job{};
  ffi::Error checked = PrepareJob(g, hp, state, update, new_state, family, block_size, flags, signed_mask, &job,
                                  [&](auto family_tag, auto flags_tag) {
                                    blocks_fn = &UpdateBlocks<decltype(family_tag), decltype(flags_tag)::value>;
                                  });
  if (checked.failure()) return checked;

  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkElements / block_size);
  const int64_t chunks = (job.total_blocks + chunk_blocks - 1) / chunk_blocks;
  ParallelFor(pool, chunks, [&job, blocks_fn, chunk_blocks](int64_t chunk) {
    ScopedFlushDenormals flush;
    const int64_t begin = chunk * chunk_blocks;
    blocks_fn(job, begin, std::min(job.total_blocks, begin + chunk_blocks));
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace optax8

// Exported with default visibility: the library is built with hidden symbols otherwise.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* Optax8CpuUpdate(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optax8CpuUpdate, optax8::UpdateImpl, optax8::BindUpdate<xla::ffi::ThreadPool>());

// The XLA FFI API version this library was compiled against, major * 1000 + minor.
extern "C" __attribute__((visibility("default"))) int Optax8FfiApiVersion() {
  return XLA_FFI_API_MAJOR * 1000 + XLA_FFI_API_MINOR;
}
