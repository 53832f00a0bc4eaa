// The fused 8-bit optimizer update for XLA:CPU, as one XLA FFI handler.
//
// One call updates one parameter: it reads the gradient and each moment's codes and absmax
// once, and writes the update and the new codes and absmax once. The block walk is
// optax8_cpu_blocks.h's, compiled once per instruction set (optax8_cpu_isa.cc); this unit,
// compiled for the baseline set, validates the call (optax8_ffi.h), picks the best set this CPU
// runs once per process (or the one OPTAX8_CPU_ISA names: scalar, avx2, avx512; auto is the
// default), and splits the blocks into chunks on XLA's CPU thread pool. Blocks are independent,
// so the result depends neither on the number of threads nor on the instruction set.
//
// Operands, results and attributes are described in optax8_ffi.h. The Python side aliases
// each result to its operand, so the update runs in place. A non-finite gradient element, or a
// moment that overflows, resets that element's moments to 0 and gives it a zero update, as the
// reference does.
#include <algorithm>
#include <cctype>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "optax8_ffi.h"
#include "optax8_job.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OPTAX8_X86 1
#endif

// Each instruction set's block walk (optax8_cpu_isa.cc).
extern "C" {
bool Optax8CpuBlocks_scalar(const optax8::Job*, int64_t, int64_t, float*);
#if defined(OPTAX8_CPU_AVX2_UNIT)
bool Optax8CpuBlocks_avx2(const optax8::Job*, int64_t, int64_t, float*);
#endif
#if defined(OPTAX8_CPU_AVX512_UNIT)
bool Optax8CpuBlocks_avx512(const optax8::Job*, int64_t, int64_t, float*);
#endif
}

namespace ffi = xla::ffi;

