"""Batched log-domain Sinkhorn and the SinKD distillation loss: wrappers, fake kernels and
autograd for ``torch.ops.fastloss.sinkhorn``, ``sinkhorn_kd`` and ``sinkhorn_kd_backward``."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, cast

import torch

from ._func import (batch_front, derivative_function, host_values_readable, loop_rule, no_derivative,
                    transform_function, transforms_active)
from ._guards import (FLOAT_DTYPES, check_dtype, check_floating, check_same_device, check_shape, check_tensor,
                      check_value)

_GRAD_MODES = ("envelope", "unrolled")


class SinkhornResult(NamedTuple):
    """What :func:`sinkhorn` returns; a leading batch dimension B when ``cost`` had one.

    plan: (B, n, m) transport plan P = exp((f_i + g_j - C_ij) / eps).
    f, g: (B, n), (B, m) potentials. The last update is g's, so g = eps log b -
        eps LSE_i((f_i - C_ij) / eps) holds exactly, and f = eps log a - eps LSE_j((g_j -
        C_ij) / eps) once the iterations have converged (f = -inf where a = 0, g = -inf
        where b = 0).
    value: (B,) the dual objective <f, a> + <g, b> - eps (<a, log a> + <b, log b>), which at
        convergence is the regularized OT value <P, C> + eps KL(P || a b^T) of the plan
        (before it, the two differ by about as much as the marginals do).
    n_iter: (B,) int64, the iterations used by each problem.
    marginal_error: (B,) the row-marginal error ||P 1 - a|| of the returned plan in the
        ``error_norm`` the stopping rule used (its columns sum to b up to rounding).
    """

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_number(name: str, arg: str, value, kind: type, what: str) -> None:
    """TypeError unless value is a Python (or numpy) number of `kind`; a tensor is refused by
    name (these options are compile-time constants of the ops, not data)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        got = f"a tensor ({value!r})" if isinstance(value, torch.Tensor) else f"{type(value).__name__} {value!r}"
        raise TypeError(f"fastloss.{name}: expected '{arg}' to be {what}, got {got}")


