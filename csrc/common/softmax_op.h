// Argument handling shared by the CPU and CUDA implementations of the softmax ops, so both
// devices accept and reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>

#include "common/torch_checks.h"

namespace fastloss {

struct SoftmaxArgs {
  RowLayout layout;
  c10::ScalarType out_dtype;
};

inline SoftmaxArgs softmax_forward_args(const char* op, const at::Tensor& self, int64_t dim,
                                        bool half_to_float) {
  check_floating(op, "self", self);
  const int64_t wrapped = wrap_dim(op, dim, self.dim());
  const auto in = self.scalar_type();
  TORCH_CHECK(!half_to_float || in == c10::kHalf || in == c10::kBFloat16, "fastloss.", op,
              ": 'half_to_float' needs a float16 or bfloat16 'self', got ", in);
  return {row_layout(self, wrapped), half_to_float ? c10::kFloat : in};
}

// Softmax over a dimension of size 1: exactly 1 (log-softmax 0), NaN for a NaN or infinite
// entry, as torch gives; the kernels' p * (1 / p) is 1 only to within an ulp.
inline at::Tensor singleton_softmax(const at::Tensor& self, c10::ScalarType out_dtype, bool log) {
  return self.new_full(self.sizes(), log ? 0.0 : 1.0, self.options().dtype(out_dtype))
      .masked_fill_(self.isfinite().logical_not(), std::numeric_limits<double>::quiet_NaN());
}

// grad_output and output share a dtype; the gradient has input_dtype, which is either that
// dtype or, after a half_to_float forward, float16/bfloat16 with float32 output.
inline RowLayout softmax_backward_args(const char* op, const at::Tensor& grad_output,
                                       const at::Tensor& output, int64_t dim,
                                       c10::ScalarType input_dtype) {
  check_floating(op, "grad_output", grad_output);
  check_floating(op, "output", output);
  check_like(op, "grad_output", grad_output, "output", output);
  const auto out = output.scalar_type();
  TORCH_CHECK(input_dtype == out ||
                  (out == c10::kFloat && (input_dtype == c10::kHalf || input_dtype == c10::kBFloat16)),
              "fastloss.", op, ": 'input_dtype' must be the output dtype (", out,
              ") or float16/bfloat16 for a float32 output, got ", input_dtype);
  return row_layout(output, wrap_dim(op, dim, output.dim()));
}

}  // namespace fastloss
