// Input validation and shape helpers shared by the CPU and CUDA torch glue (not by the
// torch-free kernels). Every message names the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace fastloss {

// An optional tensor argument was passed: a value that is a defined tensor (the dispatcher may
// hand either std::nullopt or an undefined tensor for None).
inline bool is_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "fastloss.", op, ": expected '", arg,
              "' to be a float32, float64, float16 or bfloat16 tensor, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "fastloss.", op, ": '", arg, "' and '", ref_arg,
              "' must be on the same device, got ", t.device(), " and ", ref.device());
}

// t has ref's shape, dtype and device.
inline void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastloss.", op, ": '", arg, "' must have the shape of '",
              ref_arg, "' ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastloss.", op, ": '", arg,
              "' must have the dtype of '", ref_arg, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
  check_same_device(op, arg, t, ref_arg, ref);
}

inline int64_t wrap_dim(const char* op, int64_t dim, int64_t ndim) {
  const int64_t rank = ndim == 0 ? 1 : ndim;  // a 0-d tensor behaves as one element along dim 0
  TORCH_CHECK_INDEX(dim >= -rank && dim < rank, "fastloss.", op, ": 'dim' out of range: expected ",
              "a value in [", -rank, ", ", rank - 1, "] for a ", ndim, "-d tensor, got ", dim);
  return dim < 0 ? dim + rank : dim;
}

// A tensor viewed as (outer, size, inner) around one dimension; contiguous memory.
struct RowLayout {
  int64_t outer = 1;
  int64_t size = 1;
  int64_t inner = 1;
};

inline RowLayout row_layout(const at::Tensor& t, int64_t dim) {
  RowLayout l;
  if (t.dim() == 0) return l;
  for (int64_t d = 0; d < dim; ++d) l.outer *= t.size(d);
  l.size = t.size(dim);
  for (int64_t d = dim + 1; d < t.dim(); ++d) l.inner *= t.size(d);
  return l;
}

}  // namespace fastloss
