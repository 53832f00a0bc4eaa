// The fused 8-bit optimizer update for XLA:GPU (CUDA), as one XLA FFI handler.
//
// The operands, results, attributes and their validation are optax8_ffi.h's, shared with the
// CPU kernel (optax8_cpu.cc), and so are the per-block results: for each quantization block,
// decode the moments, run the family's float32 math (optax8_math.h, compiled here for the
// device), take the new absmax and re-encode. The codes and absmax equal the CPU kernel's bit
// for bit, given the same inputs and no subnormal floats (XLA:CPU flushes those to zero,
// XLA:GPU does not).
//
// The kernel itself is optax8_cuda_kernel.cuh's.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "optax8_cuda_kernel.cuh"
#include "optax8_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace optax8 {
namespace {

template <class F, int kFlags, class T, class P>
cudaError_t Launch(cudaStream_t stream, const Job& job) {
  constexpr size_t kShared = kSharedTableBytes<F>;
  const auto kernel = &UpdateKernel<F, kFlags, T, P>;
  int device = 0;
  int processors = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
  // More than 48 KiB of dynamic shared memory takes an opt-in, which is per device.
  if (status == cudaSuccess && kShared > 48 * 1024) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kShared));
  }
  if (status != cudaSuccess) return status;
  // Thread blocks resident per multiprocessor: the persistent grid fills them once.
  static const int resident = [kernel] {
    int blocks = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, kShared) == cudaSuccess
               ? std::max(blocks, 1)
               : 1;
  }();
  const Walk walk = WalkOf<F>(job);
  const int64_t needed = (job.total_blocks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t grid = std::min<int64_t>(needed, static_cast<int64_t>(resident) * processors);
  kernel<<<static_cast<unsigned>(grid), kThreads, kShared, stream>>>(job, walk);
  return cudaGetLastError();
}

// Validates the call (optax8_ffi.h, as the CPU handler does), then launches on XLA's stream.
ffi::Error UpdateImpl(cudaStream_t stream, ffi::AnyBuffer g, ffi::Buffer<ffi::F32> hp, ffi::RemainingArgs state,
                      ffi::Result<ffi::AnyBuffer> update, ffi::RemainingRets new_state, std::string_view family,
                      int64_t block_size, int64_t flags, int64_t signed_mask) {
  Job job{};
  ffi::Error checked = PrepareJob(g, hp, state, update, new_state, family, block_size, flags, signed_mask, &job);
  if (checked.failure()) return checked;
  if (job.total_blocks == 0) return ffi::Error::Success();
  if (job.total_blocks > Divisor::kMaxDividend) {
    return ffi::Error::InvalidArgument("optax8: a tensor of more than 2^31 quantization blocks; use a larger block_size");
  }

  cudaError_t status = cudaSuccess;
  VisitKernel(job, [&](auto family, auto flags, auto* type, auto* param_type) {
    status = Launch<decltype(family), decltype(flags)::value, std::remove_pointer_t<decltype(type)>,
                    std::remove_pointer_t<decltype(param_type)>>(stream, job);
  });
  if (status != cudaSuccess) {
    // The error may also come from earlier asynchronous work on this device.
    return ffi::Error::Internal(std::string("optax8: CUDA kernel launch failed: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace optax8

// Exported with default visibility: the library is built with hidden symbols otherwise.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* Optax8CudaUpdate(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optax8CudaUpdate, optax8::UpdateImpl,
                              optax8::BindUpdate<xla::ffi::PlatformStream<cudaStream_t>>());

// The XLA FFI API version this library was compiled against, major * 1000 + minor.
extern "C" __attribute__((visibility("default"))) int Optax8CudaFfiApiVersion() {
  return XLA_FFI_API_MAJOR * 1000 + XLA_FFI_API_MINOR;
}

// The families, scalars and flags this library was built with (optax8_ffi.h's Contract).
extern "C" __attribute__((visibility("default"))) const char* Optax8CudaContract() {
  static const std::string contract = optax8::Contract();
  return contract.c_str();
}