namespace optax8 {
namespace {

// About this many elements per task: large enough to amortise scheduling, small enough to
// balance the threads.
constexpr int64_t kChunkElements = 1 << 14;

// XLA:CPU computes with denormals flushed to zero (inputs and results); so does the kernel,
// for the duration of a task, so that it produces the same bits.
class ScopedFlushDenormals {
 public:
  ScopedFlushDenormals() {
#if defined(OPTAX8_X86)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ | DAZ
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ | (uint64_t{1} << 24)));  // FZ
#endif
  }
  ~ScopedFlushDenormals() {
#if defined(OPTAX8_X86)
    _mm_setcsr(saved_);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  ScopedFlushDenormals(const ScopedFlushDenormals&) = delete;
  ScopedFlushDenormals& operator=(const ScopedFlushDenormals&) = delete;

 private:
#if defined(OPTAX8_X86)
  unsigned saved_;
#else
  uint64_t saved_ = 0;
#endif
};

using BlocksFn = bool (*)(const Job*, int64_t, int64_t, float*);

// The instruction set the kernel runs with: the best one this CPU has, or the one
// OPTAX8_CPU_ISA names; `problem` says why that one cannot run ("" when it can).
struct Isa {
  const char* name;
  BlocksFn blocks;
  std::string problem;
};

// OPTAX8_CPU_ISA's value, read as OPTAX8_IMPLEMENTATION is: case and surrounding space ignored,
// "auto" when unset or empty.
std::string RequestedIsa() {
  const char* env = std::getenv("OPTAX8_CPU_ISA");
  std::string value = env == nullptr ? "" : env;
  const size_t first = value.find_first_not_of(" \t\n\r"), last = value.find_last_not_of(" \t\n\r");
  value = first == std::string::npos ? "auto" : value.substr(first, last - first + 1);
  for (char& c : value) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return value;
}

const Isa& ChosenIsa() {
  static const Isa chosen = [] {
    struct Candidate {
      const char* name;
      BlocksFn blocks;
      bool runs;
    };
#if defined(OPTAX8_X86)
    __builtin_cpu_init();
#endif
    const Candidate candidates[] = {
#if defined(OPTAX8_CPU_AVX512_UNIT)
        {"avx512", &Optax8CpuBlocks_avx512,
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vbmi")},
#endif
#if defined(OPTAX8_CPU_AVX2_UNIT)
        {"avx2", &Optax8CpuBlocks_avx2, static_cast<bool>(__builtin_cpu_supports("avx2"))},
#endif
        {"scalar", &Optax8CpuBlocks_scalar, true},
    };
    const std::string requested = RequestedIsa();
    for (const Candidate& c : candidates) {
      if (requested == "auto" ? c.runs : requested == c.name) {
        return Isa{c.name, c.blocks, c.runs ? "" : std::string("OPTAX8_CPU_ISA=") + c.name + " but this CPU lacks it"};
      }
    }
    std::string known;
    for (const Candidate& c : candidates) known += std::string(known.empty() ? "" : ", ") + c.name;
    return Isa{"", nullptr, "OPTAX8_CPU_ISA=" + requested + " is not one of auto, " + known + " (this build)"};
  }();
  return chosen;
}

// Per-thread scratch for the block walk.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(floats)) buffer.resize(floats);
  return buffer.data();
}

// Runs chunks [0, chunks) on the calling thread and up to num_threads - 1 pool tasks. The
// caller waits only for the chunks to finish, never for a task to start, so a busy or
// single-threaded pool cannot deadlock it; tasks that start late find no work and touch
// nothing but the shared state they own.
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> work) {
  struct Shared {
    std::function<void(int64_t)> work;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto shared = std::make_shared<Shared>();
  shared->work = std::move(work);
  shared->chunks = chunks;
  auto drain = [](Shared& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.chunks; i = s.next.fetch_add(1)) {
      s.work(i);
      if (s.done.fetch_add(1) + 1 == s.chunks) {
        std::lock_guard<std::mutex> lock(s.mutex);
        s.finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, drain] { drain(*shared); });
  drain(*shared);
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == chunks; });
}

ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::Buffer<ffi::F32> hp, ffi::RemainingArgs state,
                      ffi::Result<ffi::AnyBuffer> update, ffi::RemainingRets new_state, std::string_view family,
                      int64_t block_size, int64_t flags, int64_t signed_mask) {
  const Isa& isa = ChosenIsa();
  if (!isa.problem.empty()) return ffi::Error::InvalidArgument("optax8: " + isa.problem);
  Job job{};
  ffi::Error checked = PrepareJob(g, hp, state, update, new_state, family, block_size, flags, signed_mask, &job);
  if (checked.failure()) return checked;

  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkElements / block_size);
  const int64_t chunks = (job.total_blocks + chunk_blocks - 1) / chunk_blocks;
  std::atomic<bool> ran{true};
  ParallelFor(pool, chunks, [&job, &isa, &ran, chunk_blocks](int64_t chunk) {
    ScopedFlushDenormals flush;
    const int64_t begin = chunk * chunk_blocks;
    const int64_t end = std::min(job.total_blocks, begin + chunk_blocks);
    if (!isa.blocks(&job, begin, end, Scratch(kScratchBlocks * job.block_size))) ran = false;
  });
  if (!ran) {
    return ffi::Error::Internal("optax8: the " + std::string(isa.name) + " block walk does not know " +
                                std::string(family));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace optax8

// Exported with default visibility: the library is built with hidden symbols otherwise.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* Optax8CpuUpdate(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optax8CpuUpdate, optax8::UpdateImpl, optax8::BindUpdate<xla::ffi::ThreadPool>());

// The XLA FFI API version this library was compiled against, major * 1000 + minor.
extern "C" __attribute__((visibility("default"))) int Optax8FfiApiVersion() {
  return XLA_FFI_API_MAJOR * 1000 + XLA_FFI_API_MINOR;
}

// The instruction set the kernel runs with, or "error: " and why it cannot run.
extern "C" __attribute__((visibility("default"))) const char* Optax8CpuIsa() {
  static const std::string answer =
      optax8::ChosenIsa().problem.empty() ? optax8::ChosenIsa().name : "error: " + optax8::ChosenIsa().problem;
  return answer.c_str();
}

// The families, scalars and flags this library was built with (optax8_ffi.h's Contract).
extern "C" __attribute__((visibility("default"))) const char* Optax8CpuContract() {
  static const std::string contract = optax8::Contract();
  return contract.c_str();
}
