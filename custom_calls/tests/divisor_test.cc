// Checks optax8_job.h's Divisor, the CUDA block walk's division by per-call constants, against
// the division operator, run by tests/test_native.py: for divisors 1 to 4096 and the powers of
// two and their neighbours up to 2^31, every dividend up to 2^16, a stride of dividends across
// the whole range, and the range's last few. Prints one line per failure and exits non-zero if
// there was any.
#include <cstdint>
#include <cstdio>

#include "optax8_job.h"

namespace {

long Check(uint32_t d) {
  const optax8::Divisor divisor = optax8::Divisor::Of(d);
  long failures = 0;
  auto check = [&](uint32_t n) {
    if (divisor.Divide(n) != n / d) {
      if (failures < 3) std::printf("%u / %u: %u, not %u\n", n, d, divisor.Divide(n), n / d);
      ++failures;
    }
  };
  for (uint32_t n = 0; n <= 0xFFFFu; ++n) check(n);
  for (uint64_t n = 0; n <= optax8::Divisor::kMaxDividend; n += 65521) check(static_cast<uint32_t>(n));
  for (uint32_t n = optax8::Divisor::kMaxDividend - 4096; n < optax8::Divisor::kMaxDividend; ++n) check(n);
  check(optax8::Divisor::kMaxDividend);
  // Just below and at each multiple of d near the top of the range.
  const uint32_t top = optax8::Divisor::kMaxDividend / d * d;
  check(top);
  if (top > 0) check(top - 1);
  return failures;
}

}  // namespace

int main() {
  long failures = 0;
  for (uint32_t d = 1; d <= 4096; ++d) failures += Check(d);
  for (int e = 12; e <= 31; ++e) {
    const uint32_t p = 1u << e;
    failures += Check(p - 1) + Check(p) + (e < 31 ? Check(p + 1) : 0);
  }
  failures += Check(optax8::Divisor::kMaxDividend);
  std::printf("%ld failures\n", failures);
  return failures == 0 ? 0 : 1;
}
