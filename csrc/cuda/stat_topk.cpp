// CUDA glue for the statistical top-k ops: the argument checks and output allocation shared
// with the CPU (common/stat_topk_op.h), the split-row workspace from torch's caching
// allocator, the current stream, and registration. Kernels: kernels/stat_topk.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/stat_topk_op.h"
#include "cuda/glue.h"
#include "kernels/stat_topk.cuh"

namespace fastloss::cuda {
namespace {

StatTopKResult stat_topk(const at::Tensor& input, int64_t dim, double sparsity, bool hard,
                         bool /*threshold_grad: autograd only*/, int64_t k) {
  const char* op = "stat_topk";
  check_cuda(op, "x", input);
  const StatTopKArgs args = stat_topk_forward_args(op, "x", input, dim, sparsity, k);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  StatTopKResult result = stat_topk_outputs(input, args);
  auto& [y, theta, mean, sd] = result;
  if (y.numel() == 0) return result;
  const at::Tensor x = input.contiguous();
  const RowLayout& l = args.layout;
  const DType dtype = kernel_dtype(input.scalar_type());
  const size_t ws_bytes = kernels::stat_topk_workspace_bytes(l.outer, l.size, l.inner, dtype);
  at::Tensor ws = workspace(ws_bytes, x);
  C10_CUDA_CHECK(kernels::launch_stat_topk_forward(
      x.const_data_ptr(), y.mutable_data_ptr(), theta.mutable_data_ptr(), mean.mutable_data_ptr(),
      sd.mutable_data_ptr(), dtype, l.outer, l.size, l.inner, args.z, hard, data_or_null(ws), ws_bytes,
      c10::cuda::getCurrentCUDAStream()));
  return result;
}

at::Tensor stat_topk_backward(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_theta,
                              const at::Tensor& input, const at::Tensor& theta_in, const at::Tensor& mean_in,
                              const at::Tensor& std_in, int64_t dim, double sparsity, bool hard,
                              bool threshold_grad, int64_t k) {
  const char* op = "stat_topk_backward";
  check_cuda(op, "x", input);
  const StatTopKArgs args =
      stat_topk_backward_args(op, grad_y, grad_theta, input, theta_in, mean_in, std_in, dim, sparsity, k);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  at::Tensor dx = at::empty(input.sizes(), input.options());
  if (dx.numel() == 0) return dx;
  const at::Tensor x = input.contiguous(), g = grad_y.contiguous();
  const at::Tensor theta = theta_in.contiguous(), mean = mean_in.contiguous(), sd = std_in.contiguous();
  const bool has_gt = is_given(grad_theta);
  const at::Tensor gt = has_gt ? grad_theta->contiguous() : at::Tensor();
  const RowLayout& l = args.layout;
  const DType dtype = kernel_dtype(input.scalar_type());
  const size_t ws_bytes = kernels::stat_topk_workspace_bytes(l.outer, l.size, l.inner, dtype);
  at::Tensor ws = workspace(ws_bytes, x);
  C10_CUDA_CHECK(kernels::launch_stat_topk_backward(
      g.const_data_ptr(), x.const_data_ptr(), theta.const_data_ptr(), mean.const_data_ptr(),
      sd.const_data_ptr(), has_gt ? gt.const_data_ptr() : nullptr, dx.mutable_data_ptr(), dtype, l.outer,
      l.size, l.inner, args.z, hard, threshold_grad, data_or_null(ws), ws_bytes,
      c10::cuda::getCurrentCUDAStream()));
  return dx;
}

StatTopKResult stat_topk_gelu_mul(const at::Tensor& gate_in, const at::Tensor& up_in, double sparsity,
                                  bool /*threshold_grad: autograd only*/, int64_t k) {
  const char* op = "stat_topk_gelu_mul";
  check_cuda(op, "gate", gate_in);
  const StatTopKArgs args = gelu_mul_args(op, gate_in, up_in, sparsity, k);
  const c10::cuda::OptionalCUDAGuard guard(gate_in.device());
  StatTopKResult result = stat_topk_outputs(gate_in, args);
  auto& [out, theta, mean, sd] = result;
  if (out.numel() == 0) return result;
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  const RowLayout& l = args.layout;
  const DType dtype = kernel_dtype(gate.scalar_type());
  const size_t ws_bytes = kernels::stat_topk_workspace_bytes(l.outer, l.size, 1, dtype);
  at::Tensor ws = workspace(ws_bytes, gate);
  C10_CUDA_CHECK(kernels::launch_gelu_mul_forward(
      gate.const_data_ptr(), up.const_data_ptr(), out.mutable_data_ptr(), theta.mutable_data_ptr(),
      mean.mutable_data_ptr(), sd.mutable_data_ptr(), dtype, l.outer, l.size, args.z, data_or_null(ws),
      ws_bytes, c10::cuda::getCurrentCUDAStream()));
  return result;
}

std::tuple<at::Tensor, at::Tensor> stat_topk_gelu_mul_backward(const at::Tensor& grad_out, const at::Tensor& gate_in,
                                                               const at::Tensor& up_in, const at::Tensor& theta_in,
                                                               const at::Tensor& mean_in, const at::Tensor& std_in,
                                                               double sparsity, bool threshold_grad, int64_t k) {
  const char* op = "stat_topk_gelu_mul_backward";
  check_cuda(op, "gate", gate_in);
  const StatTopKArgs args = gelu_mul_backward_args(op, grad_out, gate_in, up_in, theta_in, mean_in, std_in, sparsity, k);
  const c10::cuda::OptionalCUDAGuard guard(gate_in.device());
  at::Tensor dgate = at::empty(gate_in.sizes(), gate_in.options());
  at::Tensor dup = at::empty(gate_in.sizes(), gate_in.options());
  if (dgate.numel() == 0) return {dgate, dup};
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous(), g = grad_out.contiguous();
  const at::Tensor theta = theta_in.contiguous(), mean = mean_in.contiguous(), sd = std_in.contiguous();
  const RowLayout& l = args.layout;
  const DType dtype = kernel_dtype(gate.scalar_type());
  const size_t ws_bytes = kernels::stat_topk_workspace_bytes(l.outer, l.size, 1, dtype);
  at::Tensor ws = workspace(ws_bytes, gate);
  C10_CUDA_CHECK(kernels::launch_gelu_mul_backward(
      g.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(), theta.const_data_ptr(), mean.const_data_ptr(),
      sd.const_data_ptr(), dgate.mutable_data_ptr(), dup.mutable_data_ptr(), dtype, l.outer, l.size, args.z,
      threshold_grad, data_or_null(ws), ws_bytes, c10::cuda::getCurrentCUDAStream()));
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("stat_topk", &stat_topk);
  m.impl("stat_topk_backward", &stat_topk_backward);
  m.impl("stat_topk_gelu_mul", &stat_topk_gelu_mul);
  m.impl("stat_topk_gelu_mul_backward", &stat_topk_gelu_mul_backward);
}

}  // namespace fastloss::cuda
