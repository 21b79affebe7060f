// CUDA glue for the von Mises-Fisher ops: the argument checks shared with the CPU
// (common/vmf_op.h), float16/bfloat16 computed in float32, allocation through torch's caching
// allocator, the current stream, and registration. The kernels are torch-free
// (kernels/vmf.cu), so they also compile where torch has no CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/vmf_op.h"
#include "cuda/glue.h"
#include "kernels/vmf.cuh"

namespace fastloss::cuda {
namespace {

at::Tensor evaluate(const char* op, const char* arg, vmf::Fn fn, const at::Tensor& input, int64_t p,
                    int64_t iterations) {
  check_cuda(op, arg, input);
  vmf_check_args(op, arg, input, p);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const auto dtype = input.scalar_type();
  // The kernels read and write float32 or float64; half precision goes through float32.
  const at::Tensor in = (dtype == c10::kDouble ? input : input.to(c10::kFloat)).contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  if (out.numel() > 0) {
    C10_CUDA_CHECK(kernels::launch_vmf(static_cast<int>(fn), in.scalar_type() == c10::kDouble, in.const_data_ptr(),
                                       out.mutable_data_ptr(), out.numel(), static_cast<double>(p),
                                       static_cast<int>(iterations), c10::cuda::getCurrentCUDAStream()));
  }
  return out.to(dtype);
}

at::Tensor sample_w_derivative(const at::Tensor& w, const at::Tensor& kappa, int64_t p) {
  check_cuda("vmf_sample_w_derivative", "w", w);
  vmf_check_sample_args(w, kappa, p);
  const c10::cuda::OptionalCUDAGuard guard(w.device());
  const auto dtype = w.scalar_type();
  const auto compute = dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
  const at::Tensor wc = w.to(compute).contiguous(), kc = kappa.to(compute).contiguous();
  at::Tensor out = at::empty(wc.sizes(), wc.options());
  if (out.numel() > 0) {
    C10_CUDA_CHECK(kernels::launch_vmf_sample_w_derivative(compute == c10::kDouble, wc.const_data_ptr(),
                                                           kc.const_data_ptr(), out.mutable_data_ptr(), out.numel(),
                                                           static_cast<double>(p), c10::cuda::getCurrentCUDAStream()));
  }
  return out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  VmfOps<&evaluate>::register_impls(m);
  m.impl("vmf_sample_w_derivative", &sample_w_derivative);
}

}  // namespace fastloss::cuda
