// One thread's time per element of the CPU kernel's block walk on each instruction set this
// CPU runs, against a loop that reads and writes the same bytes in place; benchmarks/cpu_kernel.py
// builds and runs it. Arguments: elements, rounds. Prints one line per case:
//   <isa> <family> <unfused|fused> <kernel ns/elem> <same-bytes loop ns/elem>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "optax8_job.h"

extern "C" {
bool Optax8CpuBlocks_scalar(const optax8::Job*, int64_t, int64_t, float*);
bool Optax8CpuBlocks_avx2(const optax8::Job*, int64_t, int64_t, float*);
bool Optax8CpuBlocks_avx512(const optax8::Job*, int64_t, int64_t, float*);
}

namespace {

using Blocks = bool (*)(const optax8::Job*, int64_t, int64_t, float*);
using Clock = std::chrono::steady_clock;

struct Family {
  const char* name;
  int id, moments, scalars;
  float hp[7];
};

// Adam's and momentum's scalars as update_math.py orders them (b1 b2 eps eps_root bc1 bc2
// bc1_next; decay), at some step.
constexpr Family kFamilies[] = {{"adam", 0, 2, 7, {0.9f, 0.999f, 1e-8f, 0.0f, 0.5f, 0.01f, 0.6f}},
                                {"momentum", 1, 1, 1, {0.9f}}};

double Median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// In place, the bytes the kernel moves, in one pass with the kernel's prefetch distance: the
// gradient (read; written unless fused), the parameter (fused: read and written) and each
// moment's codes (read and written), eight elements at a time.
__attribute__((noinline)) void SameBytes(float* g, float* p, uint8_t* const* codes, int moments, int64_t n,
                                         bool fused) {
  constexpr int64_t kAhead = 512;
  for (int64_t i = 0; i < n; i += 8) {
    if (i % 16 == 0 && i + kAhead < n) {
      __builtin_prefetch(g + i + kAhead, 1, 3);
      if (fused) __builtin_prefetch(p + i + kAhead, 1, 3);
      if (i % 64 == 0) {
        for (int k = 0; k < moments; ++k) __builtin_prefetch(codes[k] + i + kAhead, 1, 3);
      }
    }
    for (int q = 0; q < 8; ++q) {
      if (fused) {
        p[i + q] += g[i + q];
      } else {
        g[i + q] *= 0.5f;
      }
    }
    for (int k = 0; k < moments; ++k) {
      uint64_t eight;
      std::memcpy(&eight, codes[k] + i, sizeof(eight));
      eight ^= 0x0101010101010101u;
      std::memcpy(codes[k] + i, &eight, sizeof(eight));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : int64_t{1} << 24;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 9;
  constexpr int64_t kRow = 4096, kBlock = 256;
  if (n <= 0 || n % kRow != 0 || rounds < 1) {
    std::fprintf(stderr, "elements must be a positive multiple of %lld, rounds positive\n",
                 static_cast<long long>(kRow));
    return 2;
  }
  __builtin_cpu_init();
  struct Isa {
    const char* name;
    Blocks blocks;
    bool runs;
  };
  const Isa isas[] = {
      {"avx512", Optax8CpuBlocks_avx512,
       __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vbmi")},
      {"avx2", Optax8CpuBlocks_avx2, static_cast<bool>(__builtin_cpu_supports("avx2"))},
      {"scalar", Optax8CpuBlocks_scalar, true},
  };
  const int64_t blocks = n / kBlock;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1e-2f);
  std::vector<float> g0(n), g(n), p(n, 0.5f);
  for (float& x : g0) x = normal(rng);
  std::vector<uint8_t> codes[2];
  std::vector<float> absmax[2];
  for (int k = 0; k < 2; ++k) {
    codes[k].resize(n);
    for (uint8_t& c : codes[k]) c = static_cast<uint8_t>(rng());
    absmax[k].assign(blocks, 1e-2f);
  }
  std::vector<float> scratch(optax8::kScratchBlocks * kBlock);
  _mm_setcsr(_mm_getcsr() | 0x8040u);  // flush denormals, as the library's kernel does
  for (const Isa& isa : isas) {
    if (!isa.runs) continue;
    for (const Family& family : kFamilies) {
      for (const bool fused : {false, true}) {
        // The fused step's scalars follow the family's: clip_norm clip_max step_size weight_decay.
        float hp[7 + optax8::kApplyScalars] = {};
        std::memcpy(hp, family.hp, sizeof(family.hp));
        const float apply[optax8::kApplyScalars] = {1.0f, 1.0f, -1e-3f, 0.0f};
        std::memcpy(hp + family.scalars, apply, sizeof(apply));
        optax8::Job job{};
        job.family = family.id;
        job.dtype = job.param_dtype = optax8::ElementType::kF32;
        job.g = g.data();
        job.update = fused ? static_cast<void*>(p.data()) : g.data();
        job.param = fused ? p.data() : nullptr;
        job.hp = hp;
        job.hp_stride = family.scalars + (fused ? optax8::kApplyScalars : 0);
        job.row_length = kRow;
        job.row_blocks = kRow / kBlock;
        job.block_size = kBlock;
        job.rows_per_group = n / kRow;
        job.total_blocks = blocks;
        uint8_t* code_pointers[2];
        for (int k = 0; k < family.moments; ++k) {
          job.moments[k] = {codes[k].data(), absmax[k].data(), codes[k].data(), absmax[k].data()};
          code_pointers[k] = codes[k].data();
        }
        std::vector<double> kernel, loop;
        for (int r = 0; r <= rounds; ++r) {  // round 0 warms up
          std::memcpy(g.data(), g0.data(), n * sizeof(float));
          const auto t0 = Clock::now();
          if (!isa.blocks(&job, 0, blocks, scratch.data())) return 1;
          const auto t1 = Clock::now();
          SameBytes(g.data(), p.data(), code_pointers, family.moments, n, fused);
          const auto t2 = Clock::now();
          if (r == 0) continue;
          kernel.push_back(std::chrono::duration<double>(t1 - t0).count() * 1e9 / n);
          loop.push_back(std::chrono::duration<double>(t2 - t1).count() * 1e9 / n);
        }
        std::printf("%s %s %s %.4f %.4f\n", isa.name, family.name, fused ? "fused" : "unfused", Median(kernel),
                    Median(loop));
      }
    }
  }
  return 0;
}
