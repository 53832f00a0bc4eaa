// Runs the CUDA kernel's own code (optax8_cuda_kernel.cuh) on the host and checks its results
// against the CPU kernel's scalar block walk (optax8_cpu_isa.cc built with OPTAX8_ISA=scalar,
// linked in), bit for bit: the update (or, under the fused apply step, the new parameter), the
// new codes and the new absmax, for every family, every subset of its flags, each gradient
// dtype, with and without the apply step, in place and not, over shapes that take the
// contiguous path, the strided one, blocks longer than a warp's chunk, several hyperparameter
// groups and more blocks than the grid has warps. Run by tests/test_native.py.
//
// cuda_emulation/ holds the stand-ins for the CUDA headers. Each thread of a launch is a fiber;
// the thread blocks run one after another, their threads in a shuffled order between warp
// operations. A warp operation completes once all 32 lanes have reached one of the same kind
// with the full mask, and __syncthreads once the whole block has; any other arrival (a lane that
// exits while the rest wait, a mix of operations, a deadlock) is reported as a failure, as CUDA
// leaves it undefined. Shared memory is poisoned before each thread block. Without FTZ on
// either side, both compute IEEE float32, subnormals included.
//
// Prints one line per failing case (at most a few), a summary, and "<n> failures" last.
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_runtime.h"  // cuda_emulation/'s, which include every standard header the kernel needs

#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#include "optax8_cuda_kernel.cuh"

extern "C" bool Optax8CpuBlocks_scalar(const optax8::Job*, int64_t, int64_t, float*);

namespace optax8 {
DeviceTables kSharedTables[1];
}  // namespace optax8

namespace cuda_emulation {
namespace {

struct Thread {
  dim3 thread_index, block_index;
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  Op op = Op::kNone;
  unsigned mask = 0;
  uint32_t value = 0;
  int source = 0;
  uint32_t result = 0;
};

constexpr size_t kStackBytes = 256 * 1024;
ucontext_t scheduler;
Thread* running = nullptr;
dim3 grid;
const std::function<void()>* body = nullptr;

void Start() {
  (*body)();
  running->done = true;  // uc_link resumes the scheduler
}

// Completes the warp operation that all 32 lanes wait at; "" or why it cannot.
std::string CompleteWarpOperation(Thread* lanes) {
  const Op op = lanes[0].op;
  for (int i = 0; i < 32; ++i) {
    if (lanes[i].op != op || lanes[i].mask != 0xFFFFFFFFu) return "a warp's lanes wait at different warp operations";
  }
  uint32_t combined = 0;
  for (int i = 0; i < 32; ++i) {
    if (op == Op::kReduceMax) combined = std::max(combined, lanes[i].value);
    if (op == Op::kAny) combined |= lanes[i].value;
  }
  for (int i = 0; i < 32; ++i) {
    if (op == Op::kShuffle) {
      if (lanes[i].source < 0 || lanes[i].source >= 32) return "a shuffle from a lane outside the warp";
      lanes[i].result = lanes[lanes[i].source].value;
    } else {
      lanes[i].result = combined;
    }
  }
  for (int i = 0; i < 32; ++i) lanes[i].op = Op::kNone;
  return "";
}

}  // namespace

const dim3& ThreadIndex() { return running->thread_index; }
const dim3& BlockIndex() { return running->block_index; }
const dim3& GridSize() { return grid; }

uint32_t Arrive(Op op, unsigned mask, uint32_t value, int source) {
  Thread* self = running;
  self->op = op;
  self->mask = mask;
  self->value = value;
  self->source = source;
  swapcontext(&self->context, &scheduler);
  return self->result;
}

// Runs `kernel` on each thread of `blocks` thread blocks of `threads` threads (a multiple of 32),
// calling before_block() before each block's first thread starts. "" or what went wrong.
std::string Launch(unsigned blocks, unsigned threads, const std::function<void()>& kernel,
                   const std::function<void()>& before_block, std::mt19937_64& rng) {
  grid.x = blocks;
  body = &kernel;
  std::vector<Thread> block(threads);
  for (Thread& t : block) t.stack.reset(new char[kStackBytes]);
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  for (unsigned b = 0; b < blocks; ++b) {
    before_block();
    for (unsigned i = 0; i < threads; ++i) {
      Thread& t = block[i];
      t.thread_index.x = i;
      t.block_index.x = b;
      t.done = false;
      t.op = Op::kNone;
      getcontext(&t.context);
      t.context.uc_stack.ss_sp = t.stack.get();
      t.context.uc_stack.ss_size = kStackBytes;
      t.context.uc_link = &scheduler;
      makecontext(&t.context, Start, 0);
    }
    for (;;) {
      std::shuffle(order.begin(), order.end(), rng);
      for (unsigned i : order) {
        if (block[i].done || block[i].op != Op::kNone) continue;
        running = &block[i];
        swapcontext(&scheduler, &block[i].context);
      }
      running = nullptr;
      unsigned exited = 0, at_barrier = 0;
      for (const Thread& t : block) {
        exited += t.done;
        at_barrier += !t.done && t.op == Op::kSyncThreads;
      }
      if (exited == threads) break;
      bool progressed = false;
      for (unsigned w = 0; w < threads; w += 32) {
        unsigned waiting = 0, gone = 0;
        for (unsigned i = w; i < w + 32; ++i) {
          gone += block[i].done;
          waiting += !block[i].done && block[i].op != Op::kSyncThreads;
        }
        if (waiting == 0) continue;
        if (gone > 0) return "a lane exited while the rest of its warp waits at a warp operation";
        if (waiting < 32) continue;
        const std::string problem = CompleteWarpOperation(&block[w]);
        if (!problem.empty()) return problem;
        progressed = true;
      }
      if (at_barrier > 0 && exited > 0) return "a thread exited while the rest of its block waits at __syncthreads";
      if (at_barrier == threads) {
        for (Thread& t : block) t.op = Op::kNone;
        progressed = true;
      }
      if (!progressed) return "deadlock: the threads wait at operations that cannot complete";
    }
  }
  return "";
}

}  // namespace cuda_emulation

