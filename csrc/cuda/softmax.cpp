// CUDA glue for the two-pass softmax / log-softmax ops: the argument checks shared with the
// CPU (common/softmax_op.h), allocation through torch's caching allocator (output and the
// split-row workspace), the current stream, and registration. The kernels are torch-free
// (kernels/softmax.cu), so they also compile where torch has no CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/softmax_op.h"
#include "cuda/glue.h"
#include "kernels/softmax.cuh"

namespace fastloss::cuda {
namespace {

using kernels::DType;

template <bool kLog>
at::Tensor forward(const at::Tensor& self, int64_t dim, bool half_to_float) {
  const char* op = kLog ? "log_softmax" : "softmax";
  check_cuda(op, "self", self);
  const SoftmaxArgs args = softmax_forward_args(op, self, dim, half_to_float);
  const c10::cuda::OptionalCUDAGuard guard(self.device());
  if (args.layout.size == 1) return singleton_softmax(self, args.out_dtype, kLog);
  const at::Tensor x = self.contiguous();
  at::Tensor y = at::empty(self.sizes(), self.options().dtype(args.out_dtype));
  if (y.numel() == 0) return y;
  const RowLayout& l = args.layout;
  const DType in = kernel_dtype(x.scalar_type());
  const DType out = kernel_dtype(args.out_dtype);
  const size_t ws_bytes = kernels::softmax_forward_workspace_bytes(l.outer, l.size, l.inner, in, out);
  at::Tensor ws = workspace(ws_bytes, x);
  C10_CUDA_CHECK(kernels::launch_softmax_forward(x.const_data_ptr(), in, y.mutable_data_ptr(), out,
                                                 l.outer, l.size, l.inner, kLog, data_or_null(ws),
                                                 ws_bytes, c10::cuda::getCurrentCUDAStream()));
  return y;
}

template <bool kLog>
at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                    c10::ScalarType input_dtype) {
  const char* op = kLog ? "log_softmax_backward" : "softmax_backward";
  check_cuda(op, "grad_output", grad_output);
  check_cuda(op, "output", output);
  const RowLayout l = softmax_backward_args(op, grad_output, output, dim, input_dtype);
  const c10::cuda::OptionalCUDAGuard guard(output.device());
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor y = output.contiguous();
  at::Tensor dx = at::empty(output.sizes(), output.options().dtype(input_dtype));
  if (dx.numel() == 0) return dx;
  const DType out = kernel_dtype(output.scalar_type());
  const DType in = kernel_dtype(input_dtype);
  const size_t ws_bytes = kernels::softmax_backward_workspace_bytes(l.outer, l.size, l.inner, out, in);
  at::Tensor ws = workspace(ws_bytes, y);
  C10_CUDA_CHECK(kernels::launch_softmax_backward(
      g.const_data_ptr(), y.const_data_ptr(), out, dx.mutable_data_ptr(), in, l.outer, l.size,
      l.inner, kLog, data_or_null(ws), ws_bytes, c10::cuda::getCurrentCUDAStream()));
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("softmax", &forward<false>);
  m.impl("log_softmax", &forward<true>);
  m.impl("softmax_backward", &backward<false>);
  m.impl("log_softmax_backward", &backward<true>);
}

}  // namespace fastloss::cuda