def _check_positive(name: str, arg: str, value) -> float:
    _check_number(name, arg, value, numbers.Real, "a Python number")
    # Comparisons rather than math.isfinite: torch.compile can trace them on symbolic floats.
    if not 0 < cast(float, value) < math.inf:
        raise ValueError(f"fastloss.{name}: expected '{arg}' to be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(name: str, arg: str, value) -> int:
    _check_number(name, arg, value, numbers.Integral, "an int")
    if not 0 <= value < 2**63:  # the ops take an int64
        raise ValueError(f"fastloss.{name}: expected '{arg}' to be an int in [0, 2**63), got {value!r}")
    return int(value)


def _marginal(name: str, arg: str, x: Optional[torch.Tensor], batch: int, size: int, cost: torch.Tensor,
              user_cost: torch.Tensor) -> torch.Tensor:
    """a or b as (B, size): uniform when None, a shared (size,) vector broadcast over the batch.
    cost is (B, n, m); user_cost is the cost as given, (n, m) or (B, n, m), for the message."""
    if x is None:
        return cost.new_full((batch, size), 1.0 / max(size, 1), dtype=_acc_dtype(cost.dtype))
    check_tensor(name, arg, x)
    check_floating(name, arg, x)
    if x.dim() == 1 and x.shape[0] == size:
        return x.unsqueeze(0).expand(batch, size)
    if x.dim() == 2 and user_cost.dim() == 3 and tuple(x.shape) == (batch, size):
        return x
    expected = f"({size},) or ({batch}, {size})" if user_cost.dim() == 3 else f"({size},)"
    raise ValueError(
        f"fastloss.{name}: expected '{arg}' to have shape {expected} to match 'cost' {tuple(user_cost.shape)}, "
        f"got {tuple(x.shape)}"
    )


_ERROR_NORMS = (1, 2, math.inf)


def _prepare(name: str, cost, a, b, eps, max_iter, tol, error_norm):
    check_tensor(name, "cost", cost)
    check_floating(name, "cost", cost)  # also for grad="unrolled", which does not reach the op
    if cost.dim() not in (2, 3):
        raise ValueError(f"fastloss.{name}: expected 'cost' to have shape (n, m) or (B, n, m), got {tuple(cost.shape)}")
    batched = cost.dim() == 3
    cost3 = cost if batched else cost.unsqueeze(0)
    B, n, m = cost3.shape
    if B > 0 and (n == 0 or m == 0):
        raise ValueError(f"fastloss.{name}: expected 'cost' to have n, m >= 1 (an empty side has no mass to "
                         f"transport), got {tuple(cost.shape)}")
    eps = _check_positive(name, "eps", eps)
    max_iter = _check_count(name, "max_iter", max_iter)
    _check_number(name, "tol", tol, numbers.Real, "a Python number")
    if not cast(float, tol) >= 0:
        raise ValueError(f"fastloss.{name}: expected 'tol' to be a number >= 0, got {tol!r}")
    if isinstance(error_norm, torch.Tensor):
        _check_number(name, "error_norm", error_norm, numbers.Real, "1, 2 or math.inf (a Python number)")
    if isinstance(error_norm, bool) or not isinstance(error_norm, numbers.Real) or error_norm not in _ERROR_NORMS:
        raise ValueError(f"fastloss.{name}: expected 'error_norm' to be 1, 2 or math.inf, got {error_norm!r}")
    a2 = _marginal(name, "a", a, B, n, cost3, cost)
    b2 = _marginal(name, "b", b, B, m, cost3, cost)
    return cost3, a2, b2, eps, max_iter, float(tol), float(error_norm), batched


def sinkhorn(
    cost: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    error_norm: float = 1,
) -> SinkhornResult:
    """Entropic optimal transport by log-domain Sinkhorn iterations, for one problem or a batch.

    Args:
        cost: (n, m) or (B, n, m) cost matrices; float32, float64, float16 or bfloat16
            (half precision is read as is and computed in float32).
        a, b: marginals of shape (n,) / (m,) (shared by every problem) or (B, n) / (B, m);
            uniform when None. Entries must be >= 0 (zeros allowed) with sum(a) == sum(b).
        eps: entropic regularization (> 0), in the units of the cost.
        max_iter: at most this many iterations per problem (each a row and a column update);
            0 returns the starting plan a b^T exp(-C / eps).
        tol: each problem stops independently once ||P 1 - a|| <= tol (checked every
            iteration at no extra cost), after at least one iteration.
        error_norm: the norm of that stopping rule: 1 (default, the strictest), 2 (as POT's
            solvers) or math.inf (the largest entry).

    Returns a :class:`SinkhornResult` (float32 for half-precision costs; float64 for
    float64). The results carry no gradient: use :func:`sinkhorn_cost` for a differentiable
    value. On CUDA, marginals with negative entries or unequal mass cannot be checked
    without a host synchronization: such problems come back as NaN instead of an error.
    """
    cost3, a2, b2, eps, max_iter, tol, error_norm, batched = _prepare(
        "sinkhorn", cost, a, b, eps, max_iter, tol, error_norm
    )
    # Results without derivatives: the inputs go in detached (under torch.func transforms too).
    plan, alpha, beta, value, n_iter, err = torch.ops.fastloss.sinkhorn.default(
        cost3.detach(), a2.detach(), b2.detach(), eps, max_iter, tol, error_norm)
    # -inf at zero-mass entries whatever their potential (NaN for a padded row of +inf costs).
    a_log, b_log = torch.log(a2.to(alpha.dtype)), torch.log(b2.to(beta.dtype))
    f = torch.where(a2 == 0, a_log, alpha + eps * a_log)
    g = torch.where(b2 == 0, b_log, beta + eps * b_log)
    out = SinkhornResult(plan.detach(), f.detach(), g.detach(), value.detach(), n_iter, err.detach())
    if not batched:
        out = SinkhornResult(*(t.squeeze(0) for t in out))
    return out


def sinkhorn_cost(
    cost: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    error_norm: float = 1,
    grad: str = "envelope",
) -> torch.Tensor:
    """The regularized OT value <P, C> + eps KL(P || a b^T) of each problem: shape (B,), or a
    scalar for a single (n, m) cost. Arguments as in :func:`sinkhorn`.

    grad="envelope" (default): gradients by the envelope theorem, P for the cost and the
        potentials f - eps log a, g - eps log b for the marginals (exact at convergence; for
        the marginals up to an additive constant, as they live on the simplex). One solve, no
        extra memory.
    grad="unrolled": the exact gradient of the computed value through every iteration, by
        autograd through a PyTorch log-domain loop that runs max_iter iterations with each
        problem frozen once it meets tol (no early exit: memory and time grow with max_iter).
        Its marginal checks run on CPU tensors only (they would need a sync on CUDA).
    """
    if grad not in _GRAD_MODES:
        raise ValueError(f"fastloss.sinkhorn_cost: expected 'grad' to be one of {_GRAD_MODES}, got {grad!r}")
    cost3, a2, b2, eps, max_iter, tol, error_norm, batched = _prepare(
        "sinkhorn_cost", cost, a, b, eps, max_iter, tol, error_norm
    )
    if grad == "envelope":
        value = _solve(cost3, a2, b2, eps, max_iter, tol, error_norm)[3]
    else:
        value = _unrolled_value(cost3, a2, b2, eps, max_iter, tol, error_norm)
    return value if batched else value.squeeze(0)


def _solve(cost, a, b, eps, max_iter, tol, error_norm):
    if transforms_active(cost, a, b):
        return _SINKHORN_FN.apply(cost, a, b, eps, max_iter, tol, error_norm)
    return torch.ops.fastloss.sinkhorn.default(cost, a, b, eps, max_iter, tol, error_norm)


def _unrolled_value(cost, a, b, eps, max_iter, tol, error_norm):
    """The same iteration as the kernels, written with differentiable torch ops."""
    # (The marginal checks branch on values, which torch.func.vmap cannot do.)
    valid = _marginals_valid(a, b)
    if host_values_readable(a, b):
        _check_marginals(a.detach(), b.detach())
    elif a.device.type == "cpu" and not torch._C._are_functorch_transforms_active():
        # Compiled (or traced) on the CPU: a check in the graph, as the kernels' own check of
        # the envelope path, instead of a silent NaN. (Not under torch.func transforms; that
        # test, unlike vmap_active's, compiles to a constant.)
        torch._assert_async(valid.all(), "fastloss.sinkhorn: expected 'a' and 'b' to be finite and >= 0, with "
                            "positive and equal total mass in each problem (balanced OT)")
    acc = _acc_dtype(cost.dtype)
    a = a.to(acc)
    b = b.to(acc)
    # Costs of zero-mass rows and columns take no part (as in the kernels): 0 in their place, so
    # a padded entry of +-inf or NaN neither poisons the logsumexps nor their gradients.
    massed = (a[:, :, None] > 0) & (b[:, None, :] > 0)
    c = torch.where(massed, cost.to(acc) / eps, torch.zeros((), dtype=acc, device=a.device))
    # log 0 = -inf with a zero gradient (torch.log's 1/a times a zero weight would be NaN).
    neg_inf = torch.tensor(-math.inf, dtype=acc, device=a.device)
    log_a = torch.where(a > 0, torch.log(torch.where(a > 0, a, 1.0)), neg_inf)[:, :, None]
    log_b = torch.where(b > 0, torch.log(torch.where(b > 0, b, 1.0)), neg_inf)[:, None, :]
    u = torch.zeros_like(a)
    v = torch.zeros_like(b)
    active = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    for it in range(max_iter + 1):
        u_new = -torch.logsumexp(log_b + v[:, None, :] - c, dim=2)
        row_ratio = torch.exp(u - u_new)  # row marginal / a under the current (u, v)
        terms = torch.where(a > 0, a * (row_ratio - 1).abs(), torch.zeros_like(a))
        err = torch.linalg.vector_norm(terms, ord=error_norm, dim=1)
        if it > 0:  # as the kernels: the starting iterate never meets tol
            active = active & ~(err <= tol)
        if it == max_iter:
            if max_iter == 0:
                # The starting potentials are measured: tie them to the inputs through a select
                # that takes nothing from u_new, so backward gives the exact (zero) gradient.
                u = torch.where(torch.zeros_like(active)[:, None], u_new, u)
            break
        u = torch.where(active[:, None], u_new, u)
        v_new = -torch.logsumexp(log_a + u[:, :, None] - c, dim=1)
        v = torch.where(active[:, None], v_new, v)
    zero = torch.zeros((), dtype=acc, device=a.device)
    value = (torch.where(a > 0, a * u, zero).sum(1) + torch.where(b > 0, b * v, zero).sum(1)) * eps
    # A NaN error (a NaN or -inf cost) gives a NaN value, as in the kernels; so do invalid
    # marginals where they could not be checked (compiled, vmapped, CUDA).
    return torch.where(torch.isnan(err) | ~valid, torch.full((), math.nan, dtype=acc, device=a.device), value)


def _mass_tolerance(a: torch.Tensor, b: torch.Tensor) -> float:
    """sinkhorn_mass_tolerance (csrc/common/sinkhorn_op.h)."""
    return max(max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps) ** 0.5, 1e-6)


