// Autograd kernels in C++ for the ops that are often called on small tensors: softmax and
// log-softmax (and their backward ops, for double backward), log I_v / log K_v (and their
// derivative ops, differentiable once more; a third derivative is refused), the von
// Mises-Fisher helpers, the SinKD loss (differentiable again through an eager recompute
// under create_graph=True), and statistical top-k with its fused gelu-mul (called once per
// MLP layer), and cut cross-entropy.
// A Python autograd registration (torch.library.register_autograd) runs Python on every
// call, with or without grad: ~25-60 us, more than the kernels themselves below ~10^5
// elements. Each kernel wraps the op in a torch::autograd::Function whose forward calls the
// op below autograd; sinkhorn, the vocabulary-parallel cut cross-entropy shard, the von
// Mises-Fisher sampler's w derivative and the backward ops' own derivatives keep their
// Python registrations.
#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/Tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "common/sinkhorn_kd_aten.h"
#include "common/torch_checks.h"
#include "cpu/backward_in_place.h"

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

// A backward linear in its output gradients (backward_of(grads, is_tangent), through the
// backward ops), applied to their primals and, where any carries a forward-AD tangent
// (autograd.grad(..., grad_outputs=dual), eager forward over reverse), to the tangents as well
// (missing ones as zeros): the tangent of the result. The backward ops have no forward rule of
// their own. Their autograd (double backward) only matters under create_graph: without grad
// mode they are called below autograd, which skips it (and, where it is registered in
// Python, its ~25-60 us).
template <typename BackwardFn>
variable_list linear_in_grads(const variable_list& grads, BackwardFn&& backward_of) {
  const auto call = [&](const variable_list& g, bool is_tangent) {
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    return backward_of(g, is_tangent);
  };
  bool dual = false;
  for (const at::Tensor& g : grads) dual = dual || (g.defined() && g._fw_grad(/*level=*/0).defined());
  if (!dual) return call(grads, false);
  variable_list primals, tangents;
  for (const at::Tensor& g : grads) {
    const at::Tensor t = g.defined() ? g._fw_grad(/*level=*/0) : at::Tensor();
    primals.push_back(t.defined() ? g._fw_primal(/*level=*/0) : g);
    tangents.push_back(t.defined() ? t : g.defined() ? at::zeros_like(g) : at::Tensor());
  }
  variable_list out = call(primals, false);
  const variable_list out_tangents = call(tangents, true);
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].defined()) out[i] = at::_make_dual(out[i], out_tangents[i], /*level=*/0);
  }
  return out;
}

// An optional output gradient for an op argument `Tensor?`, in the given dtype.
std::optional<at::Tensor> optional_grad(const at::Tensor& g, c10::ScalarType dtype) {
  return g.defined() ? std::optional<at::Tensor>(g.to(dtype)) : std::nullopt;
}

// A plain tensor: its own storage; not a traced, fake, functional, functorch-wrapped (batched)
// or dual tensor.
bool plain_tensor(const at::Tensor& g) {
  return g.has_storage() && !g._fw_grad(/*level=*/0).defined() && !at::isTensorSubclassLike(g) &&
         !g.key_set().has(c10::DispatchKey::Functionalize);
}

// Whether a gradient handed to a backward is a buffer that nothing else references, so the
// backward may write its result over it: autograd's engine moves each node's gradients in,
// and a gradient that a user, a hook or another node still holds has other references. Only
// plain tensors with torch-allocated memory qualify (not a traced, fake, functional or
// functorch-wrapped tensor, none under a dispatch mode, nor memory borrowed from NumPy or
// DLPack), and not under create_graph or forward-mode AD.
bool owned_gradient(const at::Tensor& g) {
  return g.defined() && g.use_count() == 1 && plain_tensor(g) && g.storage().use_count() == 1 &&
         g.storage().resizable() && g.layout() == c10::kStrided && !g.requires_grad() && !g.is_inference() &&
         !g._is_zerotensor() && !at::GradMode::is_enabled();
}

