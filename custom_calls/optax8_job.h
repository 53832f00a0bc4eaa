// One kernel call's work as plain pointers and sizes: what optax8_ffi.h's validation produces
// and every path's block walk (CPU: optax8_cpu_blocks.h, CUDA: optax8_cuda.cu) consumes. Free
// of XLA and the standard library, so that the per-instruction-set units can include it.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_JOB_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_JOB_H_

#include <cstdint>

// Host and device code alike include the kernels' headers (the CPU units, the CUDA kernel).
#if defined(__CUDACC__)
#define OPTAX8_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define OPTAX8_HD inline __attribute__((always_inline))
#else
#define OPTAX8_HD inline
#endif

namespace optax8 {

// n / d for a per-call constant d and 0 <= n <= kMaxDividend, as a multiplication and shifts:
// with l = ceil(log2 d) and m = ceil(2^(31 + l) / d) (which fits in 32 bits), n * m / 2^(31 + l)
// exceeds n / d by n * (m * d - 2^(31 + l)) / (d * 2^(31 + l)) < 1 / d, so its floor is n / d's
// (Granlund and Montgomery). The CUDA block walk divides block numbers so; the high half of
// (2n) * m is one instruction there.
struct Divisor {
  static constexpr uint32_t kMaxDividend = 0x7FFFFFFFu;
  uint32_t multiplier;
  uint32_t log2;  // l

  // d >= 1.
  static constexpr Divisor Of(uint32_t d) {
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    return {static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d), l};
  }
  OPTAX8_HD constexpr uint32_t Divide(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n << 1) * multiplier) >> 32) >> log2;
  }
};

constexpr int kMaxMoments = 3;
// The CPU block walk's scratch per thread: this many blocks of floats (gradient, update, and two
// sets of moments).
constexpr int kScratchBlocks = 2 * kMaxMoments + 2;

// The gradient's, the update's and the parameter's element types.
enum class ElementType : int32_t { kF32, kBF16, kF16 };

struct MomentBuffers {
  const uint8_t* codes;
  const float* absmax;
  uint8_t* new_codes;
  float* new_absmax;
};

// The fused apply step's four per-step scalars, after the family's own in each hp vector.
constexpr int kApplyScalars = 4;

struct Job {
  int32_t family;  // VisitFamily's number
  int32_t flags;   // the Flag bits, less kApply
  ElementType dtype;        // the gradient's and the update's
  ElementType param_dtype;  // the parameter's and the new parameter's: dtype's, or kF32
  const void* g;
  // The update; under the fused apply step the new parameter instead (param's buffer, given donation).
  void* update;
  // Under the fused apply step, the parameter, else null. The step then clips the gradient,
  // g / clip_norm * clip_max, and writes p + step_size * (u + weight_decay * p).
  const void* param;
  const float* hp;
  int64_t hp_stride;       // floats per hp vector: the family's scalars, then kApplyScalars if param
  int64_t row_length;      // the last axis
  int64_t row_blocks;      // blocks per row
  int64_t block_size;
  int64_t rows_per_group;  // rows sharing one hp vector
  int64_t total_blocks;
  MomentBuffers moments[kMaxMoments];
};

}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_JOB_H_
