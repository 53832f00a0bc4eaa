// Host stand-in for CUDA's bfloat16 type and the two conversions optax8_cuda_kernel.cuh uses:
// exact widening, and narrowing rounded to nearest even (NaN stays NaN).
#ifndef OPTAX8_TESTS_CUDA_EMULATION_CUDA_BF16_H_
#define OPTAX8_TESTS_CUDA_EMULATION_CUDA_BF16_H_

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFF};
  return {static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}

#endif  // OPTAX8_TESTS_CUDA_EMULATION_CUDA_BF16_H_
