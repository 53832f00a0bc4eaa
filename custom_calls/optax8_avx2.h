// optax8_math.h's per-element operations on eight float32 lanes with AVX2, for the CPU kernel's
// AVX2 unit (optax8_cpu_avx2.cc): a vector type on which the families' Step and GuardedStep
// run unchanged, and the instruction set's parts of the block walk (struct Avx2, as
// optax8_cpu_blocks.h uses it). Each lane computes exactly the bits the scalar code computes.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_AVX2_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_AVX2_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "optax8_math.h"

namespace optax8 {
OPTAX8_ISA_NAMESPACE_BEGIN

// Eight floats with the operations of the families' Step (+ - * /, >, Sqrt, Select, Sign).
struct Vec8 {
  __m256 v;
  Vec8() = default;
  OPTAX8_HD Vec8(__m256 x) : v(x) {}
  OPTAX8_HD Vec8(float x) : v(_mm256_set1_ps(x)) {}
};
// A lane mask: all ones or all zeros per lane.
struct Mask8 {
  __m256 v;
};
OPTAX8_HD Vec8 operator+(Vec8 a, Vec8 b) { return _mm256_add_ps(a.v, b.v); }
OPTAX8_HD Vec8 operator-(Vec8 a, Vec8 b) { return _mm256_sub_ps(a.v, b.v); }
OPTAX8_HD Vec8 operator*(Vec8 a, Vec8 b) { return _mm256_mul_ps(a.v, b.v); }
OPTAX8_HD Vec8 operator/(Vec8 a, Vec8 b) { return _mm256_div_ps(a.v, b.v); }
OPTAX8_HD Mask8 operator>(Vec8 a, Vec8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
OPTAX8_HD Mask8 operator&(Mask8 a, Mask8 b) { return {_mm256_and_ps(a.v, b.v)}; }
OPTAX8_HD Mask8 operator|(Mask8 a, Mask8 b) { return {_mm256_or_ps(a.v, b.v)}; }
OPTAX8_HD Vec8 Sqrt(Vec8 x) { return _mm256_sqrt_ps(x.v); }
OPTAX8_HD Vec8 Select(Mask8 condition, Vec8 if_true, Vec8 if_false) {
  return _mm256_blendv_ps(if_false.v, if_true.v, condition.v);
}
// As the scalar Sign (jnp.sign): ±1 with x's sign, except that ±0 and NaN stay.
OPTAX8_HD Vec8 Sign(Vec8 x) {
  const __m256 unit = _mm256_or_ps(_mm256_and_ps(x.v, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(1.0f));
  return _mm256_blendv_ps(x.v, unit, _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_NEQ_OQ));
}
OPTAX8_HD Mask8 Finite(Vec8 x) {
  const __m256i exponent = _mm256_set1_epi32(0x7F800000);
  const __m256i infinite = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x.v), exponent), exponent);
  return {_mm256_castsi256_ps(_mm256_xor_si256(infinite, _mm256_set1_epi32(-1)))};
}
// As the scalar NonZero, from the bits.
OPTAX8_HD Mask8 NonZero(Vec8 x) {
  const __m256i magnitude = _mm256_and_si256(_mm256_castps_si256(x.v), _mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x007FFFFF)))};
}
// x, with +0 in the lanes where keep is clear.
OPTAX8_HD Vec8 Masked(Vec8 x, Mask8 keep) { return _mm256_and_ps(x.v, keep.v); }

struct Avx2 {
  static constexpr int64_t kLanes = 8;
  using Vec = Vec8;
  using Mask = Mask8;
  using Peak = __m256i;  // per lane, the largest ClaimBits so far

  OPTAX8_HD static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  OPTAX8_HD static void Store(float* p, Vec x) { _mm256_storeu_ps(p, x.v); }
  OPTAX8_HD static Mask NoLanes() { return {_mm256_setzero_ps()}; }
  OPTAX8_HD static bool Any(Mask m) { return _mm256_movemask_ps(m.v) != 0; }

  // values[j] = map[codes[j]] for j < n, a multiple of kLanes: scalar loads, which x86 cores
  // issue faster than an AVX2 gather of the same entries.
  template <bool kSigned>
  OPTAX8_HD static void LookupMap(const uint8_t* __restrict__ codes, int64_t n, float* __restrict__ values) {
    const float* map = MapFor<kSigned>();
    for (int64_t j = 0; j < n; j += kLanes) {
      uint64_t eight;
      std::memcpy(&eight, codes + j, sizeof(eight));
      for (int q = 0; q < kLanes; ++q) values[j + q] = map[(eight >> (8 * q)) & 0xFFu];
    }
  }

  // Encode<kSigned> of eight values (EncodeSum's sum per lane, from the direct table), stored
  // as eight bytes. (Here a gather beats scalar lookups: the index and the sum need the value's
  // bits in a vector anyway.)
  template <bool kSigned>
  OPTAX8_HD static void Encode(Vec x, uint8_t* codes) {
    using Table = typename DirectEncodeTable<kSigned>::Table;
    const __m256i bits = _mm256_castps_si256(x.v);
    const __m256i sign = _mm256_srai_epi32(bits, 31);
    const __m256i entry =
        _mm256_i32gather_epi32(kDirectEncode<kSigned>.entry, _mm256_srli_epi32(bits, Table::kKeyBits), 4);
    const __m256i position = _mm256_and_si256(_mm256_xor_si256(bits, sign), _mm256_set1_epi32(Table::kKeyMask));
    const __m256i code = _mm256_srli_epi32(_mm256_add_epi32(entry, position), 24);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes), _mm_packus_epi16(words, words));
  }

  OPTAX8_HD static Peak NoPeak() { return _mm256_setzero_si256(); }

  // peak, raised by ClaimBits<kSigned> of x's lanes.
  template <bool kSigned>
  OPTAX8_HD static Peak RaisePeak(Peak peak, Vec x) {
    __m256 claim = _mm256_and_ps(x.v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    if constexpr (kSigned) {
      // blendv picks by the sign bit: the stretch for negative lanes (-0 too, whose claim is 0).
      claim = _mm256_mul_ps(claim, _mm256_blendv_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(kNegativeStretch), x.v));
    }
    return _mm256_max_epu32(peak, _mm256_castps_si256(claim));
  }

  // The largest of the lanes.
  OPTAX8_HD static uint32_t PeakOf(Peak x) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
  }
};

OPTAX8_ISA_NAMESPACE_END
}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_AVX2_H_