namespace {

using optax8::ElementType;
using optax8::Job;

// A family's per-step scalars: plausible values, varied by hyperparameter group.
std::vector<float> Scalars(int family, int group) {
  const float t = 3.0f + group;
  const float b1 = 0.9f - 0.05f * group, b2 = 0.999f - 0.01f * group;
  switch (family) {
    case 0: {
      const float bc1 = 1.0f - std::pow(b1, t), bc2 = 1.0f - std::pow(b2, t);
      return {b1, b2, 1e-8f, group % 2 ? 1e-12f : 0.0f, bc1, bc2, 1.0f - std::pow(b1, t + 1)};
    }
    case 1: return {b1};
    case 2: return {b1, 0.99f - 0.01f * group};
    case 3: return {b1, 1e-6f, 1.0f - std::pow(b1, t)};
    case 4: return {1e-10f};
    default: {
      const float b3 = 0.9999f - 0.001f * group;
      return {b1, b2, b3, 5.0f, 1e-8f, 0.0f, 1.0f - std::pow(b1, t), 1.0f - std::pow(b2, t)};
    }
  }
}

struct Shape {
  int64_t rows, row_length, block_size, groups;
};

// Contiguous whole blocks; row tails; rows starting off a multiple of 8 (strided); small blocks;
// blocks of 512 and 2048 (longer than a chunk); a group per row; a tiny tensor; and more blocks
// than the emulated grid's 16 warps.
constexpr Shape kShapes[] = {
    {4, 512, 256, 1}, {3, 264, 256, 3}, {2, 260, 256, 2}, {5, 100, 64, 1}, {2, 1100, 512, 2},
    {1, 2048, 2048, 1}, {7, 256, 256, 7}, {1, 3, 256, 1}, {40, 256, 256, 4},
};

struct Case {
  int family, flags;
  ElementType dtype, param_dtype;  // the gradient's; the parameter's (dtype or, under apply, kF32)
  bool apply, in_place, offset;    // offset: the gradient, update and parameter start one element in
  Shape shape;
  uint64_t seed;
};

std::string Describe(const Case& c) {
  static const char* const kFamilies[] = {"adam", "momentum", "lion", "rmsprop", "adagrad", "ademamix"};
  static const char* const kDtypes[] = {"f32", "bf16", "f16"};
  char text[256];
  std::snprintf(text, sizeof(text),
                "%s flags=%d %s param=%s apply=%d in_place=%d offset=%d shape=(%lld, %lld) block=%lld groups=%lld",
                kFamilies[c.family], c.flags, kDtypes[static_cast<int>(c.dtype)],
                kDtypes[static_cast<int>(c.param_dtype)], c.apply, c.in_place, c.offset,
                static_cast<long long>(c.shape.rows), static_cast<long long>(c.shape.row_length),
                static_cast<long long>(c.shape.block_size), static_cast<long long>(c.shape.groups));
  return text;
}

size_t ElementBytes(ElementType dtype) { return dtype == ElementType::kF32 ? 4 : 2; }

// The values' bytes as dtype, rounded to nearest even.
std::vector<uint8_t> Encoded(const std::vector<float>& values, ElementType dtype) {
  std::vector<uint8_t> bytes(values.size() * ElementBytes(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == ElementType::kF32) {
      std::memcpy(&bytes[4 * i], &values[i], 4);
    } else {
      const uint16_t h =
          dtype == ElementType::kBF16 ? __float2bfloat16_rn(values[i]).bits : __float2half_rn(values[i]).bits;
      std::memcpy(&bytes[2 * i], &h, 2);
    }
  }
  return bytes;
}

// One implementation's buffers for a case: inputs, and outputs (the inputs themselves in place).
struct Buffers {
  std::vector<uint8_t> g, param, update;
  std::vector<uint8_t> codes[optax8::kMaxMoments], new_codes[optax8::kMaxMoments];
  std::vector<float> absmax[optax8::kMaxMoments], new_absmax[optax8::kMaxMoments];
  std::vector<float> hp;
};

struct Inputs {
  std::vector<uint8_t> g, param;
  std::vector<uint8_t> codes[optax8::kMaxMoments];
  std::vector<float> absmax[optax8::kMaxMoments];
  std::vector<float> hp;
};

Inputs MakeInputs(const Case& c, int moments, int stride) {
  std::mt19937_64 rng(c.seed);
  const int64_t n = c.shape.rows * c.shape.row_length, pad = c.offset ? 1 : 0;
  const int64_t blocks = c.shape.rows * ((c.shape.row_length + c.shape.block_size - 1) / c.shape.block_size);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const float scale = std::pow(10.0f, -3.0f * uniform(rng));
  std::vector<float> g(n + pad), p(n + pad);
  for (int64_t i = 0; i < n + pad; ++i) {
    const float u = uniform(rng);
    g[i] = u < 0.05f ? 0.0f : normal(rng) * scale;
    if (u > 0.998f) g[i] = u > 0.999f ? INFINITY : NAN;
    p[i] = normal(rng) * 0.1f;
  }
  // One all-zero block (for skip_zeros) where there are several.
  if (blocks > 2) std::fill(g.begin() + pad, g.begin() + pad + std::min(c.shape.block_size, c.shape.row_length), 0.0f);
  Inputs in;
  in.g = Encoded(g, c.dtype);
  in.param = Encoded(p, c.param_dtype);
  for (int k = 0; k < moments; ++k) {
    in.codes[k].resize(n);
    for (auto& code : in.codes[k]) code = static_cast<uint8_t>(rng());
    in.absmax[k].resize(blocks);
    for (auto& a : in.absmax[k]) a = uniform(rng) < 0.1f ? 0.0f : 1e-3f + uniform(rng);
  }
  for (int64_t group = 0; group < c.shape.groups; ++group) {
    std::vector<float> s = Scalars(c.family, static_cast<int>(group));
    if (c.apply) {
      const bool clips = group % 2 == 1;
      s.insert(s.end(), {clips ? 2.5f : 1.0f, 1.0f, -1e-3f * (1 + group), group % 3 == 2 ? 0.01f : 0.0f});
    }
    if (static_cast<int>(s.size()) != stride) std::abort();
    in.hp.insert(in.hp.end(), s.begin(), s.end());
  }
  return in;
}

// The job for one implementation's copy of the inputs; outputs poisoned with `poison`.
Job MakeJob(const Case& c, int moments, int stride, const Inputs& in, uint8_t poison, Buffers& b) {
  const size_t pad = c.offset ? ElementBytes(c.dtype) : 0, param_pad = c.offset ? ElementBytes(c.param_dtype) : 0;
  b.g = in.g;
  b.param = in.param;
  b.hp = in.hp;
  // The first result has the parameter's dtype under apply, the gradient's otherwise.
  b.update.assign(c.apply ? in.param.size() : in.g.size(), poison);
  const size_t update_pad = c.apply ? param_pad : pad;
  Job job{};
  job.family = c.family;
  job.flags = c.flags;
  job.dtype = c.dtype;
  job.param_dtype = c.param_dtype;
  job.g = b.g.data() + pad;
  job.param = c.apply ? b.param.data() + param_pad : nullptr;
  job.update = (c.in_place ? (c.apply ? b.param.data() : b.g.data()) : b.update.data()) + update_pad;
  job.hp = b.hp.data();
  job.hp_stride = stride;
  job.row_length = c.shape.row_length;
  job.row_blocks = (c.shape.row_length + c.shape.block_size - 1) / c.shape.block_size;
  job.block_size = c.shape.block_size;
  job.rows_per_group = c.shape.rows / c.shape.groups;
  job.total_blocks = c.shape.rows * job.row_blocks;
  for (int k = 0; k < moments; ++k) {
    b.codes[k] = in.codes[k];
    b.absmax[k] = in.absmax[k];
    b.new_codes[k].assign(in.codes[k].size(), poison);
    b.new_absmax[k].assign(in.absmax[k].size(), -static_cast<float>(poison));
    job.moments[k] = {b.codes[k].data(), b.absmax[k].data(), c.in_place ? b.codes[k].data() : b.new_codes[k].data(),
                      c.in_place ? b.absmax[k].data() : b.new_absmax[k].data()};
  }
  return job;
}

// The bytes an implementation wrote: the update or parameter, then each moment's codes and absmax.
std::vector<uint8_t> Results(const Case& c, int moments, const Buffers& b) {
  std::vector<uint8_t> out = c.in_place ? (c.apply ? b.param : b.g) : b.update;
  for (int k = 0; k < moments; ++k) {
    const auto& codes = c.in_place ? b.codes[k] : b.new_codes[k];
    const auto& absmax = c.in_place ? b.absmax[k] : b.new_absmax[k];
    out.insert(out.end(), codes.begin(), codes.end());
    const auto* a = reinterpret_cast<const uint8_t*>(absmax.data());
    out.insert(out.end(), a, a + absmax.size() * sizeof(float));
  }
  return out;
}

// The emulated CUDA kernel on `job`, over a grid of two thread blocks (16 warps); `aligned` says
// whether the walk found its buffers aligned for the contiguous path. "" or why the run failed.
std::string RunEmulated(const Job& job, std::mt19937_64& rng, bool& aligned) {
  std::string problem = "no kernel for the job";
  optax8::VisitKernel(job, [&](auto family, auto flags, auto* type, auto* param_type) {
    using F = decltype(family);
    using T = std::remove_pointer_t<decltype(type)>;
    using P = std::remove_pointer_t<decltype(param_type)>;
    const optax8::Walk walk = optax8::WalkOf<F>(job);
    aligned = walk.aligned;
    const std::function<void()> kernel = [&] { optax8::UpdateKernel<F, decltype(flags)::value, T, P>(job, walk); };
    const std::function<void()> poison = [] {
      std::memset(optax8::kSharedTables, 0xFF, sizeof(optax8::kSharedTables));
    };
    problem = cuda_emulation::Launch(2, optax8::kThreads, kernel, poison, rng);
  });
  return problem;
}

}  // namespace

