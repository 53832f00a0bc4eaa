// Host stand-in for CUDA's float16 type and the two conversions optax8_cuda_kernel.cuh uses,
// through the compiler's _Float16 (exact widening, narrowing rounded to nearest even).
#ifndef OPTAX8_TESTS_CUDA_EMULATION_CUDA_FP16_H_
#define OPTAX8_TESTS_CUDA_EMULATION_CUDA_FP16_H_

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, sizeof(x));
  return static_cast<float>(x);
}

inline __half __float2half_rn(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  __half result;
  std::memcpy(&result.bits, &h, sizeof(h));
  return result;
}

#endif  // OPTAX8_TESTS_CUDA_EMULATION_CUDA_FP16_H_