def _marginals_valid(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per problem, whether a and b pass _check_marginals' tests, as a (B,) tensor (no branch
    on values: usable compiled and under vmap)."""
    entries_ok = (torch.isfinite(a) & (a >= 0)).all(1) & (torch.isfinite(b) & (b >= 0)).all(1)
    sa, sb = a.double().sum(1), b.double().sum(1)
    return entries_ok & (sa > 0) & (sb > 0) & ((sa - sb).abs() <= _mass_tolerance(a, b) * torch.maximum(sa, sb))


def _check_marginals(a: torch.Tensor, b: torch.Tensor) -> None:
    """The checks the CPU kernel makes, for the unrolled path (same messages)."""
    for name, x in (("a", a), ("b", b)):
        bad = ~(torch.isfinite(x) & (x >= 0))
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise RuntimeError(f"fastloss.sinkhorn: expected '{name}' to be finite and >= 0, got {name}{list(idx)} = {x[idx].item()}")
    sa, sb = a.double().sum(1), b.double().sum(1)
    tol = _mass_tolerance(a, b)
    if not ((sa > 0) & (sb > 0)).all():
        raise RuntimeError("fastloss.sinkhorn: expected 'a' and 'b' to have positive total mass")
    relative = (sa - sb).abs() / torch.maximum(sa, sb)
    bad = (relative > tol).nonzero()
    if bad.numel():
        k = int(bad[0])
        raise RuntimeError(
            f"fastloss.sinkhorn: expected 'a' and 'b' to have the same total mass (balanced OT), got "
            f"{sa[k].item()!r} and {sb[k].item()!r} in problem {k} (relative difference {relative[k].item():.6g}, "
            f"tolerance {tol:.6g})")


def _sinkhorn_fake(cost, a, b, eps, max_iter, tol, error_norm=1.0):
    # The op's checks (csrc/common/sinkhorn_op.h).
    op = "sinkhorn"
    for arg, t in (("cost", cost), ("a", a), ("b", b)):
        check_floating(op, arg, t)
    check_value(cost.dim() == 3, op, f"expected 'cost' to have shape (B, n, m), got {tuple(cost.shape)}")
    B, n, m = cost.shape
    check_shape(op, "a", a, (B, n), f"({B}, {n}) to match 'cost' {tuple(cost.shape)}")
    check_shape(op, "b", b, (B, m), f"({B}, {m}) to match 'cost' {tuple(cost.shape)}")
    check_same_device(op, cost=cost, a=a, b=b)
    check_value(B == 0 or (n > 0 and m > 0), op, f"expected 'cost' to have n, m >= 1 (an empty side has no mass to "
                f"transport), got {tuple(cost.shape)}")
    check_value(math.isfinite(eps) and eps > 0, op, f"expected 'eps' > 0, got {eps}")
    check_value(max_iter >= 0, op, f"expected 'max_iter' >= 0, got {max_iter}")
    check_value(tol >= 0, op, f"expected 'tol' >= 0, got {tol}")
    check_value(error_norm in (1, 2, math.inf), op, f"expected 'error_norm' to be 1, 2 or inf, got {error_norm}")
    acc = _acc_dtype(cost.dtype)
    return (
        cost.new_empty((B, n, m), dtype=acc),
        cost.new_empty((B, n), dtype=acc),
        cost.new_empty((B, m), dtype=acc),
        cost.new_empty((B,), dtype=acc),
        cost.new_empty((B,), dtype=torch.int64),
        cost.new_empty((B,), dtype=acc),
    )


torch.library.register_fake("fastloss::sinkhorn")(_sinkhorn_fake)


def _sinkhorn_setup_context(ctx, inputs, output):
    cost, a, b = inputs[:3]
    plan, alpha, beta, _value, n_iter, err = output
    ctx.mark_non_differentiable(plan, alpha, beta, n_iter, err)
    # Only the value's gradient is read: the others stay None (materialized, the plan's was a
    # float32 tensor of the plan's size).
    ctx.set_materialize_grads(False)
    ctx.dtypes = (cost.dtype, a.dtype, b.dtype)
    # The inputs only root a create_graph=True graph (below), and only those that require grad
    # can: the others are not saved (saving refused inference-mode inputs, and inputs modified
    # in place after the call, although the gradient never reads them).
    ctx.save_for_backward(plan, alpha, beta, *(t if t.requires_grad else None for t in (cost, a, b)))


def _sinkhorn_backward(ctx, _g_plan, _g_alpha, _g_beta, g_value, _g_n_iter, _g_err):
    if g_value is None:
        return (None,) * 7
    plan, alpha, beta, cost, a, b = ctx.saved_tensors
    # Under create_graph=True the gradients must carry a graph of their own, rooted at the
    # inputs, so that differentiating them (backward(), autograd.grad with respect to the
    # cost or marginals, Hessian-vector products) reaches _EnvelopeGrad.backward's error;
    # without these inputs they came back as constants and a gradient penalty silently lost
    # its second-order term (and autograd.grad saw a graph that never used the cost).
    grads = _EnvelopeGrad.apply(g_value, plan, alpha, beta, ctx.needs_input_grad[:3], ctx.dtypes, cost, a, b)
    return (*grads, None, None, None, None)


def _envelope_grads(g_value, plan, alpha, beta, needs, dtypes):
    """Envelope theorem: d value / d cost = P, d value / d a = alpha, d value / d b = beta."""
    cost_dtype, a_dtype, b_dtype = dtypes
    g = g_value.to(plan.dtype)
    return ((g[:, None, None] * plan).to(cost_dtype) if needs[0] else None,
            (g[:, None] * alpha).to(a_dtype) if needs[1] else None,
            (g[:, None] * beta).to(b_dtype) if needs[2] else None)


_ENVELOPE_SECOND_DERIVATIVE = (
    "fastloss.sinkhorn_cost: the envelope gradient (grad='envelope') has no derivative of its own (it would need "
    "the plan's derivative in the cost); use grad='unrolled' for second derivatives")


class _EnvelopeGrad(torch.autograd.Function):
    """The envelope gradients (eager autograd). P and the potentials are saved without their
    own dependence on the inputs, so a graph built through these gradients (create_graph=True)
    would silently miss the derivative of the plan with respect to the cost: differentiating
    them raises instead."""

    @staticmethod
    def forward(ctx, g_value, plan, alpha, beta, needs, dtypes, _cost, _a, _b):
        return _envelope_grads(g_value, plan, alpha, beta, needs, dtypes)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_ENVELOPE_SECOND_DERIVATIVE)

    @staticmethod
    def jvp(ctx, *tangents):  # a dual grad_outputs (forward over reverse)
        raise NotImplementedError(_ENVELOPE_SECOND_DERIVATIVE)


torch.library.register_autograd("fastloss::sinkhorn", _sinkhorn_backward, setup_context=_sinkhorn_setup_context)


# Under torch.func transforms (see _func.py): the envelope gradient again. The plan and the
# potentials stay differentiable outputs there, so that differentiating the gradient (a
# Hessian) reaches this backward with their cotangents and raises, rather than treating them
# as constants; sinkhorn() detaches them.
def _sinkhorn_transform_setup(ctx, inputs, output):
    cost, a, b = inputs[:3]
    plan, alpha, beta, _value, n_iter, err = output
    ctx.mark_non_differentiable(n_iter, err)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (cost.dtype, a.dtype, b.dtype)
    ctx.save_for_backward(plan, alpha, beta)


def _sinkhorn_transform_backward(ctx, g_plan, g_alpha, g_beta, g_value, _g_n_iter, _g_err):
    if g_plan is not None or g_alpha is not None or g_beta is not None:
        raise NotImplementedError(_ENVELOPE_SECOND_DERIVATIVE)
    if g_value is None:
        return (None,) * 7
    grads = _envelope_grads(g_value, *ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.dtypes)
    return (*grads, None, None, None, None)


_SINKHORN_FN = transform_function("sinkhorn_cost", torch.ops.fastloss.sinkhorn.default, _sinkhorn_transform_setup,
                                  _sinkhorn_transform_backward)


@torch.library.register_vmap("fastloss::sinkhorn")
def _sinkhorn_vmap(info, in_dims, cost, a, b, *options):
    # The vmapped batch folds into the op's own batch of problems.
    cost, a, b = (batch_front(t, d, info.batch_size) for t, d in zip((cost, a, b), in_dims))
    out = torch.ops.fastloss.sinkhorn.default(cost.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1), *options)
    return tuple(t.unflatten(0, cost.shape[:2]) for t in out), (0,) * 6


# ---------------------------------------------------------------------------------------------
# SinKD


def check_kd_options(name: str, temperature, eps, n_iter, scale):
    """SinKD's scalar options, checked and normalized (also by nn.SinkhornKDLoss when built)."""
    temperature = _check_positive(name, "temperature", temperature)
    eps = _check_positive(name, "eps", eps)
    n_iter = _check_count(name, "n_iter", n_iter)
    _check_number(name, "scale", scale, numbers.Real, "a Python number")
    if not -math.inf < cast(float, scale) < math.inf:
        raise ValueError(f"fastloss.{name}: expected 'scale' to be a finite number, got {scale!r}")
    return temperature, eps, n_iter, float(scale)


