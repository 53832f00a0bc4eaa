// optax8_math.h's per-element operations on sixteen float32 lanes with AVX-512 (F, BW, VL,
// DQ, VBMI), for the CPU kernel's AVX-512 unit (optax8_cpu_avx512.cc): as optax8_avx2.h, with mask
// registers for lane masks. Each lane computes exactly the bits the scalar code computes.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_AVX512_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_AVX512_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "optax8_math.h"

namespace optax8 {
OPTAX8_ISA_NAMESPACE_BEGIN

struct Vec16 {
  __m512 v;
  Vec16() = default;
  OPTAX8_HD Vec16(__m512 x) : v(x) {}
  OPTAX8_HD Vec16(float x) : v(_mm512_set1_ps(x)) {}
};
struct Mask16 {
  __mmask16 k;
};
OPTAX8_HD Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
OPTAX8_HD Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
OPTAX8_HD Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
OPTAX8_HD Vec16 operator/(Vec16 a, Vec16 b) { return _mm512_div_ps(a.v, b.v); }
OPTAX8_HD Mask16 operator>(Vec16 a, Vec16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
OPTAX8_HD Mask16 operator&(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.k & b.k)}; }
OPTAX8_HD Mask16 operator|(Mask16 a, Mask16 b) { return {static_cast<__mmask16>(a.k | b.k)}; }
OPTAX8_HD Vec16 Sqrt(Vec16 x) { return _mm512_sqrt_ps(x.v); }
OPTAX8_HD Vec16 Select(Mask16 condition, Vec16 if_true, Vec16 if_false) {
  return _mm512_mask_blend_ps(condition.k, if_false.v, if_true.v);
}
// As the scalar Sign (jnp.sign): ±1 with x's sign, except that ±0 and NaN stay.
OPTAX8_HD Vec16 Sign(Vec16 x) {
  const __m512 unit = _mm512_or_ps(_mm512_and_ps(x.v, _mm512_set1_ps(-0.0f)), _mm512_set1_ps(1.0f));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NEQ_OQ), x.v, unit);
}
OPTAX8_HD Mask16 Finite(Vec16 x) {
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);
  return {_mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x.v), exponent), exponent)};
}
// As the scalar NonZero, from the bits.
OPTAX8_HD Mask16 NonZero(Vec16 x) {
  const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(0x7FFFFFFF));
  return {_mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x007FFFFF))};
}
// x, with +0 in the lanes where keep is clear.
OPTAX8_HD Vec16 Masked(Vec16 x, Mask16 keep) { return _mm512_maskz_mov_ps(keep.k, x.v); }

// A map's entries as four 256-byte planes: bytes[b][c] is byte b (little-endian) of entry c.
struct alignas(64) BytePlanes {
  uint8_t bytes[4][256];
};

constexpr BytePlanes MakeBytePlanes(const float (&map)[256]) {
  BytePlanes planes{};
  for (int c = 0; c < 256; ++c) {
    const uint32_t bits = detail::FloatBits(map[c]);
    for (int b = 0; b < 4; ++b) planes.bytes[b][c] = static_cast<uint8_t>(bits >> (8 * b));
  }
  return planes;
}

inline constexpr BytePlanes kSignedPlanes = MakeBytePlanes(kSignedMap);
inline constexpr BytePlanes kUnsignedPlanes = MakeBytePlanes(kUnsignedMap);

// The byte permutation that makes LookupMap's in-lane unpacking yield its floats in order:
// float 16r + 4L + q comes out of byte 16L + 4r + q.
constexpr BytePlanes MakeUnpackOrder() {
  BytePlanes order{};
  for (int r = 0; r < 4; ++r) {
    for (int lane = 0; lane < 4; ++lane) {
      for (int q = 0; q < 4; ++q) order.bytes[0][16 * lane + 4 * r + q] = static_cast<uint8_t>(16 * r + 4 * lane + q);
    }
  }
  return order;
}

inline constexpr BytePlanes kUnpackOrder = MakeUnpackOrder();

struct Avx512 {
  static constexpr int64_t kLanes = 16;
  using Vec = Vec16;
  using Mask = Mask16;
  using Peak = __m512i;  // per lane, the largest ClaimBits so far

