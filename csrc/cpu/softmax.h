// The CPU softmax entry point that the autograd glue calls directly (not an op).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastloss::cpu {

// The softmax (log: log-softmax) backward written over grad_output, for a caller that owns
// grad_output (autograd's gradient buffer, referenced nowhere else): no allocation, and no
// first-touch page faults of a fresh output. False (nothing written) where grad_output is
// not a contiguous CPU tensor of the input dtype; bad arguments throw as the op does.
bool softmax_backward_in_place(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                               c10::ScalarType input_dtype, bool log);

}  // namespace fastloss::cpu
