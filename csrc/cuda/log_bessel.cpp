// CUDA glue for the log-Bessel ops: the argument checks shared with the CPU
// (common/log_bessel_op.h), float16/bfloat16 computed in float32, allocation through torch's
// caching allocator, the current stream, and registration. The kernels are torch-free
// (kernels/log_bessel.cu), so they also compile where torch has no CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/log_bessel_op.h"
#include "cuda/glue.h"
#include "kernels/log_bessel.cuh"

namespace fastloss::cuda {
namespace {

// The kernels read and write float32 or float64; half precision goes through float32.
at::Tensor kernel_input(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return (dtype == c10::kFloat || dtype == c10::kDouble) ? t : t.to(c10::kFloat);
}

// v and x checked, broadcast and in the kernels' dtype.
struct KernelInputs {
  at::Tensor v, x;
};

KernelInputs kernel_inputs(const char* op, const at::Tensor& v, const at::Tensor& x) {
  check_cuda(op, "v", v);
  check_cuda(op, "x", x);
  const LogBesselArgs args = log_bessel_args(op, v, x);
  return {kernel_input(args.v), kernel_input(args.x)};
}

template <LogBesselFn kFn>
at::Tensor forward(const at::Tensor& v, const at::Tensor& x) {
  const auto [vk, xk] = kernel_inputs(kFn == LogBesselFn::LogKv ? "log_bessel_kv" : "log_bessel_iv", v, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());  // after the checks: x is on a GPU
  at::Tensor out = at::empty(vk.sizes(), vk.options());
  if (out.numel() == 0) return out.to(v.scalar_type());
  C10_CUDA_CHECK(kernels::launch_log_bessel(
      static_cast<int>(kFn), vk.scalar_type() == c10::kDouble, vk.const_data_ptr(),
      xk.const_data_ptr(), out.mutable_data_ptr(), nullptr, nullptr, out.numel(),
      c10::cuda::getCurrentCUDAStream()));
  return out.to(v.scalar_type());
}

template <LogBesselFn kFn>
std::tuple<at::Tensor, at::Tensor> grad(const at::Tensor& v, const at::Tensor& x) {
  const auto [vk, xk] =
      kernel_inputs(kFn == LogBesselFn::LogKvGrad ? "log_bessel_kv_grad" : "log_bessel_iv_grad", v, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());  // after the checks: x is on a GPU
  at::Tensor d_dv = at::empty(vk.sizes(), vk.options());
  at::Tensor d_dx = at::empty(vk.sizes(), vk.options());
  if (d_dv.numel() > 0) {
    C10_CUDA_CHECK(kernels::launch_log_bessel(
        static_cast<int>(kFn), vk.scalar_type() == c10::kDouble, vk.const_data_ptr(),
        xk.const_data_ptr(), d_dv.mutable_data_ptr(), d_dx.mutable_data_ptr(), nullptr, d_dv.numel(),
        c10::cuda::getCurrentCUDAStream()));
  }
  return {d_dv.to(v.scalar_type()), d_dx.to(v.scalar_type())};
}

template <LogBesselFn kFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> hess(const at::Tensor& v, const at::Tensor& x) {
  const auto [vk, xk] =
      kernel_inputs(kFn == LogBesselFn::LogKvHess ? "log_bessel_kv_hess" : "log_bessel_iv_hess", v, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());  // after the checks: x is on a GPU
  at::Tensor d_vv = at::empty(vk.sizes(), vk.options());
  at::Tensor d_vx = at::empty(vk.sizes(), vk.options());
  at::Tensor d_xx = at::empty(vk.sizes(), vk.options());
  if (d_vv.numel() > 0) {
    C10_CUDA_CHECK(kernels::launch_log_bessel(
        static_cast<int>(kFn), vk.scalar_type() == c10::kDouble, vk.const_data_ptr(),
        xk.const_data_ptr(), d_vv.mutable_data_ptr(), d_vx.mutable_data_ptr(), d_xx.mutable_data_ptr(),
        d_vv.numel(), c10::cuda::getCurrentCUDAStream()));
  }
  return {d_vv.to(v.scalar_type()), d_vx.to(v.scalar_type()), d_xx.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("log_bessel_iv", &forward<LogBesselFn::LogIv>);
  m.impl("log_bessel_kv", &forward<LogBesselFn::LogKv>);
  m.impl("log_bessel_iv_grad", &grad<LogBesselFn::LogIvGrad>);
  m.impl("log_bessel_kv_grad", &grad<LogBesselFn::LogKvGrad>);
  m.impl("log_bessel_iv_hess", &hess<LogBesselFn::LogIvHess>);
  m.impl("log_bessel_kv_hess", &hess<LogBesselFn::LogKvHess>);
}

}  // namespace fastloss::cuda