// grads[i] moved out when it is an owned CPU gradient (owned_gradient), for a backward to
// write over; otherwise undefined, with grads[i] left in place.
at::Tensor take_owned_cpu_gradient(variable_list& grads, size_t i) {
  at::Tensor g = std::move(grads[i]);
  if (g.defined() && g.is_cpu() && owned_gradient(g)) return g;
  grads[i] = std::move(g);
  return at::Tensor();
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

  // grads by reference (here and below): autograd passes its own list, so an owned gradient
  // can be moved out of it.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const at::Tensor out = ctx->get_saved_variables()[0];
    const c10::ScalarType input_dtype = ctx->saved_data["input_dtype"].toScalarType();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    if (at::Tensor g = take_owned_cpu_gradient(grads, 0); g.defined()) {
      if (cpu::softmax_backward_in_place(g, out, dim, input_dtype, kLog)) return {g, at::Tensor(), at::Tensor()};
      grads[0] = std::move(g);
    }
    // Through the dispatcher under create_graph: differentiable again (double backward).
    const variable_list dx = linear_in_grads({grads[0]}, [&](const variable_list& g, bool) -> variable_list {
      return {softmax_backward_op<kLog>().call(g[0].to(out.scalar_type()), out, dim, input_dtype)};
    });
    return {dx[0], at::Tensor(), at::Tensor()};
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
    // Half-precision inputs: the derivatives in float32, multiplied by the output gradient and
    // rounded once. Rounded first, d/dx = v / x (1e5 at v = 10, x = 1e-4) overflowed float16
    // where the gradient (x 0.01: 1e3) does not.
    auto widened = [](const at::Tensor& t) {
      return at::isReducedFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t;
    };
    const auto [d_dv, d_dx] = grad_op.call(widened(saved[0]), widened(saved[1]));
    at::Tensor grad_v, grad_x;
    // Symbolic sizes: concrete ones made torch.compile(dynamic=True) recompile for every shape.
    if (ctx->needs_input_grad(0))
      grad_v = (grads[0] * d_dv).sum_to_size_symint(saved[0].sym_sizes()).to(saved[0].scalar_type());
    if (ctx->needs_input_grad(1))
      grad_x = (grads[0] * d_dx).sum_to_size_symint(saved[1].sym_sizes()).to(saved[1].scalar_type());
    return {grad_v, grad_x};
  }
};

template <bool kI>
at::Tensor log_bessel_autograd(const at::Tensor& v, const at::Tensor& x) {
  return LogBesselFunction<kI>::apply(v, x);
}

// The derivative ops' derivatives come from the second-derivative ops:
// d(g_v d_dv + g_x d_dx) = (g_v d_vv + g_x d_vx) dv + (g_v d_vx + g_x d_xx) dx.
using BesselHessSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);

template <bool kI>
const c10::TypedOperatorHandle<BesselHessSig>& log_bessel_hess_op() {
  static const auto op = op_handle<BesselHessSig>(kI ? "fastloss::log_bessel_iv_hess" : "fastloss::log_bessel_kv_hess");
  return op;
}

// g_a * a + g_b * b over the defined output gradients (undefined when neither is), summed
// back to the shape of the input `like` (broadcast against the other).
at::Tensor weighted_sum_to(const at::Tensor& g_a, const at::Tensor& a, const at::Tensor& g_b, const at::Tensor& b,
                           const at::Tensor& like) {
  if (!g_a.defined() && !g_b.defined()) return at::Tensor();
  const at::Tensor sum = !g_a.defined() ? g_b * b : !g_b.defined() ? g_a * a : g_a * a + g_b * b;
  return sum.sum_to_size_symint(like.sym_sizes());
}

template <bool kI>
struct LogBesselGradFunction : torch::autograd::Function<LogBesselGradFunction<kI>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& v, const at::Tensor& x) {
    static const auto op =
        op_handle<BesselGradSig>(kI ? "fastloss::log_bessel_iv_grad" : "fastloss::log_bessel_kv_grad");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({v, x});
    // An output gradient never given stays undefined (weighted_sum_to skips it): as zeros it
    // would meet an infinite second derivative (d_vv of log I_0 at x = 0) and give NaN.
    ctx->set_materialize_grads(false);
    const auto [d_dv, d_dx] = op.call(v, x);
    return {d_dv, d_dx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const auto [d_vv, d_vx, d_xx] = log_bessel_hess_op<kI>().call(saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? weighted_sum_to(grads[0], d_vv, grads[1], d_vx, saved[0]) : at::Tensor(),
            ctx->needs_input_grad(1) ? weighted_sum_to(grads[0], d_vx, grads[1], d_xx, saved[1]) : at::Tensor()};
  }
};

