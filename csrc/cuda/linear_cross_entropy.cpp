// CUDA glue for the linear cross-entropy ops: the argument checks shared with the CPU
// (common/linear_cross_entropy_op.h), the device guard, and registration. The computation is
// the blocked cut cross-entropy built from cuBLAS matmuls and ATen ops per vocabulary block
// (common/linear_cross_entropy_aten.h), on the current stream, with no host synchronization.
// Hand-written tensor-core kernels (mma.sync / wgmma) that keep the logits in registers are
// not written yet; filter_eps is accepted and ignored here.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "common/linear_cross_entropy_aten.h"
#include "common/linear_cross_entropy_op.h"
#include "cuda/glue.h"

namespace fastloss::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& classifier,
                                                        const at::Tensor& targets,
                                                        const c10::optional<at::Tensor>& bias, int64_t ignore_index,
                                                        double softcap, double label_smoothing, double z_loss,
                                                        double /*filter_eps: autograd only*/) {
  const char* op = "linear_cross_entropy";
  check_cuda(op, "hidden", hidden);
  const LinearCrossEntropyArgs args =
      linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap, label_smoothing, z_loss, 0, -1);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  return aten_impl::forward(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                            args);
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_shard(const at::Tensor& hidden, const at::Tensor& classifier,
                                                              const at::Tensor& targets,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t ignore_index, double softcap,
                                                              double label_smoothing, int64_t vocab_start,
                                                              int64_t vocab_total) {
  const char* op = "linear_cross_entropy_shard";
  check_cuda(op, "hidden", hidden);
  const LinearCrossEntropyArgs args = linear_cross_entropy_args(op, hidden, classifier, targets, bias, softcap,
                                                                label_smoothing, 0.0, vocab_start, vocab_total);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  return aten_impl::statistics(op, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& classifier, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lse, int64_t ignore_index, double softcap, double label_smoothing, double z_loss,
    double filter_eps, std::array<bool, 3> output_mask, int64_t vocab_start, int64_t vocab_total) {
  const char* op = "linear_cross_entropy_backward";
  check_cuda(op, "hidden", hidden);
  const LinearCrossEntropyArgs args =
      linear_cross_entropy_backward_args(op, grad_loss, grad_lse, hidden, classifier, targets, bias, lse, softcap,
                                         label_smoothing, z_loss, filter_eps, vocab_start, vocab_total);
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  return aten_impl::backward(grad_loss, grad_lse, hidden, classifier, targets, bias, lse, ignore_index, softcap,
                             label_smoothing, z_loss, output_mask, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy);
  m.impl("linear_cross_entropy_shard", &linear_cross_entropy_shard);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}

}  // namespace fastloss::cuda
