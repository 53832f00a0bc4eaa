// Per-element math of optax8's fused 8-bit optimizer update: the dynamic maps, exact
// nearest-code encoding, decoding, and each optimizer family's float32 update.
//
// Host and device code alike include this header (the CPU kernel now, a CUDA kernel later),
// so both run the same arithmetic. Everything here mirrors optax8/_src/update_math.py and
// optax8/_src/quantization.py operation for operation, each operation rounded to float32
// (build with contraction of a*b+c into fused multiply-adds off). That is the reference's
// result wherever XLA does not contract; XLA:CPU on FMA hosts contracts some a*b+c, choosing
// which product to fuse from the surrounding fusion, so there the reference's moments can
// differ from these in the last bit.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_MATH_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "optax8_job.h"

// The CPU library compiles this header once per instruction set (optax8_cpu_<isa>.cc, each
// defining OPTAX8_ISA as the set's name), in an inline namespace of that name, so that the
// linker never merges one set's copy of an inline function into another's code.
#if defined(OPTAX8_ISA)
#define OPTAX8_ISA_NAMESPACE_BEGIN inline namespace OPTAX8_ISA {
#define OPTAX8_ISA_NAMESPACE_END }
#else
#define OPTAX8_ISA_NAMESPACE_BEGIN
#define OPTAX8_ISA_NAMESPACE_END
#endif

