// One kernel call's work as plain pointers and sizes: what optax8_ffi.h's validation produces
// and every path's block walk (CPU: optax8_cpu_blocks.h, CUDA: optax8_cuda.cu) consumes. Free
// of XLA and the standard library, so that the per-instruction-set units can include it.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_JOB_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_JOB_H_

#include <cstdint>

namespace optax8 {

constexpr int kMaxMoments = 3;
// The CPU block walk's scratch per thread: this many blocks of floats (gradient, update, moments).
constexpr int kScratchBlocks = kMaxMoments + 2;

enum class GradientType : int32_t { kF32, kBF16, kF16 };

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
  GradientType dtype;
  const void* g;
  // The update; under the fused apply step the new parameter instead (param's buffer, given donation).
  void* update;
  // Under the fused apply step, the parameter (g's dtype), else null. The step then clips the
  // gradient, g / clip_norm * clip_max, and writes p + step_size * (u + weight_decay * p).
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