template <bool kI>
std::tuple<at::Tensor, at::Tensor> log_bessel_grad_autograd(const at::Tensor& v, const at::Tensor& x) {
  const variable_list out = LogBesselGradFunction<kI>::apply(v, x);
  return {out[0], out[1]};
}

// The second-derivative ops have no derivative: without an autograd kernel, torch would treat
// them as constants under create_graph=True and return a wrong third derivative (with only a
// warning); this one makes a third derivative an error.
template <bool kI>
struct LogBesselHessFunction : torch::autograd::Function<LogBesselHessFunction<kI>> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& v, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [d_vv, d_vx, d_xx] = log_bessel_hess_op<kI>().call(v, x);
    return {d_vv, d_vx, d_xx};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grads*/) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fastloss.log_bessel_", kI ? "iv" : "kv",
                                ": a third derivative is not implemented; second derivatives with "
                                "create_graph=True work, but their graph ends at fastloss's second derivative");
  }
};

template <bool kI>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_bessel_hess_autograd(const at::Tensor& v, const at::Tensor& x) {
  const variable_list out = LogBesselHessFunction<kI>::apply(v, x);
  return {out[0], out[1], out[2]};
}

// von Mises-Fisher helpers (the ops again in every backward, so differentiable again):
// d/dkappa of A_p^(n) is A_p^(n+1) (up to A''), of log C_p is -A_p, of 1 - A_p is -A_p', of
// the entropy -kappa A_p'; of the MLE, 1 / A_p'(kappa) at the root (implicit function theorem).
using VmfUnarySig = at::Tensor(const at::Tensor&, int64_t);            // (kappa, p)
using VmfIntArgSig = at::Tensor(const at::Tensor&, int64_t, int64_t);  // (kappa, p, derivative), (rbar, p, iterations)

const c10::TypedOperatorHandle<VmfIntArgSig>& vmf_mean_resultant_op() {
  static const auto op = op_handle<VmfIntArgSig>("fastloss::vmf_mean_resultant");
  return op;
}

struct VmfMeanResultantFunction : torch::autograd::Function<VmfMeanResultantFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& kappa, int64_t p, int64_t derivative) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({kappa});
    ctx->saved_data["p"] = p;
    ctx->saved_data["derivative"] = derivative;
    return vmf_mean_resultant_op().call(kappa, p, derivative);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t derivative = ctx->saved_data["derivative"].toInt();
    TORCH_CHECK_NOT_IMPLEMENTED(derivative < 2, "fastloss.vmf_mean_resultant: the third derivative of A_p is not "
                                "implemented (A_p, A_p' and A_p'' are differentiable up to there)");
    const at::Tensor next =
        vmf_mean_resultant_op().call(ctx->get_saved_variables()[0], ctx->saved_data["p"].toInt(), derivative + 1);
    return {grads[0] * next, at::Tensor(), at::Tensor()};
  }
};

at::Tensor vmf_mean_resultant_autograd(const at::Tensor& kappa, int64_t p, int64_t derivative) {
  return VmfMeanResultantFunction::apply(kappa, p, derivative);
}

// The vMF functions of kappa alone whose derivative is a multiple of A_p or A_p'.
enum class VmfUnary { Complement, Entropy, LogNormalizer };

constexpr const char* vmf_unary_op_name(VmfUnary kind) {
  return kind == VmfUnary::Complement ? "fastloss::vmf_mean_resultant_complement"
         : kind == VmfUnary::Entropy  ? "fastloss::vmf_entropy"
                                      : "fastloss::vmf_log_normalizer";
}