  OPTAX8_HD static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  OPTAX8_HD static void Store(float* p, Vec x) { _mm512_storeu_ps(p, x.v); }
  OPTAX8_HD static Mask NoLanes() { return {0}; }
  OPTAX8_HD static bool Any(Mask m) { return m.k != 0; }

  // values[j] = map[codes[j]] for j < n, a multiple of kLanes. 64 codes at a time with byte
  // permutes (VBMI): each of a float's four bytes is looked up in its own 256-byte plane of the
  // map (two 128-byte permutes and a blend on the code's top bit), and unpacking the four byte
  // vectors interleaves them into floats. Unpacking works within 128-bit lanes, so the codes
  // are first reordered (kUnpackOrder) for the floats to come out in order.
  template <bool kSigned>
  OPTAX8_HD static void LookupMap(const uint8_t* __restrict__ codes, int64_t n, float* __restrict__ values) {
    const BytePlanes& map = kSigned ? kSignedPlanes : kUnsignedPlanes;
    __m512i plane[4][4];
    for (int b = 0; b < 4; ++b) {
      for (int q = 0; q < 4; ++q) plane[b][q] = _mm512_load_si512(map.bytes[b] + 64 * q);
    }
    const __m512i order = _mm512_load_si512(kUnpackOrder.bytes[0]);
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
      const __m512i index = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes + j));
      const __mmask64 high = _mm512_movepi8_mask(index);
      __m512i byte[4];
      for (int b = 0; b < 4; ++b) {
        byte[b] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(plane[b][0], index, plane[b][1]),
                                         _mm512_permutex2var_epi8(plane[b][2], index, plane[b][3]));
      }
      const __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]), high01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
      const __m512i low23 = _mm512_unpacklo_epi8(byte[2], byte[3]), high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
      _mm512_storeu_si512(values + j, _mm512_unpacklo_epi16(low01, low23));
      _mm512_storeu_si512(values + j + 16, _mm512_unpackhi_epi16(low01, low23));
      _mm512_storeu_si512(values + j + 32, _mm512_unpacklo_epi16(high01, high23));
      _mm512_storeu_si512(values + j + 48, _mm512_unpackhi_epi16(high01, high23));
    }
    const float* entries = MapFor<kSigned>();
    for (; j < n; ++j) values[j] = entries[codes[j]];
  }

  // Encode<kSigned> of sixteen values (EncodeSum's sum per lane, from the direct table), stored
  // as sixteen bytes.
  template <bool kSigned>
  OPTAX8_HD static void Encode(Vec x, uint8_t* codes) {
    using Table = typename DirectEncodeTable<kSigned>::Table;
    const __m512i bits = _mm512_castps_si512(x.v);
    const __m512i sign = _mm512_srai_epi32(bits, 31);
    const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, Table::kKeyBits),
                                                 kDirectEncode<kSigned>.entry, 4);
    const __m512i position = _mm512_and_si512(_mm512_xor_si512(bits, sign), _mm512_set1_epi32(Table::kKeyMask));
    const __m512i code = _mm512_srli_epi32(_mm512_add_epi32(entry, position), 24);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(code));
  }

  OPTAX8_HD static Peak NoPeak() { return _mm512_setzero_si512(); }

  // peak, raised by ClaimBits<kSigned> of x's lanes.
  template <bool kSigned>
  OPTAX8_HD static Peak RaisePeak(Peak peak, Vec x) {
    __m512 claim = _mm512_and_ps(x.v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF)));
    if constexpr (kSigned) {
      // The stretch for lanes with the sign bit set (-0 too, whose claim is 0).
      const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(x.v));
      claim = _mm512_mask_mul_ps(claim, negative, claim, _mm512_set1_ps(kNegativeStretch));
    }
    return _mm512_max_epu32(peak, _mm512_castps_si512(claim));
  }

  OPTAX8_HD static uint32_t PeakOf(Peak x) { return _mm512_reduce_max_epu32(x); }
};

OPTAX8_ISA_NAMESPACE_END
}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_AVX512_H_
