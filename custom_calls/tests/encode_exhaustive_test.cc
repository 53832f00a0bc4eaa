// Exhaustive check of optax8_math.h's encoder, and of optax8_avx2.h's and optax8_avx512.h's
// when compiled for those instruction sets (-march=native), run by tests/test_native.py.
//
// Reads from stdin, as hexadecimal 32-bit patterns, the Python package's signed map, unsigned
// map, signed thresholds, unsigned thresholds, signed encode table and unsigned encode table
// (256, 256, 255, 255, 4096 and 8192 values), checks that the header holds the same tables, then checks that Encode matches the definition,
// "#{k : t[k] < x}, then the sign fix (signed map) or code 1 for a positive x counting no
// threshold (unsigned map)", for every float32 x of magnitude below 2 (a block's values over its
// absmax). Prints one line per failure and exits non-zero if there was any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "optax8_math.h"
#if defined(__AVX2__)
#include "optax8_avx2.h"
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VBMI__)
#define OPTAX8_TEST_AVX512 1
#include "optax8_avx512.h"
#endif

namespace {

template <class T>
int ReadAndCompare(const char* name, const T* header, int n) {
  int failures = 0;
  for (int i = 0; i < n; ++i) {
    unsigned bits = 0;
    if (std::scanf("%x", &bits) != 1) {
      std::printf("%s: input ended at entry %d\n", name, i);
      return failures + 1;
    }
    uint32_t ours = 0;
    std::memcpy(&ours, header + i, sizeof(ours));
    if (bits != ours) {
      std::printf("%s[%d]: header 0x%08x, python 0x%08x\n", name, i, ours, bits);
      ++failures;
    }
  }
  return failures;
}

// Floats in increasing order are the integers FromOrderKey(key) for increasing key.
float FromOrderKey(uint32_t key) { return optax8::BitsToFloat(key >> 31 ? key & 0x7FFFFFFFu : ~key); }

// The vector encoder S::Encode on the floats with order keys [key, run_end], S::kLanes at a
// time (a group past the run's end repeats its last float): how many do not encode to want.
template <class S, bool kSigned>
long CheckVectors(uint32_t key, uint32_t run_end, uint32_t want) {
  long bad = 0;
  for (uint64_t k = key; k <= run_end; k += S::kLanes) {
    float x[S::kLanes];
    for (uint64_t q = 0; q < S::kLanes; ++q) {
      x[q] = FromOrderKey(static_cast<uint32_t>(k + q <= run_end ? k + q : run_end));
    }
    uint8_t codes[S::kLanes];
    S::template Encode<kSigned>(S::Load(x), codes);
    for (int q = 0; q < S::kLanes; ++q) bad += codes[q] != want;
  }
  return bad;
}

// Splits (-2, 2) into runs of floats between consecutive thresholds, on one side of zero,
// where the definition gives one code, and compares Encode on every float of each run.
template <bool kSigned>
long CheckAllFloats(const float (&map)[256], const optax8::Thresholds& th) {
  using optax8::detail::OrderKey;
  long failures = 0;
  const uint32_t last = OrderKey(optax8::FloatToBits(0x1.fffffep0f));
  uint32_t key = OrderKey(optax8::FloatToBits(-0x1.fffffep0f));
  for (uint32_t below = 0; key <= last; ++below) {
    // This run: x > t[below - 1] and x <= t[below], split at the +0 / -0 boundary.
    uint32_t end = below < 255 ? OrderKey(optax8::FloatToBits(th.t[below])) : last;
    end = end > last ? last : end;
    while (key <= end) {
      // Runs end at -0 and at +0 (alone), where the sign rules change.
      const uint32_t run_end = key < 0x80000000u && end >= 0x80000000u ? 0x7FFFFFFFu : key == 0x80000000u ? key : end;
      const float first = FromOrderKey(key);
      uint32_t want = below;
      if (kSigned && std::signbit(map[want]) != std::signbit(first)) want = first > 0 ? want + 1 : want - 1;
      if (!kSigned && want == 0 && first > 0) want = 1;
      want &= 0xFFu;
      long bad = 0;
      for (uint32_t k = key; k <= run_end; ++k) bad += optax8::Encode<kSigned>(FromOrderKey(k)) != want;
#if defined(__AVX2__)
      bad += CheckVectors<optax8::Avx2, kSigned>(key, run_end, want);
#endif
#if defined(OPTAX8_TEST_AVX512)
      bad += CheckVectors<optax8::Avx512, kSigned>(key, run_end, want);
#endif
      if (bad != 0) {
        std::printf("%s map: %ld floats in [%a, %a] do not encode to %u\n", kSigned ? "signed" : "unsigned", bad,
                    static_cast<double>(first), static_cast<double>(FromOrderKey(run_end)), want);
      }
      failures += bad;
      key = run_end + 1;
    }
  }
  return failures;
}

}  // namespace

int main() {
  long failures = ReadAndCompare("signed map", optax8::kSignedMap, 256) +
                  ReadAndCompare("unsigned map", optax8::kUnsignedMap, 256) +
                  ReadAndCompare("signed thresholds", optax8::kSignedThresholds.t, 255) +
                  ReadAndCompare("unsigned thresholds", optax8::kUnsignedThresholds.t, 255) +
                  ReadAndCompare("signed encode table", optax8::kSignedEncode.entry, 2 * optax8::kRows << 6) +
                  ReadAndCompare("unsigned encode table", optax8::kUnsignedEncode.entry, 2 * optax8::kRows << 7);
  failures += CheckAllFloats<true>(optax8::kSignedMap, optax8::kSignedThresholds);
  failures += CheckAllFloats<false>(optax8::kUnsignedMap, optax8::kUnsignedThresholds);
  std::printf("encoders checked: scalar");
#if defined(__AVX2__)
  std::printf(" avx2");
#endif
#if defined(OPTAX8_TEST_AVX512)
  std::printf(" avx512");
#endif
  std::printf("\n%ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