template <VmfUnary kKind>
struct VmfUnaryFunction : torch::autograd::Function<VmfUnaryFunction<kKind>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& kappa, int64_t p) {
    static const auto op = op_handle<VmfUnarySig>(vmf_unary_op_name(kKind));
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({kappa});
    ctx->saved_data["p"] = p;
    return op.call(kappa, p);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor kappa = ctx->get_saved_variables()[0];
    const int64_t p = ctx->saved_data["p"].toInt();
    // d log C = -A; d (1 - A) = -A'; d H = -kappa A'.
    if constexpr (kKind == VmfUnary::LogNormalizer) return {-grads[0] * vmf_mean_resultant_op().call(kappa, p, 0), at::Tensor()};
    if constexpr (kKind == VmfUnary::Complement) return {-grads[0] * vmf_mean_resultant_op().call(kappa, p, 1), at::Tensor()};
    // kappa A' in float64, and from kappa = 2^500 (inf included) as its limit (p - 1) / (2 kappa):
    // A' ~ (p - 1) / (2 kappa^2) underflows float32 from kappa ~ 1e19 and float64 from ~1e154,
    // where the product came out 0.
    const at::Tensor k64 = kappa.to(at::kDouble);
    const at::Tensor kappa_slope =
        at::where(k64 > 0x1p500, k64.reciprocal() * (0.5 * static_cast<double>(p - 1)),
                  k64 * vmf_mean_resultant_op().call(k64, p, 1));
    return {-grads[0] * kappa_slope.to(kappa.scalar_type()), at::Tensor()};
  }
};

template <VmfUnary kKind>
at::Tensor vmf_unary_autograd(const at::Tensor& kappa, int64_t p) {
  return VmfUnaryFunction<kKind>::apply(kappa, p);
}

struct VmfKappaMleFunction : torch::autograd::Function<VmfKappaMleFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rbar, int64_t p, int64_t iterations) {
    static const auto op = op_handle<VmfIntArgSig>("fastloss::vmf_kappa_mle");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor kappa = op.call(rbar, p, iterations);
    ctx->save_for_backward({kappa});
    ctx->saved_data["p"] = p;
    return kappa;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor kappa = ctx->get_saved_variables()[0];
    const at::Tensor slope = vmf_mean_resultant_op().call(kappa, ctx->saved_data["p"].toInt(), 1);
    return {grads[0] / slope, at::Tensor(), at::Tensor()};
  }
};

at::Tensor vmf_kappa_mle_autograd(const at::Tensor& rbar, int64_t p, int64_t iterations) {
  return VmfKappaMleFunction::apply(rbar, p, iterations);
}

// L1 distances W[i, j] = sum_c |p[i, c] - q[j, c]| with derivatives of every order. With
// s[i, j, c] = sign(p[i, c] - q[j, c]), piecewise constant, every derivative is one of two
// linear maps, each the other's adjoint:
//   spread:   G -> (dp[i, c] = sum_j G[i, j] s[i, j, c],  dq[j, c] = -sum_i G[i, j] s[i, j, c])
//   contract: (Up, Uq) -> H[i, j] = sum_c (Up[i, c] - Uq[j, c]) s[i, j, c]
// (torch.cdist's backward has no derivative). Rows go in chunks, so the (rows, B, C) sign
// tensor stays near 2^22 elements.
int64_t l1_chunk_rows(const at::Tensor& q) {
  const int64_t per_row = std::max<int64_t>(1, q.size(0) * q.size(1));
  return std::max<int64_t>(1, (int64_t{1} << 22) / per_row);
}

at::Tensor l1_signs(const at::Tensor& p, const at::Tensor& q, int64_t i0, int64_t i1) {
  return at::sign(p.slice(0, i0, i1).unsqueeze(1) - q.unsqueeze(0));
}

// Out of place throughout (chunks concatenated, dq summed anew): the inputs may be batched
// (vectorized jacobians, is_grads_batched), which a copy into a plain buffer cannot hold.
std::pair<at::Tensor, at::Tensor> l1_spread(const at::Tensor& G, const at::Tensor& p, const at::Tensor& q) {
  std::vector<at::Tensor> dp;
  at::Tensor dq = at::zeros_like(q);
  const int64_t rows = l1_chunk_rows(q);
  for (int64_t i0 = 0; i0 < p.size(0); i0 += rows) {
    const int64_t i1 = std::min(p.size(0), i0 + rows);
    const at::Tensor S = l1_signs(p, q, i0, i1);
    const at::Tensor g = G.slice(0, i0, i1);
    dp.push_back(at::bmm(g.unsqueeze(1), S).squeeze(1));
    dq = dq - (S * g.unsqueeze(2)).sum(0);
  }
  return {dp.empty() ? at::zeros_like(p) : at::cat(dp), dq};
}

