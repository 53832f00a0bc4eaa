// The XLA FFI side shared by the CPU and CUDA handlers: the families by name, their flag
// subsets, and the validation of a call's operands into a plain description of the work.
//
// Both handlers take the same operands: g (f32, bf16 or f16, rank >= 1), hp (f32[..., K]: the
// family's K per-step scalars; leading dims batch the rows of g under vmap), then codes
// (u8[g.shape]) and absmax (f32[g.shape[:-1] + (blocks,)]) of each moment. Results: the update
// (g's dtype and shape), then the new codes and absmax of each moment. Attributes: family
// (optax8_math.h's family names, in lower case), block_size, flags (the Flag bits) and signed
// (bit k: moment k uses the signed map). Under the kApply flag (the fused apply step) the
// parameter (g's shape; g's dtype or f32) follows the state, hp holds kApplyScalars more
// scalars, and the first result is the new parameter (the parameter's dtype) instead of the update.
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_FFI_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_FFI_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "optax8_job.h"
#include "optax8_math.h"
#include "xla/ffi/api/ffi.h"

namespace optax8 {

// The number of the family called `name` (VisitFamily's), or -1.
inline int FamilyNumber(std::string_view name) {
  for (int id = 0; id < kNumFamilies; ++id) {
    bool same = false;
    VisitFamily(id, [&](auto family) { same = name == decltype(family)::kName; });
    if (same) return id;
  }
  return -1;
}

// What a library was built with, as text that optax8 compares with update_math.kernel_contract():
// the flag bits, then per family its name, scalars, flags and maps.
inline std::string Contract() {
  std::string text = "flags";
  for (int k = 0; k < kNumFlags; ++k) text += std::string(" ") + kFlagNames[k] + "=" + std::to_string(1 << k);
  for (int id = 0; id < kNumFamilies; ++id) {
    VisitFamily(id, [&](auto family) {
      using F = decltype(family);
      text += std::string("; ") + F::kName + "(" + F::kScalarNames + ") flags=" + std::to_string(F::kFlags) +
              " signed=";
      for (int k = 0; k < F::kMoments; ++k) text += F::kSigned[k] ? "1" : "0";
    });
  }
  return text + "; apply(" + kApplyScalarNames + ")";
}

inline bool SameDims(xla::ffi::Span<const int64_t> a, xla::ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// One of the kernels' element types (F32, BF16 or F16).
inline ElementType ElementTypeOf(xla::ffi::DataType dtype) {
  return dtype == xla::ffi::DataType::BF16  ? ElementType::kBF16
         : dtype == xla::ffi::DataType::F16 ? ElementType::kF16
                                            : ElementType::kF32;
}

// Checks the call's operands and results against family F's layout and describes them in job.
template <class F>
xla::ffi::Error DescribeJob(xla::ffi::AnyBuffer g, xla::ffi::Buffer<xla::ffi::F32> hp, xla::ffi::RemainingArgs state,
                            xla::ffi::Result<xla::ffi::AnyBuffer> update, xla::ffi::RemainingRets new_state,
                            std::string_view family, int64_t block_size, int64_t signed_mask, Job* job) {
  namespace ffi = xla::ffi;
  constexpr int K = F::kMoments;
  const bool apply = (job->flags & kApply) != 0;
  if (signed_mask != SignedMaskOf<F>()) return ffi::Error::InvalidArgument("optax8: wrong maps for " + std::string(family));
  if (state.size() != 2 * static_cast<size_t>(K) + (apply ? 1 : 0) || new_state.size() != 2 * static_cast<size_t>(K)) {
    return ffi::Error::InvalidArgument("optax8: wrong number of state buffers");
  }
  const ffi::DataType dtype = g.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) {
    return ffi::Error::InvalidArgument("optax8: the gradient must be float32, bfloat16 or float16");
  }
  const auto dims = g.dimensions();
  if (dims.size() == 0 || block_size <= 0) return ffi::Error::InvalidArgument("optax8: bad rank or block size");
  const int64_t row_length = dims.back();
  const int64_t elements = static_cast<int64_t>(g.element_count());
  const int64_t rows = row_length == 0 ? 0 : elements / row_length;
  const int64_t row_blocks = (row_length + block_size - 1) / block_size;
  std::vector<int64_t> absmax_dims(dims.begin(), dims.end());
  absmax_dims.back() = row_blocks;
  const ffi::Span<const int64_t> expected(absmax_dims.data(), absmax_dims.size());

  const void* param = nullptr;
  ffi::DataType param_dtype = dtype;
  if (apply) {
    auto p = state.get<ffi::AnyBuffer>(2 * K);
    if (p.has_error() || !SameDims(p->dimensions(), dims) ||
        (p->element_type() != dtype && p->element_type() != ffi::DataType::F32)) {
      return ffi::Error::InvalidArgument("optax8: the parameter must have the gradient's shape, and its dtype or float32");
    }
    param = p->untyped_data();
    param_dtype = p->element_type();
  }
  // The first result: the update (the gradient's dtype), or the new parameter (the parameter's).
  if (update->element_type() != param_dtype || !SameDims(update->dimensions(), dims)) {
    return ffi::Error::InvalidArgument(apply ? "optax8: the new parameter must match the parameter"
                                             : "optax8: the update must match the gradient");
  }
  const int64_t hp_stride = F::kNumScalars + (apply ? kApplyScalars : 0);
  *job = Job{job->family, job->flags & ~kApply, ElementTypeOf(dtype), ElementTypeOf(param_dtype), g.untyped_data(),
             update->untyped_data(), param,
             hp.typed_data(), hp_stride, row_length, row_blocks, block_size, 1, rows * row_blocks, {}};
  for (int k = 0; k < K; ++k) {
    auto codes = state.get<ffi::Buffer<ffi::U8>>(2 * k);
    auto absmax = state.get<ffi::Buffer<ffi::F32>>(2 * k + 1);
    auto new_codes = new_state.get<ffi::Buffer<ffi::U8>>(2 * k);
    auto new_absmax = new_state.get<ffi::Buffer<ffi::F32>>(2 * k + 1);
    if (codes.has_error() || absmax.has_error() || new_codes.has_error() || new_absmax.has_error()) {
      return ffi::Error::InvalidArgument("optax8: state buffers must be uint8 codes and float32 absmax");
    }
    if (!SameDims(codes->dimensions(), dims) || !SameDims((*new_codes)->dimensions(), dims) ||
        !SameDims(absmax->dimensions(), expected) || !SameDims((*new_absmax)->dimensions(), expected)) {
      return ffi::Error::InvalidArgument("optax8: state shapes do not match the gradient");
    }
    job->moments[k] = {codes->typed_data(), absmax->typed_data(), (*new_codes)->typed_data(),
                       (*new_absmax)->typed_data()};
  }
  const int64_t groups = static_cast<int64_t>(hp.element_count()) / hp_stride;
  const auto hp_dims = hp.dimensions();
  if (hp_dims.size() == 0 || hp_dims.back() != hp_stride || groups == 0 || rows % groups != 0) {
    return ffi::Error::InvalidArgument("optax8: hyperparameters must have shape [..., " +
                                       std::to_string(hp_stride) + "] batching the gradient's rows");
  }
  job->rows_per_group = rows / groups;
  return ffi::Error::Success();
}

// Checks and describes a call (as DescribeJob) of the family called `family` with `flags`.
inline xla::ffi::Error PrepareJob(xla::ffi::AnyBuffer g, xla::ffi::Buffer<xla::ffi::F32> hp,
                                  xla::ffi::RemainingArgs state, xla::ffi::Result<xla::ffi::AnyBuffer> update,
                                  xla::ffi::RemainingRets new_state, std::string_view family, int64_t block_size,
                                  int64_t flags, int64_t signed_mask, Job* job) {
  namespace ffi = xla::ffi;
  job->family = FamilyNumber(family);
  job->flags = static_cast<int32_t>(flags);
  if (job->family < 0) return ffi::Error::InvalidArgument("optax8: unknown family " + std::string(family));
  ffi::Error checked = ffi::Error::Success();
  VisitFamily(job->family, [&](auto family_tag) {
    using F = decltype(family_tag);
    if (flags < 0 || flags > (kAllFlags | kApply) || !VisitFlags<F>(static_cast<int>(flags & ~kApply), [](auto) {})) {
      checked = ffi::Error::InvalidArgument("optax8: flags not supported by " + std::string(family));
    } else {
      checked = DescribeJob<F>(g, hp, state, update, new_state, family, block_size, signed_mask, job);
    }
  });
  return checked;
}

// Binds the handler's signature: `Ctx` is the platform's context (thread pool, stream).
template <class Ctx>
auto BindUpdate() {
  return xla::ffi::Ffi::Bind()
      .Ctx<Ctx>()
      .template Arg<xla::ffi::AnyBuffer>()         // g
      .template Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // hp
      .RemainingArgs()                             // codes, absmax per moment
      .template Ret<xla::ffi::AnyBuffer>()         // update
      .RemainingRets()                             // new codes, absmax per moment
      .template Attr<std::string_view>("family")
      .template Attr<int64_t>("block_size")
      .template Attr<int64_t>("flags")
      .template Attr<int64_t>("signed");
}

}  // namespace optax8

#endif  // OPTAX8_CUSTOM_CALLS_OPTAX8_FFI_H_
