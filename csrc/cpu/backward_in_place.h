// CPU backward entry points that the autograd glue calls directly (not ops): each writes its
// result over the output gradient, for a caller that owns it (autograd's gradient buffer,
// referenced nowhere else). No allocation, and no first-touch page faults of a fresh output.
// Each returns false (nothing written) where the gradient is not a contiguous CPU tensor of
// the result's dtype; bad arguments throw as the op does.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastloss::cpu {

// softmax_backward (log: log_softmax_backward); dx over grad_output.
bool softmax_backward_in_place(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                               c10::ScalarType input_dtype, bool log);

// stat_topk_backward; dx over grad_y.
bool stat_topk_backward_in_place(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_theta,
                                 const at::Tensor& input, const at::Tensor& theta, const at::Tensor& mean,
                                 const at::Tensor& std, int64_t dim, double sparsity, bool hard, bool threshold_grad,
                                 int64_t k);

// stat_topk_gelu_mul_backward; d up over grad_out, d gate returned (nullopt: not run).
std::optional<at::Tensor> stat_topk_gelu_mul_backward_in_place(const at::Tensor& grad_out, const at::Tensor& gate,
                                                               const at::Tensor& up, const at::Tensor& theta,
                                                               const at::Tensor& mean, const at::Tensor& std,
                                                               double sparsity, bool threshold_grad, int64_t k);

}  // namespace fastloss::cpu
