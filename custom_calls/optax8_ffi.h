// The XLA FFI side shared by the CPU and CUDA handlers: the families by name, their flag
// subsets, and the validation of a call's operands into a plain description of the work.
//
// Both handlers take the same operands: g (f32, bf16 or f16, rank >= 1), hp (f32[..., K]: the
// family's K per-step scalars; leading dims batch the rows of g under vmap), then codes
// (u8[g.shape]) and absmax (f32[g.shape[:-1] + (blocks,)]) of each moment. Results: the update
// (g's dtype and shape), then the new codes and absmax of each moment. Attributes: family
// (optax8_math.h's family names, in lower case), block_size, flags (the Flag bits) and signed
// (bit k: moment k uses the signed map).
#ifndef OPTAX8_CUSTOM_CALLS_OPTAX8_FFI_H_
#define OPTAX8_CUSTOM_CALLS_OPTAX8_FFI_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "optax8_math.h"
#include "xla/ffi/api/ffi.h"

namespace optax8 {

constexpr int kMaxMoments = 3;

struct MomentBuffers {
  const uint8_t* codes;
  const float* absmax;
  uint8_t* new_codes;
  float* new_absmax;
};

// One call's work, described by plain pointers and sizes.
struct Job {
  xla::ffi::DataType dtype;
  const void* g;
  void* update;
  const float* hp;
  int64_t row_length;      // the last axis
  int64_t row_blocks;      // blocks per row
  int64_t block_size;
  int64_t rows_per_group;  // rows sharing one hp vector
  int64_t total_blocks;
  MomentBuffers moments[kMaxMoments];
};

// Calls visit(F{}) for the family F called `name`; false for an unknown name.
template <class Visit>
bool VisitFamily(std::string_view name, Visit&& visit) {
  if (name == "adam") return visit(Adam{}), true;
  if (name == "momentum") return visit(Momentum{}), true;
  if (name == "lion") return visit(Lion{}), true;
  if (name == "rmsprop") return visit(Rmsprop{}), true;
  if (name == "adagrad") return visit(Adagrad{}), true;
  if (name == "ademamix") return visit(Ademamix{}), true;
  return false;
}

// Calls visit(std::integral_constant<int, flags>{}) when `flags` is a subset of F's flags and
// the common ones, so that a kernel can be instantiated for each subset; false otherwise.
template <class F, int kFlags = 0, class Visit>
bool VisitFlags(int64_t flags, Visit&& visit) {
  if constexpr (kFlags > kAllFlags) {
    return false;
  } else if constexpr ((kFlags & ~(F::kFlags | kCommonFlags)) == 0) {
    if (flags == kFlags) return visit(std::integral_constant<int, kFlags>{}), true;
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

inline bool SameDims(xla::ffi::Span<const int64_t> a, xla::ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Checks the call's operands and results against family F's layout and describes them in job.
template <class F>
xla::ffi::Error DescribeJob(xla::ffi::AnyBuffer g, xla::ffi::Buffer<xla::ffi::F32> hp, xla::ffi::RemainingArgs state,
                            xla::ffi::Result<xla::ffi::AnyBuffer> update, xla::ffi::RemainingRets new_state,
                            std::string_view family, int64_t block_size, int64_t signed_mask, Job* job) {
  namespace ffi = xla::ffi;
  constexpr int K = F::kMoments;
  if (signed_mask != SignedMaskOf<F>()) return ffi::Error::InvalidArgument("optax8: wrong maps for " + std::string(family));
  if (state.size() != 2 * static_cast<size_t>(K) || new_state.size() != state.size()) {
    return ffi::Error::InvalidArgument("optax8: wrong number of state buffers");
  }
  const ffi::DataType dtype = g.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) {
    return ffi::Error::InvalidArgument("optax8: the gradient must be float32, bfloat16 or float16");
  }
  const auto dims = g.dimensions();
  if (dims.size() == 0 || block_size <= 0) return ffi::Error::InvalidArgument("optax8: bad rank or block size");
  if (update->element_type() != dtype || !SameDims(update->dimensions(), dims)) {
    return ffi::Error::InvalidArgument("optax8: the update must match the gradient");
  }
  const int64_t row_length = dims.back();
  const int64_t elements = static_cast<int64_t>(g.element_count());
  const int64_t rows = row_length == 0 ? 0 : elements / row_length;
  const int64_t row_blocks = (row_length + block_size - 1) / block_size;
  std::vector<int64_t> absmax_dims(dims.begin(), dims.end());
  absmax_dims.back() = row_blocks;
  const ffi::Span<const int64_t> expected(absmax_dims.data(), absmax_dims.size());

  *job = Job{dtype, g.untyped_data(), update->untyped_data(), hp.typed_data(), row_length, row_blocks, block_size,
             1, rows * row_blocks, {}};
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
  const int64_t groups = static_cast<int64_t>(hp.element_count()) / F::kNumScalars;
  const auto hp_dims = hp.dimensions();
  if (hp_dims.size() == 0 || hp_dims.back() != F::kNumScalars || groups == 0 || rows % groups != 0) {
    return ffi::Error::InvalidArgument("optax8: hyperparameters must have shape [..., " +
                                       std::to_string(F::kNumScalars) + "] batching the gradient's rows");
  }
  job->rows_per_group = rows / groups;
  return ffi::Error::Success();
}

// Checks and describes a call (as DescribeJob) of the family called `family`, and calls
// pick(F{}, std::integral_constant<int, flags>{}) so that the handler can choose its kernel.
template <class Pick>
xla::ffi::Error PrepareJob(xla::ffi::AnyBuffer g, xla::ffi::Buffer<xla::ffi::F32> hp, xla::ffi::RemainingArgs state,
                           xla::ffi::Result<xla::ffi::AnyBuffer> update, xla::ffi::RemainingRets new_state,
                           std::string_view family, int64_t block_size, int64_t flags, int64_t signed_mask, Job* job,
                           Pick&& pick) {
  namespace ffi = xla::ffi;
  bool flags_supported = false;
  ffi::Error checked = ffi::Error::Success();
  const bool known = VisitFamily(family, [&](auto family_tag) {
    using F = decltype(family_tag);
    flags_supported = VisitFlags<F>(flags, [&](auto flags_tag) { pick(family_tag, flags_tag); });
    checked = DescribeJob<F>(g, hp, state, update, new_state, family, block_size, signed_mask, job);
  });
  if (!known) return ffi::Error::InvalidArgument("optax8: unknown family " + std::string(family));
  if (!flags_supported) return ffi::Error::InvalidArgument("optax8: flags not supported by " + std::string(family));
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