at::Tensor l1_contract(const at::Tensor& Up, const at::Tensor& Uq, const at::Tensor& p, const at::Tensor& q) {
  std::vector<at::Tensor> H;
  const int64_t rows = l1_chunk_rows(q);
  for (int64_t i0 = 0; i0 < p.size(0); i0 += rows) {
    const int64_t i1 = std::min(p.size(0), i0 + rows);
    const at::Tensor S = l1_signs(p, q, i0, i1);
    H.push_back(((Up.slice(0, i0, i1).unsqueeze(1) - Uq.unsqueeze(0)) * S).sum(2));
  }
  return H.empty() ? at::zeros({p.size(0), q.size(0)}, p.options()) : at::cat(H);
}

struct L1ContractFunction;

// G -> (dp, dq); p and q ride along (their own derivative here is zero almost everywhere).
struct L1SpreadFunction : torch::autograd::Function<L1SpreadFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& G, const at::Tensor& p, const at::Tensor& q) {
    ctx->save_for_backward({p, q});
    auto [dp, dq] = l1_spread(G, p, q);
    return {dp, dq};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

struct L1ContractFunction : torch::autograd::Function<L1ContractFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& Up, const at::Tensor& Uq, const at::Tensor& p,
                            const at::Tensor& q) {
    ctx->save_for_backward({p, q});
    return l1_contract(Up, Uq, p, q);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list pq = ctx->get_saved_variables();
    const variable_list d = L1SpreadFunction::apply(grads[0], pq[0], pq[1]);
    return {d[0], d[1], at::Tensor(), at::Tensor()};
  }
};

variable_list L1SpreadFunction::backward(AutogradContext* ctx, variable_list grads) {
  const variable_list pq = ctx->get_saved_variables();
  return {L1ContractFunction::apply(grads[0], grads[1], pq[0], pq[1]), at::Tensor(), at::Tensor()};
}

struct L1DistFunction : torch::autograd::Function<L1DistFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& p, const at::Tensor& q) {
    ctx->save_for_backward({p, q});
    return at::cdist(p, q, 1.0);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list pq = ctx->get_saved_variables();
    return L1SpreadFunction::apply(grads[0], pq[0], pq[1]);
  }
};

// The SinKD loss from the two softmaxes, exactly as its authors compute it, with
// differentiable ATen ops: the create_graph=True path. The kernel is shifted as in the fused
// kernels (sinkhorn_kd_kernel): the loss does not depend on the shifts when n_iter >= 1, so
// derivatives of every order ignore them (detached). The first row normalization divides by
// the row sums of the unshifted kernel, K'' y_0 with y_0 = exp(-c / eps); the column factor
// y_0 itself is left out, as the column normalization that follows cancels it. The normalizations run in float64, as the
// fused kernels' do wherever float32's range is too narrow for them (cpu/sinkhorn.cpp,
// kd_kernel_fits_float).
at::Tensor sinkhorn_kd_eager(const at::Tensor& ps, const at::Tensor& pt, double eps, int64_t n_iter, double scale) {
  const at::Tensor W = L1DistFunction::apply(ps, pt).to(at::kDouble);
  at::Tensor y0;
  at::Tensor P = sinkhorn_kd_kernel(W, eps, n_iter, &y0);
  if (n_iter == 0) return (P * W).sum() * scale;
  P = P / at::mv(P, y0).unsqueeze(1);
  P = P / P.sum(0, true);
  for (int64_t it = 1; it < n_iter; ++it) {
    P = P / P.sum(1, true);
    P = P / P.sum(0, true);
  }
  return (P * W).sum() * scale;
}