int main() {
  std::vector<Case> cases;
  uint64_t seed = 1;
  for (int family = 0; family < optax8::kNumFamilies; ++family) {
    optax8::VisitFamily(family, [&](auto tag) {
      using F = decltype(tag);
      for (int flags = 0; flags <= optax8::kAllFlags; ++flags) {
        if (!optax8::VisitFlags<F>(flags, [](auto) {})) continue;
        for (ElementType dtype : {ElementType::kF32, ElementType::kBF16, ElementType::kF16}) {
          // The update; the fused apply step on a parameter of the gradient's dtype, and (for a 16-bit
          // gradient) of float32.
          const std::pair<bool, ElementType> kinds[] = {{false, dtype}, {true, dtype}, {true, ElementType::kF32}};
          for (int kind = 0; kind < (dtype == ElementType::kF32 ? 2 : 3); ++kind) {
            const auto [apply, param_dtype] = kinds[kind];
            for (const Shape& shape : kShapes) {
              // In place and aligned, as XLA calls it; out of place; and one element off alignment.
              cases.push_back({family, flags, dtype, param_dtype, apply, true, false, shape, seed++});
              cases.push_back({family, flags, dtype, param_dtype, apply, false, false, shape, seed++});
              if (shape.row_length % 8 == 0) {
                cases.push_back({family, flags, dtype, param_dtype, apply, true, true, shape, seed++});
              }
            }
          }
        }
      }
    });
  }

  std::mt19937_64 rng(12345);
  long failures = 0, aligned_cases = 0;
  for (const Case& c : cases) {
    int moments = 0, stride = 0;
    optax8::VisitFamily(c.family, [&](auto tag) {
      using F = decltype(tag);
      moments = F::kMoments;
      stride = F::kNumScalars + (c.apply ? optax8::kApplyScalars : 0);
    });
    const Inputs inputs = MakeInputs(c, moments, stride);
    Buffers cpu, cuda;
    const Job cpu_job = MakeJob(c, moments, stride, inputs, 0xA5, cpu);
    const Job cuda_job = MakeJob(c, moments, stride, inputs, 0x5A, cuda);
    std::vector<float> scratch(optax8::kScratchBlocks * c.shape.block_size);
    if (!Optax8CpuBlocks_scalar(&cpu_job, 0, cpu_job.total_blocks, scratch.data())) std::abort();
    bool aligned = false;
    const std::string problem = RunEmulated(cuda_job, rng, aligned);
    aligned_cases += aligned;
    const std::vector<uint8_t> want = Results(c, moments, cpu), got = Results(c, moments, cuda);
    std::string mismatch = problem;
    if (mismatch.empty()) {
      const auto where = std::mismatch(want.begin(), want.end(), got.begin());
      if (where.first != want.end()) {
        mismatch = "results differ from the CPU kernel's at byte " + std::to_string(where.first - want.begin()) +
                   " of " + std::to_string(want.size());
      }
    }
    if (!mismatch.empty()) {
      if (failures < 8) std::printf("%s: %s\n", Describe(c).c_str(), mismatch.c_str());
      ++failures;
    }
  }
  std::printf("%zu cases, %ld on aligned buffers\n%ld failures\n", cases.size(), aligned_cases, failures);
  return failures == 0 ? 0 : 1;
}
