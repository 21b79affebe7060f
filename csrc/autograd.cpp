// Autograd kernels in C++ for the ops that are often called on small tensors: softmax and
// log-softmax (and their backward ops, for double backward), log I_v / log K_v (and their
// derivative ops, which refuse a second derivative), and the SinKD loss. A Python autograd
// registration (torch.library.register_autograd) runs Python on every call, with or without
// grad: ~30 us, more than the kernels themselves below ~10^5 elements.
// Each kernel wraps the op in a torch::autograd::Function whose forward calls the op below
// autograd; the ops with larger inputs and richer contexts (stat_topk, sinkhorn, cut
// cross-entropy) keep their Python registrations.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace fastloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using SoftmaxSig = at::Tensor(const at::Tensor&, int64_t, bool);
using SoftmaxBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::ScalarType);

template <bool kLog>
const c10::TypedOperatorHandle<SoftmaxSig>& softmax_op() {
  static const auto op = op_handle<SoftmaxSig>(kLog ? "fastloss::log_softmax" : "fastloss::softmax");
  return op;
}

template <bool kLog>
const c10::TypedOperatorHandle<SoftmaxBackwardSig>& softmax_backward_op() {
  static const auto op =
      op_handle<SoftmaxBackwardSig>(kLog ? "fastloss::log_softmax_backward" : "fastloss::softmax_backward");
  return op;
}

template <bool kLog>
struct SoftmaxFunction : torch::autograd::Function<SoftmaxFunction<kLog>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& self, int64_t dim, bool half_to_float) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = softmax_op<kLog>().call(self, dim, half_to_float);
    ctx->save_for_backward({out});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["input_dtype"] = self.scalar_type();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor out = ctx->get_saved_variables()[0];
    const c10::ScalarType input_dtype = ctx->saved_data["input_dtype"].toScalarType();
    // Through the dispatcher with autograd on: differentiable again (double backward).
    at::Tensor dx = softmax_backward_op<kLog>().call(grads[0].to(out.scalar_type()), out,
                                                     ctx->saved_data["dim"].toInt(), input_dtype);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// The backward ops as functions of (grad_output, output), in terms of differentiable ops.
template <bool kLog>
struct SoftmaxBackwardFunction : torch::autograd::Function<SoftmaxBackwardFunction<kLog>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& y, int64_t dim,
                            c10::ScalarType input_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor dx = softmax_backward_op<kLog>().call(g, y, dim, input_dtype);
    ctx->save_for_backward({g, y});
    ctx->saved_data["dim"] = dim;
    return dx;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& g = saved[0];
    const at::Tensor& y = saved[1];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::IntArrayRef d(dim);
    const at::Tensor u = grads[0].to(y.scalar_type());
    at::Tensor grad_g, grad_y;
    if constexpr (kLog) {
      // dx = g - exp(y) sum(g):  d/dg = u - sum(u exp(y));  d/dy = -u exp(y) sum(g).
      const at::Tensor p = y.exp();
      if (ctx->needs_input_grad(0)) grad_g = u - (u * p).sum(d, true);
      if (ctx->needs_input_grad(1)) grad_y = -u * p * g.sum(d, true);
    } else {
      // dx = y (g - sum(g y)):  d/dg = softmax_backward(u, y);
      // d/dy = u (g - sum(g y)) - g sum(u y).
      if (ctx->needs_input_grad(0)) grad_g = softmax_backward_op<false>().call(u, y, dim, y.scalar_type());
      if (ctx->needs_input_grad(1)) grad_y = u * (g - (g * y).sum(d, true)) - g * (u * y).sum(d, true);
    }
    return {grad_g, grad_y, at::Tensor(), at::Tensor()};
  }
};

template <bool kLog>
at::Tensor softmax_autograd(const at::Tensor& self, int64_t dim, bool half_to_float) {
  return SoftmaxFunction<kLog>::apply(self, dim, half_to_float);
}

template <bool kLog>
at::Tensor softmax_backward_autograd(const at::Tensor& g, const at::Tensor& y, int64_t dim,
                                     c10::ScalarType input_dtype) {
  return SoftmaxBackwardFunction<kLog>::apply(g, y, dim, input_dtype);
}

// log I_v(x) / log K_v(x): the gradients in v and x come from the *_grad op, summed back to
// the broadcast shapes of v and x.
using BesselSig = at::Tensor(const at::Tensor&, const at::Tensor&);
using BesselGradSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);