// SinKD: the loss, and the two softmaxes it also returns, are differentiable; the cost and
// scaling vectors are what the fused backward reads. A plain backward runs the fused reverse
// sweep. Under create_graph=True the gradient must carry a graph: it comes from autograd
// through the eager formulation, recomputed from the saved softmaxes (saved outputs, so they
// lead back here and on to the logits: every order of derivative works, no input is kept).
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
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({ps, pt, cost, x, y});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["n_iter"] = n_iter;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["student_dtype"] = student.scalar_type();
    ctx->saved_data["teacher_dtype"] = teacher.scalar_type();
    return {loss, ps, pt, cost, x, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<KdBackwardSig>("fastloss::sinkhorn_kd_backward");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& ps = s[0];
    const at::Tensor& pt = s[1];
    const bool need_s = ctx->needs_input_grad(0);
    const bool need_t = ctx->needs_input_grad(1);
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    const double scale = ctx->saved_data["scale"].toDouble();
    const c10::ScalarType student_dtype = ctx->saved_data["student_dtype"].toScalarType();
    const c10::ScalarType teacher_dtype = ctx->saved_data["teacher_dtype"].toScalarType();
    // Gradients in the softmaxes (accumulation dtype), then through them to the logits.
    at::Tensor g_ps = grads[1], g_pt = grads[2];
    at::Tensor ds, dt;
    if (grads[0].defined()) {
      // A forward-AD tangent in the loss's gradient (autograd.grad(..., grad_outputs=dual)):
      // the fused sweep would drop it without a word.
      TORCH_CHECK_NOT_IMPLEMENTED(!grads[0]._fw_grad(/*level=*/0).defined(),
                                  "fastloss.sinkhorn_kd_loss: forward-mode AD through its gradient (a dual "
                                  "grad_outputs) is not implemented");
      if (torch::autograd::GradMode::is_enabled()) {
        const at::Tensor loss = sinkhorn_kd_eager(ps, pt, eps, ctx->saved_data["n_iter"].toInt(), scale);
        variable_list wrt;
        if (need_s) wrt.push_back(ps);
        if (need_t) wrt.push_back(pt);
        const variable_list g = torch::autograd::grad({loss}, wrt, {grads[0].to(loss.scalar_type())},
                                                      /*retain_graph=*/true, /*create_graph=*/true,
                                                      /*allow_unused=*/true);
        const auto accumulate = [](at::Tensor& acc, const at::Tensor& g) {
          if (g.defined()) acc = acc.defined() ? acc + g : g;
        };
        if (need_s) accumulate(g_ps, g[0]);
        if (need_t) accumulate(g_pt, g[need_s ? 1 : 0]);
      } else {
        std::tie(ds, dt) = op.call(grads[0], ps, pt, s[2], s[3], s[4], temperature, eps, scale, need_s, need_t,
                                   student_dtype, teacher_dtype);
      }
    }
    // ds and dt as the fused sweep gave them (already in the logits' dtypes), plus the terms
    // that go through the softmaxes.
    const auto add_softmax_term = [&](at::Tensor& d, const at::Tensor& g, const at::Tensor& p,
                                      c10::ScalarType dtype) {
      if (!g.defined()) return;
      const at::Tensor term = softmax_temperature_vjp(g.to(p.scalar_type()), p, temperature);
      d = d.defined() ? d + term.to(dtype) : term.to(dtype);
    };
    if (need_s) add_softmax_term(ds, g_ps, ps, student_dtype);
    if (need_t) add_softmax_term(dt, g_pt, pt, teacher_dtype);
    return {need_s ? ds : at::Tensor(), need_t ? dt : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_kd_autograd(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, double eps, int64_t n_iter,
    double scale) {
  variable_list r = SinkhornKdFunction::apply(student, teacher, temperature, eps, n_iter, scale);
  // Detached here rather than marked non-differentiable in forward: compiled autograd asserts
  // on C++ Functions with non-differentiable outputs.
  return {r[0], r[1], r[2], r[3].detach(), r[4].detach(), r[5].detach()};
}

// Statistical top-k and the fused gelu-mul: the backward ops again in the backward (their own
// autograd, for double backward, is registered in Python).
using StatTopKSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double, bool, bool, c10::SymInt);
using StatTopKBackwardSig =
    at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, const at::Tensor&, int64_t, double, bool, bool, c10::SymInt);
using GeluMulSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, bool, c10::SymInt);
using GeluMulBackwardSig =
    std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, double, bool, c10::SymInt);

