// The CPU kernel's block walk (optax8_cpu_blocks.h) for one instruction set: CMake compiles this
// unit once per set, with the set's compiler flags and OPTAX8_ISA naming it (scalar, avx2,
// avx512), and optax8_cpu.cc calls the entry point of the best set this CPU runs.
#if !defined(OPTAX8_ISA)
#error "compile with -DOPTAX8_ISA=scalar, avx2 or avx512"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VBMI__)
#include "optax8_avx512.h"
#define OPTAX8_VECTORS optax8::Avx512
#elif defined(__AVX2__)
#include "optax8_avx2.h"
#define OPTAX8_VECTORS optax8::Avx2
#else
#define OPTAX8_VECTORS optax8::NoVectors
#endif
#include "optax8_cpu_blocks.h"

#define OPTAX8_CONCAT_(a, b) a##b
#define OPTAX8_CONCAT(a, b) OPTAX8_CONCAT_(a, b)

// Updates blocks [begin, end) of job; false for a family or flags this build does not know.
extern "C" bool OPTAX8_CONCAT(Optax8CpuBlocks_, OPTAX8_ISA)(const optax8::Job* job, int64_t begin, int64_t end,
                                                           float* scratch) {
  return optax8::RunBlocks<OPTAX8_VECTORS>(*job, begin, end, scratch);
}