namespace optax8 {
OPTAX8_ISA_NAMESPACE_BEGIN

// bitsandbytes 0.50's dynamic maps, ascending; identical to optax8/_src/dynamic_maps.json
// (tests/test_native.py checks every bit).
inline constexpr float kSignedMap[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f,
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f,
    -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6666p-2f,
    -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f,
    -0x1.de6666p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eep-4f,
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f,
    -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f,
    -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f,
    -0x1.27476ep-21f, 0x0p+0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f,
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f,
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f,
    0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f,
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f,
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f,
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f,
    0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f,
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};
inline constexpr float kUnsignedMap[256] = {
    0x0p+0f, 0x1.5cf754p-22f, 0x1.a0133p-21f, 0x1.1d367p-19f, 0x1.2599ecp-18f, 0x1.bc98a2p-18f,
    0x1.29cbaap-17f, 0x1.0624dcp-16f, 0x1.c2e34p-16f, 0x1.3fd0dp-15f, 0x1.9e3p-15f, 0x1.fc8f34p-15f,
    0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f, 0x1.82a994p-13f, 0x1.f8a092p-13f,
    0x1.374bc8p-12f, 0x1.724744p-12f, 0x1.ad42c6p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f,
    0x1.4c986p-11f, 0x1.6a162p-11f, 0x1.8793dep-11f, 0x1.a511ap-11f, 0x1.c28f5ep-11f, 0x1.e00d1cp-11f,
    0x1.fd8adcp-11f, 0x1.2b020cp-10f, 0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f,
    0x1.4dd2fp-9f, 0x1.72b02p-9f, 0x1.978d4ep-9f, 0x1.bc6a8p-9f, 0x1.e147aep-9f, 0x1.03126ep-8f,
    0x1.158104p-8f, 0x1.27ef9ep-8f, 0x1.3a5e34p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fap-8f,
    0x1.841894p-8f, 0x1.96872ap-8f, 0x1.a8f5c2p-8f, 0x1.bb645cp-8f, 0x1.cdd2fp-8f, 0x1.e0418ap-8f,
    0x1.f2b01ep-8f, 0x1.028f5cp-7f, 0x1.0bc6a8p-7f, 0x1.14fdf2p-7f, 0x1.1e354p-7f, 0x1.276c8ap-7f,
    0x1.30a3d6p-7f, 0x1.39db24p-7f, 0x1.43126ep-7f, 0x1.5eb854p-7f, 0x1.8ccccep-7f, 0x1.bae146p-7f,
    0x1.e8f5c4p-7f, 0x1.0b851ep-6f, 0x1.228f5ep-6f, 0x1.39999ap-6f, 0x1.50a3d6p-6f, 0x1.67ae16p-6f,
    0x1.7eb852p-6f, 0x1.95c28ep-6f, 0x1.accccep-6f, 0x1.c3d70ep-6f, 0x1.dae146p-6f, 0x1.f1eb86p-6f,
    0x1.047aep-5f, 0x1.1p-5f, 0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5ep-5f, 0x1.3e147ap-5f,
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d6p-5f, 0x1.6c28f6p-5f, 0x1.77ae14p-5f, 0x1.833334p-5f,
    0x1.8eb85p-5f, 0x1.9a3d7p-5f, 0x1.a5c28ep-5f, 0x1.b147aep-5f, 0x1.bccccep-5f, 0x1.c851eep-5f,
    0x1.d3d70ep-5f, 0x1.df5c2ap-5f, 0x1.eae146p-5f, 0x1.f66666p-5f, 0x1.00f5c4p-4f, 0x1.06b854p-4f,
    0x1.0c7ae2p-4f, 0x1.123d7p-4f, 0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23852p-4f, 0x1.2947aep-4f,
    0x1.2f0a3ep-4f, 0x1.34cccep-4f, 0x1.3a8f5ep-4f, 0x1.4051ecp-4f, 0x1.46147cp-4f, 0x1.4bd70ap-4f,
    0x1.51999ap-4f, 0x1.575c2ap-4f, 0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d6p-4f, 0x1.6e6666p-4f,
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae16p-4f, 0x1.8570a4p-4f, 0x1.8b3334p-4f, 0x1.90f5c4p-4f,
    0x1.96b852p-4f, 0x1.a8p-4f, 0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d9998p-3f,
    0x1.1cp-3f, 0x1.2a6668p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f, 0x1.559998p-3f, 0x1.64p-3f,
    0x1.726668p-3f, 0x1.80ccccp-3f, 0x1.8f3334p-3f, 0x1.9d9998p-3f, 0x1.acp-3f, 0x1.ba6668p-3f,
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e59998p-3f, 0x1.f4p-3f, 0x1.013332p-2f, 0x1.086666p-2f,
    0x1.0f999ap-2f, 0x1.16ccccp-2f, 0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.339998p-2f,
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f, 0x1.579998p-2f, 0x1.5eccccp-2f,
    0x1.66p-2f, 0x1.6d3334p-2f, 0x1.746666p-2f, 0x1.7b9998p-2f, 0x1.82ccccp-2f, 0x1.8ap-2f,
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f9998p-2f, 0x1.a6ccccp-2f, 0x1.aep-2f, 0x1.b53334p-2f,
    0x1.bc6666p-2f, 0x1.c39998p-2f, 0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f,
    0x1.e79998p-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3332p-2f, 0x1.023334p-1f, 0x1.05ccccp-1f,
    0x1.096666p-1f, 0x1.0dp-1f, 0x1.109998p-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6668p-1f,
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f, 0x1.2d6668p-1f, 0x1.31p-1f,
    0x1.34999ap-1f, 0x1.383334p-1f, 0x1.3bccccp-1f, 0x1.3f6668p-1f, 0x1.43p-1f, 0x1.46999ap-1f,
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516668p-1f, 0x1.55p-1f, 0x1.58999ap-1f, 0x1.5c3334p-1f,
    0x1.5fccccp-1f, 0x1.636668p-1f, 0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f,
    0x1.756668p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f, 0x1.83ccccp-1f, 0x1.876668p-1f,
    0x1.8bp-1f, 0x1.8e9998p-1f, 0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996668p-1f, 0x1.9dp-1f,
    0x1.a09998p-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6668p-1f, 0x1.afp-1f, 0x1.b29998p-1f,
    0x1.b63334p-1f, 0x1.b9ccccp-1f, 0x1.bd6668p-1f, 0x1.c1p-1f, 0x1.c49998p-1f, 0x1.c83334p-1f,
    0x1.cbccccp-1f, 0x1.cf6668p-1f, 0x1.d3p-1f, 0x1.d69998p-1f, 0x1.da3334p-1f, 0x1.ddccccp-1f,
    0x1.e16668p-1f, 0x1.e5p-1f, 0x1.e89998p-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36668p-1f,
    0x1.f7p-1f, 0x1.fa9998p-1f, 0x1.fe3334p-1f, 0x1p+0f,
};

// The signed map holds +0 at this code, negative values below it and positive ones above.
inline constexpr uint32_t kSignedZeroCode = 127;

namespace detail {

// Exact float32 <-> bits conversions usable in constant expressions (C++17 has no constexpr
// bit_cast). Only zero and normal numbers occur in the maps and thresholds.
constexpr double Pow2(int e) {
  double p = 1.0;
  for (; e > 0; --e) p *= 2.0;
  for (; e < 0; ++e) p /= 2.0;
  return p;
}

constexpr uint32_t FloatBits(float f) {
  if (f == 0.0f) return 0;
  double a = f < 0 ? -static_cast<double>(f) : static_cast<double>(f);
  int e = 0;
  while (a >= 2.0) a /= 2.0, ++e;
  while (a < 1.0) a *= 2.0, --e;
  const uint32_t mantissa = static_cast<uint32_t>((a - 1.0) * 8388608.0);
  return (f < 0 ? 0x80000000u : 0u) | (static_cast<uint32_t>(e + 127) << 23) | mantissa;
}

constexpr float FloatFromBits(uint32_t bits) {
  const double mantissa = 1.0 + static_cast<double>(bits & 0x7FFFFFu) / 8388608.0;
  const double a = mantissa * Pow2(static_cast<int>((bits >> 23) & 0xFFu) - 127);
  return static_cast<float>(bits >> 31 ? -a : a);
}

// An order-preserving map from float bits to unsigned integers (-0 sorts just below +0).
constexpr uint32_t OrderKey(uint32_t bits) { return bits >> 31 ? ~bits : bits | 0x80000000u; }

}  // namespace detail

// The 255 decision thresholds of a map: code(x) = #{k : t[k] < x} is the nearest code of x
// (ties to the lower code). t[k] is the float32 midpoint of map[k] and map[k+1] when exact,
// else the largest float32 below it; the same rule as quantization.encode_thresholds.
struct Thresholds {
  float t[255];
};

constexpr Thresholds MakeThresholds(const float (&map)[256]) {
  Thresholds r{};
  for (int k = 0; k < 255; ++k) {
    // Adjacent float32s add exactly in double, so the midpoint is exact.
    const double mid = (static_cast<double>(map[k]) + static_cast<double>(map[k + 1])) / 2.0;
    float t = static_cast<float>(mid);
    if (static_cast<double>(t) > mid) {
      const uint32_t bits = detail::FloatBits(t);
      t = detail::FloatFromBits(t > 0 ? bits - 1 : bits + 1);
    }
    r.t[k] = t;
  }
  return r;
}

inline constexpr Thresholds kSignedThresholds = MakeThresholds(kSignedMap);
inline constexpr Thresholds kUnsignedThresholds = MakeThresholds(kUnsignedMap);

// The signed map's sign layout, on which the sign fix below relies.
constexpr bool SignedMapSignsAreOrdered() {
  for (uint32_t c = 0; c < 256; ++c) {
    const float v = kSignedMap[c];
    if (c < kSignedZeroCode ? !(v < 0) : (c == kSignedZeroCode ? v != 0 : !(v > 0))) return false;
  }
  return true;
}
static_assert(SignedMapSignsAreOrdered(), "the signed map must hold negatives, then +0, then positives");

// Encoding without a search. A float's sign, exponent and top kSubBits mantissa bits select a
// bucket: a contiguous range of floats holding at most one threshold. Each bucket's entry is
//   (code of the bucket's lowest float << 24) + (0xFFFFFF - position of its threshold in the bucket),
// so that code(x) = (entry + x's position) >> 24: one load, one add, one shift, as the
// position is below 2^24 (a bucket without a threshold stores position kKeyMask, which no x's
// position exceeds). Rows (per sign): 0 = |x| < 2^-23 (below every threshold, zeros included),
// 1..24 = the binades [2^-23, 2^1), 25..31 = larger and NaN (jnp.searchsorted sorts NaN above
// every threshold). 32 rows make the sign a single index bit; |x| < 2 never reaches past row 24.
//
// bitsandbytes' sign fix for the signed map (a code whose value has the other sign than x moves
// one step towards x's sign) is folded into the entries: given the map's sign layout it only
// ever moves a negative x (or -0) that counted 127 or more thresholds down by one. So is the
// unsigned map's floor, a positive x never encoding as code 0: every positive bucket whose code
// would be 0 has code 1, except where +0 lies. Encode sends x to row 0's sub-bucket 0 only when
// its bits' index is 0 (+0 and the smallest subnormals), and the threshold there lies at
// position 0, so +0 keeps code 0.
inline constexpr int kMinExponent = 104;  // biased exponent of 2^-23
inline constexpr int kRows = 32;
inline constexpr int kRowsBelowTwo = 127 - kMinExponent + 2;  // rows 0..24: every |x| < 2

template <int kSubBits>
struct EncodeTable {
  static constexpr int kKeyBits = 23 - kSubBits;
  static constexpr int32_t kKeyMask = (1 << kKeyBits) - 1;
  int32_t entry[2 * kRows << kSubBits];
  bool exact;  // every threshold is a normal float in rows 1..24, at most one per bucket
};

template <int kSubBits>
constexpr EncodeTable<kSubBits> MakeEncodeTable(const Thresholds& th, bool sign_fix, bool positive_floor) {
  using Table = EncodeTable<kSubBits>;
  Table table{};
  table.exact = true;
  uint32_t keys[255] = {};
  uint32_t below_zero = 0;
  for (int k = 0; k < 255; ++k) {
    const uint32_t bits = detail::FloatBits(th.t[k]);
    const int e = static_cast<int>((bits >> 23) & 0xFFu);
    if (e < kMinExponent || e > 126 || (k > 0 && th.t[k - 1] >= th.t[k])) table.exact = false;
    keys[k] = detail::OrderKey(bits);
    below_zero += th.t[k] < 0 ? 1u : 0u;
  }
  constexpr uint32_t kNone = static_cast<uint32_t>(Table::kKeyMask);  // no threshold in the bucket
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (int row = 0; row < kRows; ++row) {
      for (uint32_t sub = 0; sub < (1u << kSubBits); ++sub) {
        uint32_t base = row == 0 ? below_zero : 255u;
        uint32_t position = kNone;
        if (row > 0 && row < kRowsBelowTwo) {
          const uint32_t prefix = (sign << 31) | (static_cast<uint32_t>(kMinExponent + row - 1) << 23) |
                                  (sub << Table::kKeyBits);
          // The bucket's lowest value: its largest magnitude when negative.
          const uint32_t lowest = detail::OrderKey(sign ? prefix | kNone : prefix);
          base = 0;
          while (base < 255 && keys[base] < lowest) ++base;
          if (base < 255 && keys[base] - lowest <= kNone) {
            position = keys[base] - lowest;
            if (base + 1 < 255 && keys[base + 1] - lowest <= kNone) table.exact = false;
          }
        }
        if (sign_fix && sign == 1 && base + (position == kNone ? 0 : 1) >= kSignedZeroCode) {
          // Negative x: every code of this bucket moves down by one, which, as a negative x
          // counts at most 127 thresholds (or 255, when NaN), makes a single code.
          base = base == 255 ? 254 : kSignedZeroCode - 1;
          position = kNone;
        }
        if (positive_floor && sign == 0 && base == 0) {
          // Code 1 for the whole bucket (its codes are 0 and 1, or 0), but +0's.
          const bool zero = row == 0 && sub == 0;
          base = zero ? 0 : 1;
          position = zero ? 0 : kNone;
        }
        const uint32_t index = ((sign * kRows + static_cast<uint32_t>(row)) << kSubBits) | sub;
        table.entry[index] = static_cast<int32_t>((base << 24) + (0xFFFFFFu - position));
      }
    }
  }
  return table;
}