def sinkhorn_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    eps: float = 0.1,
    n_iter: int = 20,
    scale: float = 0.001,
) -> torch.Tensor:
    """The SinKD distillation loss (Cui et al. 2024), exactly as its authors compute it:

        p_s = softmax(student_logits / T), p_t = softmax(teacher_logits / T)    (B, C)
        W = cdist(p_s, p_t, p=1)                                                (B, B)
        P = exp(-W / eps); n_iter times: P /= P.sum(1); P /= P.sum(0)
        loss = scale * sum(P * W)

    The gradient (to both logits, as autograd through that formulation gives it) is computed
    by a fused reverse sweep, not by autograd through n_iter steps. Under create_graph=True it
    comes from autograd through the formulation instead (recomputed from the saved softmaxes),
    so second and higher derivatives work. Logits of shape (B, C),
    any float dtype (computed in float32, float64 for float64; the normalizations in float64
    where float32's range would not hold them); the loss has their dtype.
    """
    check_tensor("sinkhorn_kd_loss", "student_logits", student_logits)
    check_tensor("sinkhorn_kd_loss", "teacher_logits", teacher_logits)
    temperature, eps, n_iter, scale = check_kd_options("sinkhorn_kd_loss", temperature, eps, n_iter, scale)
    args = (student_logits, teacher_logits, temperature, eps, n_iter, scale)
    if transforms_active(student_logits, teacher_logits):
        return _KD_FN.apply(*args)[0]
    return torch.ops.fastloss.sinkhorn_kd.default(*args)[0]


