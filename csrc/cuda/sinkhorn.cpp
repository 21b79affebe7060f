// CUDA glue for the Sinkhorn ops: the argument checks shared with the CPU
// (common/sinkhorn_op.h), conversion to the accumulation type, allocation through torch's
// caching allocator (outputs and the large-problem workspace), the current stream, and
// registration. The Sinkhorn kernels are torch-free (kernels/sinkhorn.cu).
//
// The SinKD loss on CUDA is composed of ATen ops here (softmax, cdist p=1 and its backward,
// mat-vecs): the same scaling-vector forward and reverse sweep as cpu/sinkhorn.cpp, without
// autograd through the n_iter steps and without a host synchronization.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_cdist_backward.h>
#include <ATen/ops/cdist.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "common/sinkhorn_kd_aten.h"
#include "common/sinkhorn_op.h"
#include "cuda/glue.h"
#include "kernels/sinkhorn.cuh"

namespace fastloss::cuda {
namespace {

template <typename T>
kernels::SinkhornArgs<T> make_args(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b,
                                   const at::Tensor& log_a, const at::Tensor& log_b, const SinkhornShape& s,
                                   double eps, int64_t max_iter, double tol, double mass_tol, at::Tensor& plan,
                                   at::Tensor& alpha, at::Tensor& beta, at::Tensor& value, at::Tensor& n_iter,
                                   at::Tensor& error) {
  kernels::SinkhornArgs<T> p;
  p.cost = c.const_data_ptr<T>();
  p.a = a.const_data_ptr<T>();
  p.b = b.const_data_ptr<T>();
  p.log_a = log_a.const_data_ptr<T>();
  p.log_b = log_b.const_data_ptr<T>();
  p.batch = s.batch;
  p.n = s.n;
  p.m = s.m;
  p.inv_eps = static_cast<T>(1.0 / eps);
  p.max_iter = max_iter;
  p.tol = static_cast<T>(tol);
  p.mass_tol = mass_tol;
  p.error_norm = s.error_norm;
  p.plan = plan.mutable_data_ptr<T>();
  p.alpha = alpha.mutable_data_ptr<T>();
  p.beta = beta.mutable_data_ptr<T>();
  p.value = value.mutable_data_ptr<T>();
  p.n_iter = n_iter.mutable_data_ptr<int64_t>();
  p.error = error.mutable_data_ptr<T>();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps, int64_t max_iter, double tol,
    double error_norm) {
  check_cuda("sinkhorn", "cost", cost);
  const SinkhornShape s = sinkhorn_args(cost, a, b, eps, max_iter, tol, error_norm);
  const c10::cuda::OptionalCUDAGuard guard(cost.device());
  const auto opts = cost.options().dtype(s.acc_dtype);
  at::Tensor plan = at::empty({s.batch, s.n, s.m}, opts);
  at::Tensor alpha = at::empty({s.batch, s.n}, opts);
  at::Tensor beta = at::empty({s.batch, s.m}, opts);
  at::Tensor value = at::zeros({s.batch}, opts);
  at::Tensor n_iter = at::zeros({s.batch}, opts.dtype(at::kLong));
  at::Tensor error = at::zeros({s.batch}, opts);
  if (s.batch == 0 || s.n == 0 || s.m == 0) return {plan, alpha, beta, value, n_iter, error};
  const at::Tensor c = cost.to(s.acc_dtype).contiguous();
  const at::Tensor av = a.to(s.acc_dtype).contiguous();
  const at::Tensor bv = b.to(s.acc_dtype).contiguous();
  const at::Tensor log_a = av.log();
  const at::Tensor log_b = bv.log();
  // The CPU's tolerance, that of the input dtypes of a and b. The kernel sums the marginals in
  // double; float64 marginals of a float32 cost reach it rounded to float32, which moves each
  // mass by up to 2^-24 relative and their relative difference by up to 2^-23: allowed for, so
  // that every problem the CPU accepts is accepted here too.
  const bool rounded = a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble;
  const double mass_tol = sinkhorn_mass_tolerance(a.scalar_type(), b.scalar_type()) +
                          (rounded && s.acc_dtype != at::kDouble ? 0x1p-23 : 0.0);
  const size_t elem = s.acc_dtype == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t ws_bytes = kernels::sinkhorn_workspace_bytes(s.batch, s.n, s.m, elem);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, cost.options().dtype(at::kByte));
  void* ws_ptr = ws.defined() ? ws.mutable_data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (s.acc_dtype == at::kDouble) {
    const auto p = make_args<double>(c, av, bv, log_a, log_b, s, eps, max_iter, tol, mass_tol, plan, alpha, beta,
                                     value, n_iter, error);
    C10_CUDA_CHECK(kernels::launch_sinkhorn(p, ws_ptr, ws_bytes, stream));
  } else {
    const auto p = make_args<float>(c, av, bv, log_a, log_b, s, eps, max_iter, tol, mass_tol, plan, alpha, beta,
                                    value, n_iter, error);
    C10_CUDA_CHECK(kernels::launch_sinkhorn(p, ws_ptr, ws_bytes, stream));
  }
  return {plan, alpha, beta, value, n_iter, error};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_kd(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double eps, int64_t n_iter,
    double scale) {
  check_cuda("sinkhorn_kd_loss", "student_logits", student);
  check_cuda("sinkhorn_kd_loss", "teacher_logits", teacher);
  const SinkhornKdShape s = sinkhorn_kd_args(student, teacher, temperature, eps, n_iter, scale);
  const c10::cuda::OptionalCUDAGuard guard(student.device());
  const int64_t B = s.batch, C = s.classes;
  const auto opts = student.options().dtype(s.acc_dtype);
  if (B == 0) {
    return {at::zeros({}, opts.dtype(sinkhorn_kd_loss_dtype(student, teacher))), at::empty({0, C}, opts),
            at::empty({0, C}, opts), at::empty({0, 0}, opts), at::empty({n_iter + 1, 0}, opts.dtype(at::kDouble)),
            at::empty({n_iter + 1, 0}, opts.dtype(at::kDouble))};
  }
  const at::Tensor ps = at::softmax(student.to(s.acc_dtype) / temperature, 1).contiguous();
  const at::Tensor pt = at::softmax(teacher.to(s.acc_dtype) / temperature, 1).contiguous();
  const at::Tensor W = at::cdist(ps, pt, 1.0).contiguous();
  // The normalizations run in float64 (the CPU's float32 fallback, without a host sync to
  // decide): at small eps the scalings spread beyond float32's range (cpu/sinkhorn.cpp,
  // kd_kernel_fits_float), and they are saved in float64 either way.
  const at::Tensor W64 = W.to(at::kDouble);
  at::Tensor y0;
  const at::Tensor K = sinkhorn_kd_kernel(W64, eps, n_iter, &y0);
  const at::Tensor Kt = K.t();
  const auto wide = opts.dtype(at::kDouble);
  at::Tensor xs = at::ones({n_iter + 1, B}, wide), ys = at::ones({n_iter + 1, B}, wide);
  if (n_iter > 0) ys[0].copy_(y0);
  for (int64_t t = 1; t <= n_iter; ++t) {
    xs[t].copy_(at::mv(K, ys[t - 1]).reciprocal_());
    ys[t].copy_(at::mv(Kt, xs[t]).reciprocal_());
  }
  const at::Tensor loss = at::dot(xs[n_iter], at::mv(K * W64, ys[n_iter])) * scale;
  return {loss.to(sinkhorn_kd_loss_dtype(student, teacher)), ps, pt, W, xs, ys};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_kd_backward(const at::Tensor& grad_loss, const at::Tensor& ps,
                                                        const at::Tensor& pt, const at::Tensor& W,
                                                        const at::Tensor& xs, const at::Tensor& ys,
                                                        double temperature, double eps, double scale,
                                                        bool student_grad, bool teacher_grad,
                                                        c10::ScalarType student_dtype, c10::ScalarType teacher_dtype) {
  check_cuda("sinkhorn_kd_backward", "p_student", ps);
  const SinkhornKdBackwardShape s =
      sinkhorn_kd_backward_args(grad_loss, ps, pt, W, xs, ys, temperature, eps, scale, student_dtype,
                                teacher_dtype);
  const c10::cuda::OptionalCUDAGuard guard(ps.device());
  const int64_t B = s.batch, C = s.classes, n_iter = s.n_iter;
  const auto opts = ps.options();
  if (B == 0 || C == 0 || !(student_grad || teacher_grad)) {
    return {at::zeros({student_grad ? B : 0, student_grad ? C : 0}, opts.dtype(student_dtype)),
            at::zeros({teacher_grad ? B : 0, teacher_grad ? C : 0}, opts.dtype(teacher_dtype))};
  }
  // The reverse sweep of cpu/sinkhorn.cpp (sinkhorn_kd_sweep) in float64 as the forward's
  // normalizations, with the scalar kept on the device: g = grad_loss * scale.
  const at::Tensor W64 = W.to(at::kDouble);
  const at::Tensor g = grad_loss.to(at::kDouble).reshape({}) * scale;
  const at::Tensor K = sinkhorn_kd_kernel(W64, eps, n_iter);
  const at::Tensor Kt = K.t();
  const at::Tensor KW = K * W64;
  const at::Tensor xn = xs[n_iter], yn = ys[n_iter];
  at::Tensor x_bar = at::mv(KW, yn) * g;
  at::Tensor y_bar = at::mv(KW.t(), xn) * g;
  std::vector<at::Tensor> left, right;
  for (int64_t t = n_iter; t >= 1; --t) {
    const at::Tensor x = xs[t], y = ys[t];
    const at::Tensor u = -(y_bar * y * y);
    const at::Tensor w = -((x_bar + at::mv(K, u)) * x * x);
    left.push_back(x);
    right.push_back(u);
    left.push_back(w);
    right.push_back(ys[t - 1]);
    y_bar = at::mv(Kt, w);
    x_bar = at::zeros_like(x_bar);
  }
  // As on the CPU: x_n and y_n split into m x 2^e (e clamped to half the exponent range, 0
  // where not finite), the powers moved from the factors onto K (exact scalings), so nothing
  // overflows where the scalings spread widely.
  const int64_t max_shift = 512;  // half float64's exponent range
  auto exponent = [&](const at::Tensor& t) {
    return at::where(t.isfinite(), std::get<1>(at::frexp(t)), 0).clamp(-max_shift, max_shift);
  };
  const at::Tensor one = at::ones_like(xn);
  const at::Tensor ex = exponent(xn), ey = exponent(yn);
  const at::Tensor px = at::ldexp(one, ex), py = at::ldexp(one, ey);
  const at::Tensor sx = at::ldexp(one, -ex), sy = at::ldexp(one, -ey);  // 1 / px, 1 / py
  at::Tensor G = at::outer(xn * sx, yn * sy) * g * (1.0 - W64 * (1.0 / eps));
  if (n_iter > 0) {
    const at::Tensor lf = at::stack(left, 1) * sx.unsqueeze(1);
    const at::Tensor rf = at::stack(right, 1) * sy.unsqueeze(1);
    G = G - at::mm(lf, rf.t()) * (1.0 / eps);
  }
  G = (G * (K * px.unsqueeze(1) * py.unsqueeze(0))).to(ps.scalar_type()).contiguous();
  at::Tensor d_student = at::zeros({0, 0}, opts.dtype(student_dtype));
  at::Tensor d_teacher = at::zeros({0, 0}, opts.dtype(teacher_dtype));
  if (student_grad) {
    d_student = softmax_temperature_vjp(at::_cdist_backward(G, ps, pt, 1.0, W), ps, temperature).to(student_dtype);
  }
  if (teacher_grad) {
    const at::Tensor Gt = G.t().contiguous(), Wt = W.t().contiguous();
    d_teacher = softmax_temperature_vjp(at::_cdist_backward(Gt, pt, ps, 1.0, Wt), pt, temperature).to(teacher_dtype);
  }
  return {d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn);
  m.impl("sinkhorn_kd", &sinkhorn_kd);
  m.impl("sinkhorn_kd_backward", &sinkhorn_kd_backward);
}

}  // namespace fastloss::cuda