// Six sub-bits suffice for the signed map's spacing, seven for the unsigned map's.
inline constexpr EncodeTable<6> kSignedEncode = MakeEncodeTable<6>(kSignedThresholds, true, false);
inline constexpr EncodeTable<7> kUnsignedEncode = MakeEncodeTable<7>(kUnsignedThresholds, false, true);
static_assert(kSignedEncode.exact && kUnsignedEncode.exact, "a bucket holds two thresholds");

OPTAX8_HD uint32_t FloatToBits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

OPTAX8_HD float BitsToFloat(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

#if defined(__CUDACC__)
// Device code cannot read host constants, so CUDA gets copies of the tables in device memory.
struct DeviceTables {
  float signed_map[256];
  float unsigned_map[256];
  EncodeTable<6> signed_encode;
  EncodeTable<7> unsigned_encode;
};

constexpr DeviceTables MakeDeviceTables() {
  DeviceTables t{};
  for (int c = 0; c < 256; ++c) {
    t.signed_map[c] = kSignedMap[c];
    t.unsigned_map[c] = kUnsignedMap[c];
  }
  t.signed_encode = kSignedEncode;
  t.unsigned_encode = kUnsignedEncode;
  return t;
}

__device__ constexpr DeviceTables kDeviceTables = MakeDeviceTables();

// Device code looks the tables up here, in the thread block's shared memory, where lookups at
// data-dependent addresses cost a few bank conflicts instead of a cache line each. A kernel copies
// kDeviceTables into it before its first Encode or Decode (the signed parts alone suffice for a
// kernel that never uses the unsigned map).
extern __shared__ DeviceTables kSharedTables[];
#endif

template <bool kSigned>
OPTAX8_HD const float* MapFor() {
#if defined(__CUDA_ARCH__)
  return kSigned ? kSharedTables->signed_map : kSharedTables->unsigned_map;
#else
  return kSigned ? kSignedMap : kUnsignedMap;
#endif
}

template <bool kSigned>
OPTAX8_HD const auto& EncodeTableFor() {
#if defined(__CUDA_ARCH__)
  if constexpr (kSigned) {
    return kSharedTables->signed_encode;
  } else {
    return kSharedTables->unsigned_encode;
  }
#else
  if constexpr (kSigned) {
    return kSignedEncode;
  } else {
    return kUnsignedEncode;
  }
#endif
}

// The code of x = value / absmax: its nearest map entry (ties to the lower code; the same as
// #{k : t[k] < x}), with bitsandbytes' sign fix for the signed map, and for the unsigned map its
// counterpart: a positive x never encodes as zero (code 0), but as the smallest positive entry.
// The unsigned map holds non-negative states (second moments, squared-gradient sums), which
// divide updates: one that rounded to zero next to a non-zero first moment or gradient would
// make a step up to 1/eps too large. Exact for every float of magnitude below 2, and NaN.
//
// EncodeSum returns (entry + position), whose top byte is the code, so that a kernel packing
// codes with byte permutes needs no shift; EncodeIndex is the entry's place in the table.
// Signed 32-bit arithmetic throughout, which vectorizes best; the SIMD encoders compute the same
// sum per lane, with the entry from kDirectEncode (below).
template <bool kSigned, class Table>
OPTAX8_HD constexpr int32_t EncodeIndex(int32_t bits) {
  constexpr int kSubBits = 23 - Table::kKeyBits;
  const int32_t bucket = (bits & 0x7FFFFFFF) >> Table::kKeyBits;
  // Row 0 of the unsigned map: sub-bucket 0 for bucket 0 alone (+0 is there), 1 for other tiny x.
  const int32_t floor = kSigned ? 0 : (bucket < 1 ? bucket : 1);
  int32_t row_sub = bucket - ((kMinExponent - 1) << kSubBits);
  constexpr int32_t kLastRowSub = (kRows << kSubBits) - 1;
  row_sub = row_sub < floor ? floor : (row_sub > kLastRowSub ? kLastRowSub : row_sub);
  return row_sub | ((bits >> 31) & (kRows << kSubBits));
}

template <bool kSigned, class Table>
OPTAX8_HD uint32_t EncodeSum(float x, const Table& table) {
  const int32_t bits = static_cast<int32_t>(FloatToBits(x));
  const int32_t entry = table.entry[EncodeIndex<kSigned, Table>(bits)];
  // Position within the bucket in value order: negative floats order by decreasing magnitude.
  const int32_t position = (bits ^ (bits >> 31)) & Table::kKeyMask;
  return static_cast<uint32_t>(entry) + static_cast<uint32_t>(position);
}

template <bool kSigned>
OPTAX8_HD uint32_t Encode(float x) {
  return EncodeSum<kSigned>(x, EncodeTableFor<kSigned>()) >> 24;
}

// An encode table's entries indexed by a float's bits >> kKeyBits (sign, exponent and sub-bits)
// rather than by EncodeIndex, whose clamping to the table's rows is folded into the copies: a
// vector encoder's gather index is then one shift. 128 KB for the signed map and 256 KB for the
// unsigned one, of which the values of a block over its absmax touch a few KB; the vector
// encoders (optax8_avx2.h, optax8_avx512.h) use them, the scalar and CUDA ones the compact tables.
template <bool kSigned>
struct DirectEncodeTable {
  using Table = EncodeTable<kSigned ? 6 : 7>;
  int32_t entry[1 << (32 - Table::kKeyBits)];
};

template <bool kSigned>
constexpr DirectEncodeTable<kSigned> MakeDirectEncodeTable() {
  using Table = typename DirectEncodeTable<kSigned>::Table;
  const Table* table = nullptr;
  if constexpr (kSigned) {
    table = &kSignedEncode;
  } else {
    table = &kUnsignedEncode;
  }
  DirectEncodeTable<kSigned> direct{};
  for (uint32_t i = 0; i < (1u << (32 - Table::kKeyBits)); ++i) {
    direct.entry[i] = table->entry[EncodeIndex<kSigned, Table>(static_cast<int32_t>(i << Table::kKeyBits))];
  }
  return direct;
}

template <bool kSigned>
inline constexpr DirectEncodeTable<kSigned> kDirectEncode = MakeDirectEncodeTable<kSigned>();

template <bool kSigned>
OPTAX8_HD float Decode(uint32_t code, float absmax) {
  return MapFor<kSigned>()[code] * absmax;
}

// A block's absmax is the largest claim of its elements: |x|, and on the signed map, whose most
// negative entry is -0.99297 rather than -1, |x| * kNegativeStretch for a negative x, so that
// the block's most negative value is code 0's instead of shrinking by 0.7% at every step
// (quantization.NEGATIVE_STRETCH). As float bits: for non-negative floats the integer order of
// the bits is the float order.
inline constexpr float kNegativeStretch = 0x1.01d01p+0f;

template <bool kSigned>
OPTAX8_HD uint32_t ClaimBits(float x) {
  const uint32_t magnitude = FloatToBits(x) & 0x7FFFFFFFu;
  if constexpr (kSigned) {
    return FloatToBits(BitsToFloat(magnitude) * (x < 0.0f ? kNegativeStretch : 1.0f));
  } else {
    return magnitude;
  }
}

// The absmax of a block of finite values from its largest claim: float32's largest finite value
// where the stretch alone overflowed.
OPTAX8_HD float AbsmaxOfPeak(uint32_t peak) { return BitsToFloat(peak < 0x7F800000u ? peak : 0x7F7FFFFFu); }

// The few operations the families' math needs beyond + - * /, for float; a SIMD kernel
// overloads them for its vector type, so that one Step serves scalars and vectors.
OPTAX8_HD float Sqrt(float x) { return sqrtf(x); }
OPTAX8_HD float Select(bool condition, float if_true, float if_false) { return condition ? if_true : if_false; }
OPTAX8_HD float Sign(float x) { return x > 0 ? 1.0f : (x < 0 ? -1.0f : x); }  // as jnp.sign: keeps ±0, NaN

// Static options, as bits of the kernel's `flags` attribute. kSkipZeros applies to every
// family and lives in the kernels' element loop, not in a Step: an element whose gradient is
// exactly zero keeps its decoded moments and gets a zero update, and a block whose gradient is
// zero throughout keeps its codes and absmax as they are.
// kApply (every family too) is the fused apply step (Job::param): a run-time choice of the block
// walk, outside the element loop, so it adds no instantiation.
// Bit k of `flags` is the option kFlagNames[k] (update_math.FLAG_BITS).
enum Flag : int { kNesterov = 1, kEpsInSqrt = 2, kBiasCorrection = 4, kSkipZeros = 8, kApply = 16 };
inline constexpr int kCommonFlags = kSkipZeros;
inline constexpr int kAllFlags = kNesterov | kEpsInSqrt | kBiasCorrection | kSkipZeros;
inline constexpr int kNumFlags = 5;
inline constexpr const char* kFlagNames[kNumFlags] = {"nesterov", "eps_in_sqrt", "bias_correction", "skip_zeros",
                                                      "apply"};
inline constexpr const char* kApplyScalarNames = "clip_norm clip_max step_size weight_decay";

// Each family: its name, kMoments and their maps (kSigned), the flags it reads, and its
// per-step scalars (kNumScalars floats, named in order by kScalarNames), all as update_math.py
// declares them; the libraries export them (ContractOf) and optax8 checks them when it loads one. Prepare turns
// them into the constants the elementwise Step uses; Step updates the moments in place and
// returns the update, for one float or a vector of them (V). Formulas are update_math.py's,
// operation for operation.
struct Adam {
  static constexpr int kMoments = 2;
  static constexpr bool kSigned[kMoments] = {true, false};
  static constexpr int kFlags = kNesterov;
  static constexpr const char* kName = "adam";
  static constexpr int kNumScalars = 7;
  static constexpr const char* kScalarNames = "b1 b2 eps eps_root bc1 bc2 bc1_next";
  struct Consts {
    float b1, b2, one_minus_b1, one_minus_b2, eps, eps_root, inv_bc1, inv_bc2, inv_bc1_next;
  };
  OPTAX8_HD static Consts Prepare(const float* s) {
    // update_math.py divides by a per-step scalar as a multiplication by its reciprocal.
    return {s[0], s[1], 1.0f - s[0], 1.0f - s[1], s[2], s[3], 1.0f / s[4], 1.0f / s[5], 1.0f / s[6]};
  }
  template <int kF, class V>
  OPTAX8_HD static V Step(V g, V* m, const Consts& c) {
    m[0] = c.b1 * m[0] + c.one_minus_b1 * g;
    m[1] = c.b2 * m[1] + c.one_minus_b2 * (g * g);
    V m_hat;
    if constexpr ((kF & kNesterov) != 0) {
      m_hat = c.b1 * (m[0] * c.inv_bc1_next) + c.one_minus_b1 * (g * c.inv_bc1);
    } else {
      m_hat = m[0] * c.inv_bc1;
    }
    return m_hat / (Sqrt(m[1] * c.inv_bc2 + c.eps_root) + c.eps);
  }
};

struct Momentum {
  static constexpr int kMoments = 1;
  static constexpr bool kSigned[kMoments] = {true};
  static constexpr int kFlags = kNesterov;
  static constexpr const char* kName = "momentum";
  static constexpr int kNumScalars = 1;
  static constexpr const char* kScalarNames = "decay";
  struct Consts {
    float decay;
  };
  OPTAX8_HD static Consts Prepare(const float* s) { return {s[0]}; }
  template <int kF, class V>
  OPTAX8_HD static V Step(V g, V* m, const Consts& c) {
    m[0] = c.decay * m[0] + g;
    if constexpr ((kF & kNesterov) != 0) {
      return c.decay * m[0] + g;
    } else {
      return m[0];
    }
  }
};

struct Lion {
  static constexpr int kMoments = 1;
  static constexpr bool kSigned[kMoments] = {true};
  static constexpr int kFlags = 0;
  static constexpr const char* kName = "lion";
  static constexpr int kNumScalars = 2;
  static constexpr const char* kScalarNames = "b1 b2";
  struct Consts {
    float b1, b2, one_minus_b1, one_minus_b2;
  };
  OPTAX8_HD static Consts Prepare(const float* s) { return {s[0], s[1], 1.0f - s[0], 1.0f - s[1]}; }
  template <int kF, class V>
  OPTAX8_HD static V Step(V g, V* m, const Consts& c) {
    const V d = c.one_minus_b1 * g + c.b1 * m[0];
    m[0] = c.one_minus_b2 * g + c.b2 * m[0];
    return Sign(d);
  }
};

struct Rmsprop {
  static constexpr int kMoments = 1;
  static constexpr bool kSigned[kMoments] = {false};
  static constexpr int kFlags = kEpsInSqrt | kBiasCorrection;
  static constexpr const char* kName = "rmsprop";
  static constexpr int kNumScalars = 3;
  static constexpr const char* kScalarNames = "decay eps bc";
  struct Consts {
    float decay, one_minus_decay, eps, inv_bc;
  };
  OPTAX8_HD static Consts Prepare(const float* s) { return {s[0], 1.0f - s[0], s[1], 1.0f / s[2]}; }
  template <int kF, class V>
  OPTAX8_HD static V Step(V g, V* m, const Consts& c) {
    m[0] = c.one_minus_decay * (g * g) + c.decay * m[0];
    constexpr bool kCorrect = (kF & kBiasCorrection) != 0;
    if constexpr ((kF & kEpsInSqrt) != 0) {
      const V t = kCorrect ? m[0] * c.inv_bc + c.eps : m[0] + c.eps;
      return g * (1.0f / Sqrt(t));
    } else {
      return g / (Sqrt(kCorrect ? m[0] * c.inv_bc : m[0]) + c.eps);
    }
  }
};

struct Adagrad {
  static constexpr int kMoments = 1;
  static constexpr bool kSigned[kMoments] = {false};
  static constexpr int kFlags = 0;
  static constexpr const char* kName = "adagrad";
  static constexpr int kNumScalars = 1;
  static constexpr const char* kScalarNames = "eps";
  struct Consts {
    float eps;
  };
  OPTAX8_HD static Consts Prepare(const float* s) { return {s[0]}; }
  template <int kF, class V>
  OPTAX8_HD static V Step(V g, V* m, const Consts& c) {
    m[0] = g * g + m[0];
    return Select(m[0] > 0.0f, 1.0f / Sqrt(m[0] + c.eps), V(0.0f)) * g;
  }
};

struct Ademamix {
  static constexpr int kMoments = 3;
  static constexpr bool kSigned[kMoments] = {true, true, false};
  static constexpr int kFlags = 0;
  static constexpr const char* kName = "ademamix";
  static constexpr int kNumScalars = 8;
  static constexpr const char* kScalarNames = "b1 b2 b3 alpha eps eps_root bc1 bc2";
  struct Consts {
    float b1, b2, b3, one_minus_b1, one_minus_b2, one_minus_b3, alpha, eps, eps_root, inv_bc1, inv_bc2;
  };
  OPTAX8_HD static Consts Prepare(const float* s) {
    return {s[0], s[1], s[2], 1.0f - s[0], 1.0f - s[1], 1.0f - s[2], s[3], s[4], s[5], 1.0f / s[6], 1.0f / s[7]};
  }
  template <int kF, class V>
  OPTAX8_HD static V Step(V g, V* m, const Consts& c) {
    m[0] = c.one_minus_b1 * g + c.b1 * m[0];
    m[1] = c.one_minus_b3 * g + c.b3 * m[1];
    m[2] = c.one_minus_b2 * (g * g) + c.b2 * m[2];
    const V numerator = m[0] * c.inv_bc1 + c.alpha * m[1];
    return numerator / (Sqrt(m[2] * c.inv_bc2 + c.eps_root) + c.eps);
  }
};

// The families by number, in update_math.FAMILIES' order: visit(F{}) for family `id`; false
// for an unknown number.
inline constexpr int kNumFamilies = 6;

template <class Visit>
bool VisitFamily(int id, Visit&& visit) {  // host code only
  switch (id) {
    case 0: return visit(Adam{}), true;
    case 1: return visit(Momentum{}), true;
    case 2: return visit(Lion{}), true;
    case 3: return visit(Rmsprop{}), true;
    case 4: return visit(Adagrad{}), true;
    case 5: return visit(Ademamix{}), true;
    default: return false;
  }
}

template <int kValue>
struct FlagsTag {
  static constexpr int value = kValue;
};

// visit(FlagsTag<flags>{}) when `flags` is a subset of F's flags and the common ones, so that a
// kernel is instantiated for each subset; false otherwise.
template <class F, int kFlags = 0, class Visit>
bool VisitFlags(int flags, Visit&& visit) {  // host code only
  if constexpr (kFlags > kAllFlags) {
    return false;
  } else if constexpr ((kFlags & ~(F::kFlags | kCommonFlags)) == 0) {
    if (flags == kFlags) return visit(FlagsTag<kFlags>{}), true;
    return VisitFlags<F, kFlags + 1>(flags, visit);
  } else {
    return VisitFlags<F, kFlags + 1>(flags, visit);
  }
}

// Bit k: moment k of family F uses the signed map.
template <class F>
constexpr uint32_t SignedMaskOf() {
  uint32_t mask = 0;
  for (int k = 0; k < F::kMoments; ++k) mask |= F::kSigned[k] ? 1u << k : 0u;
  return mask;
}

// The scalar forms of what GuardedStep needs; vector types overload them (optax8_avx2.h, ...).
// Finiteness is a bit mask, all ones for a finite x, and masking clears bits, so that scalar
// loops stay free of branches and the compiler vectorizes them.
// Device code keeps them as predicates instead, which chain: one comparison per check.
#if defined(__CUDA_ARCH__)
OPTAX8_HD bool Finite(float x) { return fabsf(x) < INFINITY; }
OPTAX8_HD float Masked(float x, bool keep) { return keep ? x : 0.0f; }
#else
OPTAX8_HD uint32_t Finite(float x) { return (FloatToBits(x) & 0x7F800000u) != 0x7F800000u ? ~0u : 0u; }
OPTAX8_HD float Masked(float x, uint32_t keep) { return BitsToFloat(FloatToBits(x) & keep); }
#endif
// Whether x is neither ±0 nor subnormal (so NaN and infinities are), from its bits. XLA:CPU
// computes with subnormals as zeros, XLA:GPU and compilers' bit tricks do not; at the smallest
// normal magnitude every one of them agrees on the answer.
OPTAX8_HD bool NonZero(float x) { return (FloatToBits(x) & 0x7FFFFFFFu) >= 0x00800000u; }

// One element's step (or one vector's, V), with every path's policy for what is not finite: a
// non-finite gradient element, or a moment that the step makes non-finite, resets the
// element's moments to +0 and gives it a zero update. The gradient needs no check of its own:
// every family's every new moment adds a multiple of g (or of g * g), and c * inf or c * NaN is
// never finite, not even for c = 0, so a non-finite g makes every new moment non-finite
// (tests/test_native.py checks the resets for each family). Under kSkipZeros an element whose
// gradient is zero (±0, or subnormal: NonZero) keeps its moments and gets a zero update; the
// others mark `touched`. m holds the decoded moments and receives the new ones.
template <class F, int kFlags, class V, class M>
OPTAX8_HD V GuardedStep(V g, V (&m)[F::kMoments], const typename F::Consts& consts, M& touched) {
  constexpr int K = F::kMoments;
  V old[K];
  for (int k = 0; k < K; ++k) old[k] = m[k];
  V update = F::template Step<kFlags>(g, m, consts);
  if constexpr ((kFlags & kSkipZeros) != 0) {
    const auto nonzero = NonZero(g);  // NaN too, which resets below
    touched = touched | nonzero;
    for (int k = 0; k < K; ++k) m[k] = Select(nonzero, m[k], old[k]);
    update = Select(nonzero, update, V(0.0f));
  }
  auto keep = Finite(m[0]);
  for (int k = 1; k < K; ++k) keep = keep & Finite(m[k]);
  for (int k = 0; k < K; ++k) m[k] = Masked(m[k], keep);
  return Masked(update, keep);
}

// The fused apply step's per-step scalars (kApply; they follow the family's in hp), and its two
// per-element formulas, optax's operations in optax's order: clip_by_global_norm's
// g / norm * max_norm before the step (clip_norm = clip_max = 1 where it does not clip: the same
// bits, so callers may skip it), then add_decayed_weights, scale_by_learning_rate and
// apply_updates on the float32 update u.
struct ApplyScalars {
  float clip_norm, clip_max, step_size, weight_decay;

  OPTAX8_HD static ApplyScalars Of(const float* s) { return {s[0], s[1], s[2], s[3]}; }
  OPTAX8_HD bool Clips() const { return !(clip_norm == 1.0f && clip_max == 1.0f); }
};

OPTAX8_HD float ClipGradient(float g, const ApplyScalars& a) { return g / a.clip_norm * a.clip_max; }

OPTAX8_HD float AppliedParameter(float p, float u, const ApplyScalars& a) {
  return p + a.step_size * (u + a.weight_decay * p);
}

OPTAX8_ISA_NAMESPACE_END
}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_MATH_H_