def _kd_fake(student, teacher, temperature, eps, n_iter, scale):
    op = "sinkhorn_kd_loss"
    check_floating(op, "student_logits", student)
    check_floating(op, "teacher_logits", teacher)
    check_value(student.dim() == 2, op, f"expected 'student_logits' to have shape (B, classes), got "
                f"{tuple(student.shape)}")
    check_shape(op, "teacher_logits", teacher, student.shape, f"{tuple(student.shape)} (that of 'student_logits')")
    check_same_device(op, student_logits=student, teacher_logits=teacher)
    B, C = student.shape
    torch._check(C > 0 or B == 0, lambda: f"fastloss.{op}: expected at least one class, got 'student_logits' of "
                 f"shape {tuple(student.shape)}")
    check_value(math.isfinite(temperature) and temperature > 0, op, f"expected 'temperature' > 0, got {temperature}")
    check_value(math.isfinite(eps) and eps > 0, op, f"expected 'eps' > 0, got {eps}")
    check_value(n_iter >= 0, op, f"expected 'n_iter' >= 0, got {n_iter}")
    max_n_iter = (2**63 - 1) // 8 // torch.sym_max(B, 1) - 1  # the op's bound, without a guard on B
    torch._check(n_iter <= max_n_iter, lambda: f"fastloss.{op}: expected 'n_iter' <= {max_n_iter} (the saved "
                 f"scalings are (n_iter + 1) x B float64 values), got {n_iter}")
    check_value(math.isfinite(scale), op, f"expected 'scale' to be finite, got {scale}")
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    loss_dtype = torch.promote_types(student.dtype, teacher.dtype)
    return (
        student.new_empty((), dtype=loss_dtype),
        student.new_empty((B, C), dtype=acc),
        student.new_empty((B, C), dtype=acc),
        student.new_empty((B, B), dtype=acc),
        student.new_empty((n_iter + 1, B), dtype=torch.float64),
        student.new_empty((n_iter + 1, B), dtype=torch.float64),
    )