template <bool kI>
struct LogBesselFunction : torch::autograd::Function<LogBesselFunction<kI>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& v, const at::Tensor& x) {
    static const auto op = op_handle<BesselSig>(kI ? "fastloss::log_bessel_iv" : "fastloss::log_bessel_kv");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({v, x});
    return op.call(v, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto grad_op =
        op_handle<BesselGradSig>(kI ? "fastloss::log_bessel_iv_grad" : "fastloss::log_bessel_kv_grad");
    const variable_list saved = ctx->get_saved_variables();
    const auto [d_dv, d_dx] = grad_op.call(saved[0], saved[1]);
    at::Tensor grad_v, grad_x;
    if (ctx->needs_input_grad(0)) grad_v = (grads[0] * d_dv).sum_to_size(saved[0].sizes());
    if (ctx->needs_input_grad(1)) grad_x = (grads[0] * d_dx).sum_to_size(saved[1].sizes());
    return {grad_v, grad_x};
  }
};

template <bool kI>
at::Tensor log_bessel_autograd(const at::Tensor& v, const at::Tensor& x) {
  return LogBesselFunction<kI>::apply(v, x);
}

// The derivative ops have no derivative of their own. Without an autograd kernel, torch would
// treat them as constants under create_graph=True and return a wrong second derivative (with
// only a warning); this one keeps first derivatives with create_graph=True working and makes a
// second derivative an error.
template <bool kI>
struct LogBesselGradFunction : torch::autograd::Function<LogBesselGradFunction<kI>> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& v, const at::Tensor& x) {
    static const auto op =
        op_handle<BesselGradSig>(kI ? "fastloss::log_bessel_iv_grad" : "fastloss::log_bessel_kv_grad");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [d_dv, d_dx] = op.call(v, x);
    return {d_dv, d_dx};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fastloss.log_bessel_", kI ? "iv" : "kv",
                                ": a second derivative (double backward) is not implemented; first derivatives "
                                "with create_graph=True work, but their graph ends at fastloss's derivative");
  }
};

template <bool kI>
std::tuple<at::Tensor, at::Tensor> log_bessel_grad_autograd(const at::Tensor& v, const at::Tensor& x) {
  const variable_list out = LogBesselGradFunction<kI>::apply(v, x);
  return {out[0], out[1]};
}

// SinKD: the loss is differentiable; the softmaxes, cost and scaling vectors it also returns
// are what the fused backward reads.
using KdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, double, int64_t, double);
using KdBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         double, double, double, bool, bool, c10::ScalarType,
                                                         c10::ScalarType);

struct SinkhornKdFunction : torch::autograd::Function<SinkhornKdFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, double eps, int64_t n_iter, double scale) {
    static const auto op = op_handle<KdSig>("fastloss::sinkhorn_kd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, ps, pt, cost, x, y] = op.call(student, teacher, temperature, eps, n_iter, scale);
    ctx->mark_non_differentiable({ps, pt, cost, x, y});
    ctx->save_for_backward({ps, pt, cost, x, y});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["student_dtype"] = student.scalar_type();
    ctx->saved_data["teacher_dtype"] = teacher.scalar_type();
    return {loss, ps, pt, cost, x, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<KdBackwardSig>("fastloss::sinkhorn_kd_backward");
    const variable_list s = ctx->get_saved_variables();
    const bool need_s = ctx->needs_input_grad(0);
    const bool need_t = ctx->needs_input_grad(1);
    auto [ds, dt] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["temperature"].toDouble(),
                            ctx->saved_data["eps"].toDouble(), ctx->saved_data["scale"].toDouble(), need_s, need_t,
                            ctx->saved_data["student_dtype"].toScalarType(),
                            ctx->saved_data["teacher_dtype"].toScalarType());
    return {need_s ? ds : at::Tensor(), need_t ? dt : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_kd_autograd(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double eps, int64_t n_iter,
    double scale) {
  variable_list r = SinkhornKdFunction::apply(student, teacher, temperature, eps, n_iter, scale);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, Autograd, m) {
  m.impl("softmax", &softmax_autograd<false>);
  m.impl("log_softmax", &softmax_autograd<true>);
  m.impl("softmax_backward", &softmax_backward_autograd<false>);
  m.impl("log_softmax_backward", &softmax_backward_autograd<true>);
  m.impl("log_bessel_iv", &log_bessel_autograd<true>);
  m.impl("log_bessel_kv", &log_bessel_autograd<false>);
  m.impl("log_bessel_iv_grad", &log_bessel_grad_autograd<true>);
  m.impl("log_bessel_kv_grad", &log_bessel_grad_autograd<false>);
  m.impl("sinkhorn_kd", &sinkhorn_kd_autograd);
}

}  // namespace fastloss
