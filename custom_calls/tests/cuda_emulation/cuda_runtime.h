// Host stand-ins for the parts of CUDA that optax8_cuda_kernel.cuh uses, so that
// cuda_kernel_emulation_test.cc can run the kernel's own code on the CPU: the qualifiers, the
// built-in indices, the vector types and the byte and warp intrinsics. Each thread of a launch
// runs as a fiber; a warp intrinsic or __syncthreads suspends it until every thread it involves
// has arrived (cuda_kernel_emulation_test.cc schedules them). Compiled with __CUDACC__ and
// __CUDA_ARCH__ defined, so that the shared headers take their device branches.
#ifndef OPTAX8_TESTS_CUDA_EMULATION_CUDA_RUNTIME_H_
#define OPTAX8_TESTS_CUDA_EMULATION_CUDA_RUNTIME_H_

// Every standard header the kernel's headers and the test use, before the qualifier macros
// below: the library's own headers spell attributes such as __noinline__.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __shared__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace cuda_emulation {
// The running thread's indices, and the launch's grid.
const dim3& ThreadIndex();
const dim3& BlockIndex();
const dim3& GridSize();
// Suspends the running thread at a warp-wide (or, for kSyncThreads, block-wide) operation until
// all the threads it involves have arrived; returns the operation's result for this thread.
enum class Op { kNone, kReduceMax, kAny, kShuffle, kSyncWarp, kSyncThreads };
uint32_t Arrive(Op op, unsigned mask, uint32_t value, int source);
}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::ThreadIndex())
#define blockIdx (::cuda_emulation::BlockIndex())
#define gridDim (::cuda_emulation::GridSize())

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// Byte i of the result is byte (selector nibble i) & 7 of the eight bytes y:x (x the low four).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned result = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned which = (selector >> (4 * i)) & 7u;
    result |= static_cast<unsigned>((bytes >> (8 * which)) & 0xFFu) << (8 * i);
  }
  return result;
}

inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  return cuda_emulation::Arrive(cuda_emulation::Op::kReduceMax, mask, value, 0);
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(cuda_emulation::Arrive(cuda_emulation::Op::kAny, mask, predicate != 0, 0));
}
inline float __shfl_sync(unsigned mask, float value, int source) {
  const uint32_t bits = cuda_emulation::Arrive(cuda_emulation::Op::kShuffle, mask, __float_as_uint(value), source);
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  cuda_emulation::Arrive(cuda_emulation::Op::kSyncWarp, mask, 0, 0);
}
inline void __syncthreads() { cuda_emulation::Arrive(cuda_emulation::Op::kSyncThreads, 0xFFFFFFFFu, 0, 0); }

#endif  // OPTAX8_TESTS_CUDA_EMULATION_CUDA_RUNTIME_H_