struct StatTopKFunction : torch::autograd::Function<StatTopKFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, double sparsity, bool hard,
                               bool threshold_grad, c10::SymInt k) {
    static const auto op = op_handle<StatTopKSig>("fastloss::stat_topk");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, theta, mean, std] = op.call(x, dim, sparsity, hard, threshold_grad, k);
    ctx->save_for_backward({x, theta, mean, std});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["sparsity"] = sparsity;
    ctx->saved_data["hard"] = hard;
    ctx->saved_data["threshold_grad"] = threshold_grad;
    ctx->saved_data["k"] = std::move(k);
    return {y, theta, mean, std};
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    static const auto op = op_handle<StatTopKBackwardSig>("fastloss::stat_topk_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &theta = saved[1], &mean = saved[2], &std = saved[3];
    const auto& d = ctx->saved_data;
    // The in-place kernel also reads theta's gradient: only a plain one (not a dual, nor a
    // batched one of is_grads_batched / vectorized jacobians, next to a plain zero grads[0]).
    const bool plain_theta_grad = !grads[1].defined() || plain_tensor(grads[1]);
    if (at::Tensor g = plain_theta_grad ? take_owned_cpu_gradient(grads, 0) : at::Tensor(); g.defined()) {
      const std::optional<at::Tensor> gt = optional_grad(grads[1], mean.scalar_type());
      if (cpu::stat_topk_backward_in_place(g, gt, x, theta, mean, std, d.at("dim").toInt(), d.at("sparsity").toDouble(),
                                           d.at("hard").toBool(), d.at("threshold_grad").toBool(),
                                           d.at("k").toSymInt().expect_int())) {
        return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
      }
      grads[0] = std::move(g);
    }
    const variable_list dx = linear_in_grads({grads[0], grads[1]}, [&](const variable_list& g, bool) -> variable_list {
      return {op.call(g[0].to(x.scalar_type()), optional_grad(g[1], mean.scalar_type()), x, theta, mean, std, d.at("dim").toInt(),
                      d.at("sparsity").toDouble(), d.at("hard").toBool(), d.at("threshold_grad").toBool(),
                      d.at("k").toSymInt())};
    });
    return {dx[0], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stat_topk_autograd(const at::Tensor& x, int64_t dim,
                                                                              double sparsity, bool hard,
                                                                              bool threshold_grad, c10::SymInt k) {
  const variable_list out = StatTopKFunction::apply(x, dim, sparsity, hard, threshold_grad, std::move(k));
  // Detached as in sinkhorn_kd_autograd.
  return {out[0], out[1], out[2].detach(), out[3].detach()};
}

struct GeluMulFunction : torch::autograd::Function<GeluMulFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up, double sparsity,
                               bool threshold_grad, c10::SymInt k) {
    static const auto op = op_handle<GeluMulSig>("fastloss::stat_topk_gelu_mul");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, theta, mean, std] = op.call(gate, up, sparsity, threshold_grad, k);
    ctx->save_for_backward({gate, up, theta, mean, std});
    ctx->saved_data["sparsity"] = sparsity;
    ctx->saved_data["threshold_grad"] = threshold_grad;
    ctx->saved_data["k"] = std::move(k);
    return {out, theta, mean, std};
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    static const auto op = op_handle<GeluMulBackwardSig>("fastloss::stat_topk_gelu_mul_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &up = saved[1];
    const auto& d = ctx->saved_data;
    if (at::Tensor g = take_owned_cpu_gradient(grads, 0); g.defined()) {
      // d up is written over the gradient.
      if (std::optional<at::Tensor> dgate = cpu::stat_topk_gelu_mul_backward_in_place(
              g, gate, up, saved[2], saved[3], saved[4], d.at("sparsity").toDouble(), d.at("threshold_grad").toBool(),
              d.at("k").toSymInt().expect_int())) {
        return {*dgate, g, at::Tensor(), at::Tensor(), at::Tensor()};
      }
      grads[0] = std::move(g);
    }
    const variable_list g = linear_in_grads({grads[0]}, [&](const variable_list& go, bool) -> variable_list {
      auto [dgate, dup] = op.call(go[0].to(gate.scalar_type()), gate, up, saved[2], saved[3], saved[4],
                                  d.at("sparsity").toDouble(), d.at("threshold_grad").toBool(), d.at("k").toSymInt());
      return {dgate, dup};
    });
    return {g[0], g[1], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_mul_autograd(const at::Tensor& gate,
                                                                             const at::Tensor& up, double sparsity,
                                                                             bool threshold_grad, c10::SymInt k) {
  const variable_list out = GeluMulFunction::apply(gate, up, sparsity, threshold_grad, std::move(k));
  // Detached as in sinkhorn_kd_autograd.
  return {out[0], out[1].detach(), out[2].detach(), out[3].detach()};
}

// Cut cross-entropy (the single-process op; the vocabulary-parallel shard op keeps its Python
// registration): the backward op again in the backward, for hidden, classifier and bias.
using LinearCrossEntropySig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 int64_t, double, double, double, double, bool);
using LinearCrossEntropyBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, double, double, double, std::array<bool, 3>,
    int64_t, int64_t, bool);

struct LinearCrossEntropyFunction : torch::autograd::Function<LinearCrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& classifier,
                               const at::Tensor& targets, const std::optional<at::Tensor>& bias, int64_t ignore_index,
                               double softcap, double label_smoothing, double z_loss, double filter_eps,
                               bool deterministic) {
    static const auto op = op_handle<LinearCrossEntropySig>("fastloss::linear_cross_entropy");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse] = op.call(hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                               filter_eps, deterministic);
    const bool has_bias = is_given(bias);
    ctx->save_for_backward({hidden, classifier, targets, has_bias ? *bias : at::Tensor(), lse});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["filter_eps"] = filter_eps;
    ctx->saved_data["deterministic"] = deterministic;
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<LinearCrossEntropyBackwardSig>("fastloss::linear_cross_entropy_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &classifier = saved[1], &targets = saved[2], &lse = saved[4];
    const auto& d = ctx->saved_data;
    const bool has_bias = d.at("has_bias").toBool();
    const std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(3)};
    // The tangent's backward is unfiltered (filter_eps 0): the filter's threshold depends on
    // each call's gradient scales, so filtered backwards would not add up linearly (and the
    // forward-mode rules of _lce_derivatives.py do not filter either).
    const variable_list g = linear_in_grads({grads[0], grads[1]}, [&](const variable_list& go,
                                                                      bool is_tangent) -> variable_list {
      auto [dh, dc, db] = op.call(go[0].to(lse.scalar_type()), optional_grad(go[1], lse.scalar_type()), hidden, classifier, targets, bias, lse,
                                  d.at("ignore_index").toInt(), d.at("softcap").toDouble(),
                                  d.at("label_smoothing").toDouble(), d.at("z_loss").toDouble(),
                                  is_tangent ? 0.0 : d.at("filter_eps").toDouble(), mask, 0, -1,
                                  d.at("deterministic").toBool());
      return {mask[0] ? dh : at::Tensor(), mask[1] ? dc : at::Tensor(), mask[2] ? db : at::Tensor()};
    });
    return {g[0], g[1], at::Tensor(), g[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autograd(const at::Tensor& hidden,
                                                                 const at::Tensor& classifier,
                                                                 const at::Tensor& targets,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 int64_t ignore_index, double softcap,
                                                                 double label_smoothing, double z_loss,
                                                                 double filter_eps, bool deterministic) {
  const variable_list out = LinearCrossEntropyFunction::apply(hidden, classifier, targets, bias, ignore_index, softcap,
                                                              label_smoothing, z_loss, filter_eps, deterministic);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastloss, Autograd, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
  m.impl("stat_topk", &stat_topk_autograd);
  m.impl("stat_topk_gelu_mul", &gelu_mul_autograd);
  m.impl("softmax", &softmax_autograd<false>);
  m.impl("log_softmax", &softmax_autograd<true>);
  m.impl("softmax_backward", &softmax_backward_autograd<false>);
  m.impl("log_softmax_backward", &softmax_backward_autograd<true>);
  m.impl("log_bessel_iv", &log_bessel_autograd<true>);
  m.impl("log_bessel_kv", &log_bessel_autograd<false>);
  m.impl("log_bessel_iv_grad", &log_bessel_grad_autograd<true>);
  m.impl("log_bessel_kv_grad", &log_bessel_grad_autograd<false>);
  m.impl("log_bessel_iv_hess", &log_bessel_hess_autograd<true>);
  m.impl("log_bessel_kv_hess", &log_bessel_hess_autograd<false>);
  m.impl("sinkhorn_kd", &sinkhorn_kd_autograd);
  m.impl("vmf_mean_resultant", &vmf_mean_resultant_autograd);
  m.impl("vmf_mean_resultant_complement", &vmf_unary_autograd<VmfUnary::Complement>);
  m.impl("vmf_entropy", &vmf_unary_autograd<VmfUnary::Entropy>);
  m.impl("vmf_log_normalizer", &vmf_unary_autograd<VmfUnary::LogNormalizer>);
  m.impl("vmf_kappa_mle", &vmf_kappa_mle_autograd);
}

}  // namespace fastloss