def _kd_backward_fake(grad_loss, ps, pt, cost, x, y, temperature, eps, scale, student_grad, teacher_grad,
                      student_dtype, teacher_dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    op = "sinkhorn_kd_backward"
    check_floating(op, "grad_loss", grad_loss)
    torch._check(grad_loss.numel() == 1, lambda: f"fastloss.{op}: expected 'grad_loss' to be a scalar, got shape "
                 f"{tuple(grad_loss.shape)}")
    check_value(ps.dtype in (torch.float32, torch.float64) and ps.dim() == 2, op,
                f"expected 'p_student' of shape (B, C), float32 or float64, got {ps.dtype} of shape {tuple(ps.shape)}")
    B, C = ps.shape
    check_value(x.dim() == 2 and x.shape[0] >= 1, op, f"expected 'x' of shape (n_iter + 1, {B}), got {tuple(x.shape)}")
    for arg, t, shape in (("p_teacher", pt, (B, C)), ("cost", cost, (B, B)), ("x", x, (x.shape[0], B)),
                          ("y", y, (x.shape[0], B))):
        check_shape(op, arg, t, shape, str(tuple(shape)))
        check_dtype(op, arg, t, torch.float64 if arg in ("x", "y") else ps.dtype)
    check_same_device(op, ps=ps, grad_loss=grad_loss, pt=pt, cost=cost, x=x, y=y)
    check_value(student_dtype in FLOAT_DTYPES and teacher_dtype in FLOAT_DTYPES, op,
                f"expected floating 'student_dtype' and 'teacher_dtype', got {student_dtype} and {teacher_dtype}")
    check_value(math.isfinite(temperature) and temperature > 0, op, f"expected 'temperature' > 0, got {temperature}")
    check_value(math.isfinite(eps) and eps > 0, op, f"expected 'eps' > 0, got {eps}")
    check_value(math.isfinite(scale), op, f"expected 'scale' to be finite, got {scale}")
    ds = ps.new_empty((B, C) if student_grad else (0, 0), dtype=student_dtype)
    dt = ps.new_empty((B, C) if teacher_grad else (0, 0), dtype=teacher_dtype)
    return ds, dt


torch.library.register_fake("fastloss::sinkhorn_kd")(_kd_fake)
torch.library.register_fake("fastloss::sinkhorn_kd_backward")(_kd_backward_fake)


# Autograd of sinkhorn_kd is registered in C++ (csrc/autograd.cpp).


# Under torch.func transforms (see _func.py): the fused reverse sweep, first derivatives only
# (the eager path's second derivatives recompute the formulation under create_graph=True).


# The saved softmaxes, cost and scalings stay differentiable outputs (as the envelope
# Sinkhorn's plan): a second derivative then reaches this backward with their cotangents and
# raises, where constants would have made it silently 0.
def _kd_transform_setup(ctx, inputs, output):
    student, teacher, temperature, eps, _n_iter, scale = inputs
    _loss, ps, pt, cost, x, y = output
    ctx.set_materialize_grads(False)
    ctx.options = (temperature, eps, scale)
    ctx.dtypes = (student.dtype, teacher.dtype)
    ctx.save_for_backward(ps, pt, cost, x, y)


def _kd_transform_backward(ctx, g_loss, *g_saved):
    if any(g is not None for g in g_saved):
        _KD_NO_SECOND(ctx)
    if g_loss is None:
        return (None,) * 6
    need_s, need_t = ctx.needs_input_grad[:2]
    ds, dt = _KD_BACKWARD_FN.apply(g_loss, *ctx.saved_tensors, *ctx.options, need_s, need_t, *ctx.dtypes)
    return (ds if need_s else None), (dt if need_t else None), None, None, None, None


_KD_SECOND_DERIVATIVE = ("a second derivative under torch.func transforms (hessian, jacrev of jacrev; eager double "
                         "backward works)")
_KD_NO_SECOND = no_derivative("fastloss.sinkhorn_kd_loss", _KD_SECOND_DERIVATIVE)
_KD_BACKWARD_FN = derivative_function("sinkhorn_kd_backward", torch.ops.fastloss.sinkhorn_kd_backward.default,
                                      "fastloss.sinkhorn_kd_loss", _KD_SECOND_DERIVATIVE)
_KD_FN = transform_function("sinkhorn_kd_loss", torch.ops.fastloss.sinkhorn_kd.default, _kd_transform_setup,
                            _kd_transform_backward)
# Each SinKD problem couples its whole batch (a B x B plan): a vmapped batch of them is a loop.
torch.library.register_vmap("fastloss::sinkhorn_kd")(loop_rule(torch.ops.fastloss.sinkhorn_kd.default))
torch.library.register_vmap("fastloss::sinkhorn_kd_backward")(loop_rule(torch.ops.fastloss.sinkhorn_kd_backward.default))
