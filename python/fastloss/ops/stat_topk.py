"""Statistical top-k masking (Spark Transformer, arXiv 2506.06644; Gemma 3n): wrappers, fake
kernels and autograd for ``torch.ops.fastloss.stat_topk`` and ``stat_topk_gelu_mul``."""

from __future__ import annotations

import numbers
import statistics
from typing import Literal, Optional, Tuple, Union, overload

import torch

from ._func import batch_front, row_rule, transform_function, transforms_active
from ._guards import (check_bool, check_dim, check_dtype, check_floating, check_like, check_same_device, check_shape,
                      check_tensor, check_value, wrap_dim)

_MODES = ("soft", "hard")


def check_amount(name: str, sparsity: Optional[float],
                 k: Union[int, torch.SymInt, None]) -> Tuple[Optional[float], Union[int, torch.SymInt, None]]:
    """Exactly one of ``sparsity`` and ``k``: sparsity a float in (0, 1), or k an int (its range
    waits for the rows). Returns them as (float or None, int or None)."""
    if (sparsity is None) == (k is None):
        raise ValueError(f"fastloss.{name}: give exactly one of 'sparsity' and 'k' "
                         f"(got sparsity={sparsity!r}, k={k!r})")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"fastloss.{name}: 'k' must be an int, got {type(k).__name__}")
        return None, k if isinstance(k, torch.SymInt) else int(k)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"fastloss.{name}: 'sparsity' must be a float, got {type(sparsity).__name__}")
    if not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"fastloss.{name}: 'sparsity' must be in (0, 1) (the fraction of each row "
                         f"that is zeroed), got {float(sparsity)}")
    return float(sparsity), None


def check_mode(name: str, mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"fastloss.{name}: 'mode' must be 'soft' or 'hard', got {mode!r}")
    return mode


def op_amount(name: str, row_length: int, sparsity: Optional[float],
              k: Union[int, torch.SymInt, None]) -> Tuple[float, Union[int, torch.SymInt]]:
    """The ops' (sparsity, k) arguments for rows of ``row_length``, from exactly one of
    ``sparsity`` and ``k`` (check_amount), with k in (0, row_length): (sparsity, 0), or
    (unused, k). k goes to the ops as is (they resolve 1 - k/d themselves), so that a graph
    traced with a symbolic row length d (and k, say d // 8) does not specialize on d."""
    s, keep = check_amount(name, sparsity, k)
    if keep is None:
        assert s is not None
        return s, 0
    if not 0 < keep < row_length:
        raise ValueError(f"fastloss.{name}: 'k' must be in (0, {row_length}) for rows of length "
                         f"{row_length}, got {keep}")
    return 0.0, keep


def effective_sparsity(sparsity: float, k: int, row_length: int) -> float:
    """The sparsity an op call with (sparsity, k) uses on rows of ``row_length``."""
    return 1.0 - k / row_length if k else sparsity


def _row_length(name: str, x: torch.Tensor, dim: int) -> int:
    wrapped = wrap_dim(name, dim, x.dim())
    return x.shape[wrapped] if x.dim() > 0 else 1


@overload
def stat_topk(x: torch.Tensor, *, sparsity: Optional[float] = ..., k: Optional[int] = ..., dim: int = ...,
              mode: str = ..., return_threshold: Literal[False] = ..., threshold_grad: bool = ...) -> torch.Tensor: ...
@overload
def stat_topk(x: torch.Tensor, *, sparsity: Optional[float] = ..., k: Optional[int] = ..., dim: int = ...,
              mode: str = ..., return_threshold: Literal[True],
              threshold_grad: bool = ...) -> Tuple[torch.Tensor, torch.Tensor]: ...
@overload
def stat_topk(x: torch.Tensor, *, sparsity: Optional[float] = ..., k: Optional[int] = ..., dim: int = ...,
              mode: str = ..., return_threshold: bool = ...,
              threshold_grad: bool = ...) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]: ...
def stat_topk(
    x: torch.Tensor,
    *,
    sparsity: Optional[float] = None,
    k: Optional[int] = None,
    dim: int = -1,
    mode: str = "soft",
    return_threshold: bool = False,
    threshold_grad: bool = True,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Statistical top-k masking along ``dim``, in one fused kernel.

    Per row, ``theta = mean + std * PhiInv(sparsity)`` with the biased std (Gemma 3n's
    formula); entries above ``theta`` are kept: ``mode="soft"`` returns ``relu(x - theta)``,
    ``mode="hard"`` returns ``x * (x > theta)``. On roughly Gaussian rows about ``k`` entries
    survive, without sorting.

    Args:
        x: float32, float64, float16 or bfloat16 tensor, any shape and strides.
        sparsity: the fraction of each row to zero, in (0, 1). Exactly one of ``sparsity``
            and ``k`` (``sparsity = 1 - k / x.shape[dim]``).
        k: the number of entries to keep per row, in (0, x.shape[dim]).
        dim: the dimension the rows run along.
        mode: ``"soft"`` or ``"hard"``.
        return_threshold: also return ``theta`` (shape of ``x`` with size 1 at ``dim``; float32
            for half inputs, float64 for float64); the mask is ``x > theta``.
        threshold_grad: if False, the gradient does not flow through ``theta`` (it is treated
            as a constant, and the returned ``theta`` is detached).

    A constant row (std = 0) has ``theta`` = its value, so every entry is zeroed; its
    gradient through the std is taken as 0. A NaN makes its own row NaN (soft) or zero with
    NaN at the NaN (hard), like the eager formula; other rows are unaffected.
    """
    check_tensor("stat_topk", "x", x)
    check_mode("stat_topk", mode)
    dim = check_dim("stat_topk", dim)  # a Python int: under torch.compile a NumPy one reached the op as a tensor
    s, keep = op_amount("stat_topk", _row_length("stat_topk", x, dim), sparsity, k)
    return_threshold = check_bool("stat_topk", "return_threshold", return_threshold)
    threshold_grad = check_bool("stat_topk", "threshold_grad", threshold_grad)
    args = (x, dim, s, mode == "hard", threshold_grad, keep)
    if transforms_active(x):
        y, theta, _mean, _std = _STAT_TOPK_FN.apply(*args)
    else:
        y, theta, _mean, _std = torch.ops.fastloss.stat_topk.default(*args)
    if not return_threshold:
        return y
    return y, (theta if threshold_grad else theta.detach())


def stat_topk_gelu_mul(
    gate: torch.Tensor,
    up: torch.Tensor,
    sparsity: Optional[float] = None,
    *,
    k: Optional[int] = None,
    threshold_grad: bool = True,
) -> torch.Tensor:
    """Gemma 3n's sparse MLP activation in one kernel: ``gelu_tanh(relu(gate - theta)) * up``.

    ``theta`` is the statistical top-k threshold of each row of ``gate`` along the last
    dimension (see :func:`stat_topk`); ``gate`` and ``up`` have the same shape and dtype.
    Equal to ``F.gelu(stat_topk(gate, sparsity=s), approximate="tanh") * up``, with one read of
    each input and one write, and a fused backward.

    Args:
        gate: float32, float64, float16 or bfloat16 tensor with at least one dimension.
        up: a tensor of ``gate``'s shape, dtype and device.
        sparsity: the fraction of each row of ``gate`` to zero, in (0, 1). Exactly one of
            ``sparsity`` and ``k`` (``sparsity = 1 - k / gate.shape[-1]``).
        k: the number of entries to keep per row, in (0, gate.shape[-1]).
        threshold_grad: if False, the gradient does not flow through ``theta``.
    """
    check_tensor("stat_topk_gelu_mul", "gate", gate)
    check_tensor("stat_topk_gelu_mul", "up", up)
    if gate.dim() == 0:
        raise ValueError("fastloss.stat_topk_gelu_mul: 'gate' must have at least one dimension")
    s, keep = op_amount("stat_topk_gelu_mul", gate.shape[-1], sparsity, k)
    threshold_grad = check_bool("stat_topk_gelu_mul", "threshold_grad", threshold_grad)
    args = (gate, up, s, threshold_grad, keep)
    if transforms_active(gate, up):
        out, _theta, _mean, _std = _GELU_MUL_FN.apply(*args)
    else:
        out, _theta, _mean, _std = torch.ops.fastloss.stat_topk_gelu_mul.default(*args)
    return out


# --------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only)


def _stat_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    if shape:
        shape[dim] = 1
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(shape, dtype=dtype)


def _check_forward(op: str, arg: str, x: torch.Tensor, dim: int, sparsity: float, k) -> int:
    """The ops' checks of (x, dim, sparsity, k) (csrc/common/stat_topk_op.h); returns dim wrapped."""
    check_floating(op, arg, x)
    wrapped = wrap_dim(op, dim, x.dim())
    d = x.shape[wrapped] if x.dim() > 0 else 1
    k_message = lambda: f"fastloss.{op}: 'k' must be in (0, {d}) for rows of length {d}, got {k}"  # noqa: E731
    sparsity_message = f"'sparsity' must be in (0, 1) (the fraction of each row that is zeroed), got {sparsity}"
    if isinstance(k, torch.SymInt):  # k = 0 means sparsity; no branch on a symbolic value
        torch._check((k == 0) | ((k > 0) & (k < d)), k_message)
        torch._check((k != 0) | (0.0 < sparsity < 1.0), lambda: f"fastloss.{op}: {sparsity_message}")
    elif k == 0:
        check_value(0.0 < sparsity < 1.0, op, sparsity_message)
    else:
        torch._check(0 < k, k_message)
        torch._check(k < d, k_message)
    return wrapped


def _check_stats(op: str, x: torch.Tensor, dim: int, **stats) -> None:
    like = _stat_like(x, dim)
    for arg, t in stats.items():
        if t is not None:
            check_shape(op, arg, t, like.shape, f"{tuple(like.shape)}")
            check_dtype(op, arg, t, like.dtype)


@torch.library.register_fake("fastloss::stat_topk")
def _stat_topk_fake(x, dim, sparsity, hard=False, threshold_grad=True, k=0):
    dim = _check_forward("stat_topk", "x", x, dim, sparsity, k)
    return x.new_empty(x.shape), _stat_like(x, dim), _stat_like(x, dim), _stat_like(x, dim)


@torch.library.register_fake("fastloss::stat_topk_backward")
def _stat_topk_backward_fake(grad_y, grad_theta, x, theta, mean, std, dim, sparsity, hard, threshold_grad, k=0):
    op = "stat_topk_backward"
    dim = _check_forward(op, "x", x, dim, sparsity, k)
    check_like(op, "grad_y", grad_y, "x", x)
    _check_stats(op, x, dim, theta=theta, mean=mean, std=std, grad_theta=grad_theta)
    check_same_device(op, x=x, grad_y=grad_y, grad_theta=grad_theta, theta=theta, mean=mean, std=std)
    return x.new_empty(x.shape)


def _check_gelu_mul(op: str, gate: torch.Tensor, up: torch.Tensor, sparsity: float, k) -> None:
    check_value(gate.dim() >= 1, op, "'gate' must have at least one dimension, got a 0-d tensor")
    check_like(op, "up", up, "gate", gate)
    _check_forward(op, "gate", gate, -1, sparsity, k)


@torch.library.register_fake("fastloss::stat_topk_gelu_mul")
def _gelu_mul_fake(gate, up, sparsity, threshold_grad=True, k=0):
    _check_gelu_mul("stat_topk_gelu_mul", gate, up, sparsity, k)
    check_same_device("stat_topk_gelu_mul", gate=gate, up=up)
    return gate.new_empty(gate.shape), _stat_like(gate, -1), _stat_like(gate, -1), _stat_like(gate, -1)


@torch.library.register_fake("fastloss::stat_topk_gelu_mul_backward")
def _gelu_mul_backward_fake(grad_out, gate, up, theta, mean, std, sparsity, threshold_grad, k=0):
    op = "stat_topk_gelu_mul_backward"
    _check_gelu_mul(op, gate, up, sparsity, k)
    check_like(op, "grad_out", grad_out, "gate", gate)
    _check_stats(op, gate, -1, theta=theta, mean=mean, std=std)
    check_same_device(op, gate=gate, up=up, grad_out=grad_out, theta=theta, mean=mean, std=std)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


# --------------------------------------------------------------------------------------------
# Autograd: stat_topk and stat_topk_gelu_mul have C++ autograd kernels (csrc/autograd.cpp:
# the Python registration cost ~25 us per forward and ~45 us per backward at 64 x 1024);
# their backward ops' derivatives are below.


def _with_defaults(inputs, k_index: int):
    """An op call's arguments with k (the last, default 0) filled in if it was left out."""
    return (*inputs, 0) if len(inputs) == k_index else tuple(inputs)


def _stat_topk_save(ctx, inputs, output):
    x, dim, sparsity, hard, threshold_grad, k = _with_defaults(inputs, 5)
    _y, theta, mean, std = output
    ctx.dim, ctx.sparsity, ctx.hard, ctx.threshold_grad, ctx.k = dim, sparsity, hard, threshold_grad, k
    ctx.save_for_backward(x, theta, mean, std)


def _gelu_mul_save(ctx, inputs, output):
    gate, up, sparsity, threshold_grad, k = _with_defaults(inputs, 4)
    _out, theta, mean, std = output
    ctx.sparsity, ctx.threshold_grad, ctx.k = sparsity, threshold_grad, k
    ctx.save_for_backward(gate, up, theta, mean, std)


# --------------------------------------------------------------------------------------------
# torch.func transforms and forward-mode AD (see _func.py): the same backward ops, and the
# tangents written out (theta's: mean(t) + z mean((x - mean) t) / std, the std term 0 for a
# constant row, as in the backward). The tangents take the row statistics from torch ops on x
# rather than from the kernel's saved ones (constants to autograd), so that an enclosing
# reverse transform (jacrev(jacfwd(f))) differentiates them too; the kernel's theta still
# decides which entries are kept, as in the forward.


def _quantile(sparsity: float) -> float:
    """z = PhiInv(sparsity), the threshold's multiple of the std."""
    return statistics.NormalDist().inv_cdf(sparsity)


def _statistics(x, std, dim):
    """x's row statistics from torch ops, so that an enclosing reverse transform differentiates
    through them (the kernel's saved ones are constants to autograd), in units of a power of two
    per row, as the kernels take them (squares of rows near 1e20 or 1e-25 leave float32's
    range): (scale, x / scale, mean / scale, std / scale, spread). The scale is a constant to
    autograd. `std` (the kernel's) says which rows are constant, where the scaled std is taken as
    1 (no 0/0 in its derivative); a NaN std (a NaN or inf in the row) keeps its NaN."""
    if x.shape[dim] == 0:  # amax refuses empty rows
        amax = x.detach().new_zeros([1 if i == dim % x.dim() else s for i, s in enumerate(x.shape)])
    else:
        amax = x.detach().abs().amax(dim, keepdim=True)
    usable = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(usable, torch.exp2(torch.floor(torch.log2(torch.where(usable, amax, torch.ones_like(amax))))),
                        torch.ones_like(amax))
    xs = x / scale
    mean = xs.mean(dim, keepdim=True)
    spread = ~(std <= 0)
    var = (xs - mean).square().mean(dim, keepdim=True)
    return scale, xs, mean, torch.sqrt(torch.where(spread, var, torch.ones_like(var))), spread


def _standardized(x, t, std, dim):
    """a = (x - mean) / std along dim (0 for a constant row, std = 0, as the kernels take it)
    and its tangent for tangent t of x: (t - mean(t) - a mean(a t)) / std."""
    scale, xs, mean, safe_std, spread = _statistics(x, std, dim)
    zero = torch.zeros_like(x)
    a = torch.where(spread, (xs - mean) / safe_std, zero)
    ts = t / scale
    da = torch.where(spread, (ts - ts.mean(dim, keepdim=True) - a * (a * ts).mean(dim, keepdim=True)) / safe_std, zero)
    return a, da


def _theta_tangent(t, x, std, dim, sparsity):
    """theta's tangent for tangent t of x, rows along dim, and theta itself, both from torch
    ops on x; `sparsity` the effective one."""
    z = _quantile(sparsity)
    scale, xs, mean, safe_std, spread = _statistics(x, std, dim)
    deviation = ((xs - mean) * t).mean(dim, keepdim=True)
    return t.mean(dim, keepdim=True) + z * torch.where(spread, deviation / safe_std, torch.zeros_like(deviation)), \
        scale * (mean + z * torch.where(spread, safe_std, torch.zeros_like(safe_std)))


def _stat_topk_jvp(ctx, t, *_args):
    x, theta, _mean, std = ctx.saved_tensors
    shape = x.shape
    # A 0-d x is one row of one element (as its statistics are 0-d).
    xa, ta, theta, std = (u.to(std.dtype).reshape(u.shape or (1,)) for u in (x, t, theta, std))
    dtheta, _ = _theta_tangent(ta, xa, std, ctx.dim, effective_sparsity(ctx.sparsity, ctx.k, xa.shape[ctx.dim]))
    live = not ctx.hard and ctx.threshold_grad  # the outputs reach theta
    direct = ta - dtheta if live else ta
    # A row holding NaN (theta NaN) keeps its NaN tangent where theta is live, as reverse mode.
    dy = torch.where((xa > theta) | (torch.isnan(theta) & live), direct, torch.zeros_like(direct))
    stat_shape = std.shape if shape else ()
    zero = torch.zeros(stat_shape, dtype=std.dtype, device=std.device)
    return dy.to(x.dtype).reshape(shape), dtheta.reshape(stat_shape), zero, zero


# The transform functions leave the row statistics they return (which the wrappers drop)
# differentiable, with zero tangents: torch's generated vmap rule for an autograd.Function
# with non-differentiable outputs fails an internal assert under an enclosing jvp
# (jvp(vmap(grad(f))), "Expected both tensor and its forward grad to be floating point").
def _stat_topk_transform_setup(ctx, inputs, output):
    _stat_topk_save(ctx, inputs, output)
    ctx.save_for_forward(inputs[0], *output[1:])


def _stat_topk_transform_backward(ctx, grad_y, grad_theta, _grad_mean, _grad_std):
    x, theta, mean, std = ctx.saved_tensors
    dx = _STAT_TOPK_BACKWARD_FN.apply(grad_y.to(x.dtype), grad_theta.to(mean.dtype), x, theta, mean, std, ctx.dim,
                                      ctx.sparsity, ctx.hard, ctx.threshold_grad, ctx.k)
    return dx, None, None, None, None, None


_GELU_K, _GELU_C = 0.79788456080286535588, 0.044715  # gelu_tanh(h) = h sigmoid(2 k (h + c h^3))


def _gelu_tanh_and_slope(h):
    """gelu_tanh(h) and its derivative for h >= 0, as the kernel (slope's h capped at 8)."""
    k, c = _GELU_K, _GELU_C
    s = torch.sigmoid(2 * k * (h + c * h * h * h))
    hc = h.clamp(max=8)
    return h * s, s + 2 * hc * s * (1 - s) * k * (1 + 3 * c * hc * hc)


def _gelu_tanh_slope_tangent(h, t_h):
    """The tangent of _gelu_tanh_and_slope's slope for tangent t_h of h, written out:
    torch.func.jvp cannot run inside an eager forward-mode level (fwAD.dual_level)."""
    k, c = _GELU_K, _GELU_C
    s = torch.sigmoid(2 * k * (h + c * h * h * h))
    ds = s * (1 - s) * 2 * k * (1 + 3 * c * h * h) * t_h
    hc = h.clamp(max=8)
    dhc = torch.where(h <= 8, t_h, torch.zeros_like(t_h))
    q, dq = k * (1 + 3 * c * hc * hc), 6 * k * c * hc * dhc
    return ds + 2 * (dhc * s * (1 - s) * q + hc * (1 - 2 * s) * ds * q + hc * s * (1 - s) * dq)


def _gelu_mul_jvp(ctx, t_gate, t_up, *_args):
    gate, up, theta, _mean, std = ctx.saved_tensors
    acc = std.dtype
    g, u = gate.to(acc), up.to(acc)
    tg = torch.zeros_like(g) if t_gate is None else t_gate.to(acc)
    dtheta, theta_of_g = _theta_tangent(tg, g, std, -1, effective_sparsity(ctx.sparsity, ctx.k, g.shape[-1]))
    kept = g - theta > 0
    # h = relu(gate - theta) with theta recomputed from g (differentiable), kept as the kernel's
    h = torch.where(kept, g - (theta_of_g if ctx.threshold_grad else theta), torch.zeros_like(g))
    gelu, slope = _gelu_tanh_and_slope(h)
    # A row holding NaN (theta NaN) gets NaN tangents through gate where theta is live, as
    # reverse mode. (Through up they stay gelu(0) t_up = 0: a NaN there would turn the zero
    # tangent that jacfwd of gate alone passes for up into NaN.)
    nan_row = torch.isnan(theta)
    out = torch.zeros_like(g)
    if t_gate is not None:
        if ctx.threshold_grad:
            tg = tg - dtheta
        out = out + torch.where(kept | (nan_row & ctx.threshold_grad), slope * tg, torch.zeros_like(tg)) * u
    if t_up is not None:
        out = out + gelu * t_up.to(acc)
    zero = torch.zeros_like(std)  # theta's tangent too: the wrapper drops it (see below)
    return out.to(gate.dtype), zero, zero, zero


def _gelu_mul_transform_setup(ctx, inputs, output):  # no non-differentiable outputs, as stat_topk's
    _gelu_mul_save(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:2], *output[1:])


def _gelu_mul_transform_backward(ctx, grad_out, _grad_theta, _grad_mean, _grad_std):
    gate, up, theta, mean, std = ctx.saved_tensors
    dgate, dup = _GELU_MUL_BACKWARD_FN.apply(grad_out.to(gate.dtype), gate, up, theta, mean, std, ctx.sparsity,
                                             ctx.threshold_grad, ctx.k)
    return dgate, dup, None, None, None


# The backward's own forward rule (forward over reverse: torch.func.hessian, jvp(grad(f))
# Hessian-vector products). Per row, with m = [x > theta], a = (x - mean) / std (0 for a
# constant row) and c = the gradient reaching theta (grad_theta, minus sum(m grad_y) in soft
# mode), the backward is dx = m grad_y + c (1 + z a) / n (threshold_grad=False: m grad_y).
# The mask is piecewise constant; a moves with x:
#   da = (t - mean(t)) / std - a mean(a t) / std.
def _stat_topk_backward_setup(ctx, inputs, output):
    grad_y, grad_theta, x, theta, mean, std, dim, sparsity, hard, threshold_grad, k = _with_defaults(inputs, 10)
    ctx.dim, ctx.sparsity, ctx.hard, ctx.threshold_grad, ctx.k = dim, sparsity, hard, threshold_grad, k
    ctx.has_grad_theta = grad_theta is not None
    saved = (grad_y, x, theta, mean, std, *((grad_theta,) if grad_theta is not None else ()))
    # (saved for backward too, although that raises: torch's generated vmap rule expects both)
    ctx.save_for_backward(*saved)
    ctx.save_for_forward(*saved)


def _stat_topk_backward_jvp(ctx, t_grad_y, t_grad_theta, t_x, *_rest):
    grad_y, x, theta, mean, std, *rest = ctx.saved_tensors
    grad_theta = rest[0] if rest else torch.zeros_like(mean)
    acc = mean.dtype
    row = x.shape or (1,)  # a 0-d x is one row of one element
    gy, xa = grad_y.to(acc).reshape(row), x.to(acc).reshape(row)
    gth, theta, mean, std = (u.reshape(u.shape or (1,)) for u in (grad_theta.to(acc), theta, mean, std))
    zero = torch.zeros_like(xa)
    t_gy = zero if t_grad_y is None else t_grad_y.to(acc).reshape(row)
    t_x = zero if t_x is None else t_x.to(acc).reshape(row)
    t_gth = torch.zeros_like(gth) if t_grad_theta is None or not ctx.has_grad_theta else \
        t_grad_theta.to(acc).reshape(gth.shape)
    dim = ctx.dim
    kept = (xa > theta).to(acc)
    out = kept * t_gy
    if ctx.threshold_grad:
        n = xa.shape[dim] if xa.dim() else 1
        z = _quantile(effective_sparsity(ctx.sparsity, ctx.k, n))
        a, da = _standardized(xa, t_x, std, dim)
        c, t_c = gth, t_gth
        if not ctx.hard:
            c = c - (kept * gy).sum(dim, keepdim=True)
            t_c = t_c - (kept * t_gy).sum(dim, keepdim=True)
        out = out + (t_c * (1 + z * a) + c * z * da) / n
    return out.reshape(x.shape).to(x.dtype)


# Reverse over reverse (double backward, jacrev of jacrev): the backward ops' VJPs are the
# transposes of their forward rules, which are linear in the tangents: the vjp, in the
# tangents, of the rule. The rules' x (gate) tangents already carry the statistics'
# dependence on x, and theta enters only through the mask, so theta, mean and std get none.
def _stat_topk_backward_backward(ctx, u):
    grad_y, x = ctx.saved_tensors[:2]  # (then theta, mean, std and grad_theta if given)
    grad_theta = ctx.saved_tensors[5] if ctx.has_grad_theta else None
    tangents = [torch.zeros_like(grad_y), torch.zeros_like(x)] + ([torch.zeros_like(grad_theta)] if ctx.has_grad_theta
                                                                 else [])

    def rule(t_grad_y, t_x, *t_grad_theta):
        return _stat_topk_backward_jvp(ctx, t_grad_y, t_grad_theta[0] if t_grad_theta else None, t_x)

    d = torch.func.vjp(rule, *tangents)[1](u)
    return (d[0], d[2] if ctx.has_grad_theta else None, d[1]) + (None,) * 8


_STAT_TOPK_BACKWARD_FN = transform_function(
    "stat_topk_backward", torch.ops.fastloss.stat_topk_backward.default, _stat_topk_backward_setup,
    _stat_topk_backward_backward, _stat_topk_backward_jvp)
# The gelu-mul backward's forward rule, likewise. With h = relu(gate - theta), kept = gate >
# theta, e = kept gelu'(h) up grad_out and c = -sum(e) (what reaches theta):
#   d_up = gelu(h) grad_out,   d_gate = e + c (1 + z a) / n   (threshold_grad=False: e),
# and h moves by kept (t_gate - t_theta), t_theta = mean(t_gate) + z mean(a t_gate).
def _gelu_mul_backward_setup(ctx, inputs, output):
    grad_out, gate, up, theta, mean, std, sparsity, threshold_grad, k = _with_defaults(inputs, 8)
    ctx.sparsity, ctx.threshold_grad, ctx.k = sparsity, threshold_grad, k
    saved = (grad_out, gate, up, theta, mean, std)
    ctx.save_for_backward(*saved)  # (as stat_topk's: torch's generated vmap rule expects both)
    ctx.save_for_forward(*saved)


def _gelu_mul_backward_jvp(ctx, t_grad_out, t_gate, t_up, *_rest):
    grad_out, gate, up, theta, mean, std = ctx.saved_tensors
    acc = std.dtype
    go, g, u = (v.to(acc) for v in (grad_out, gate, up))
    zero = torch.zeros_like(g)
    t_go, t_g, t_u = (zero if t is None else t.to(acc) for t in (t_grad_out, t_gate, t_up))
    z = _quantile(effective_sparsity(ctx.sparsity, ctx.k, g.shape[-1]))
    a, t_a = _standardized(g, t_g, std, -1)
    kept = g - theta > 0
    if ctx.threshold_grad:  # theta from torch ops on g, as a is: an outer reverse pass sees both
        t_theta, theta = _theta_tangent(t_g, g, std, -1, effective_sparsity(ctx.sparsity, ctx.k, g.shape[-1]))
    else:
        t_theta = 0
    h = torch.where(kept, g - theta, zero)
    t_h = torch.where(kept, t_g - t_theta, zero)
    gelu, slope = _gelu_tanh_and_slope(h)
    t_slope = _gelu_tanh_slope_tangent(h, t_h)
    t_dup = slope * t_h * go + gelu * t_go
    e = torch.where(kept, slope * u * go, zero)
    t_e = torch.where(kept, t_slope * u * go + slope * (t_u * go + u * t_go), zero)
    t_dgate = t_e
    if ctx.threshold_grad:
        n = g.shape[-1]
        c, t_c = -e.sum(-1, keepdim=True), -t_e.sum(-1, keepdim=True)
        t_dgate = t_dgate + (t_c * (1 + z * a) + c * z * t_a) / n
    return t_dgate.to(gate.dtype), t_dup.to(up.dtype)


def _gelu_mul_backward_backward(ctx, u_gate, u_up):
    grad_out, gate, up = ctx.saved_tensors[:3]
    pull = torch.func.vjp(lambda *t: _gelu_mul_backward_jvp(ctx, *t), *(torch.zeros_like(v) for v in (grad_out, gate,
                                                                                                        up)))[1]
    d_grad_out, d_gate, d_up = pull((torch.zeros_like(gate) if u_gate is None else u_gate,
                                     torch.zeros_like(up) if u_up is None else u_up))
    return (d_grad_out, d_gate, d_up) + (None,) * 6


_GELU_MUL_BACKWARD_FN = transform_function(
    "stat_topk_gelu_mul_backward", torch.ops.fastloss.stat_topk_gelu_mul_backward.default, _gelu_mul_backward_setup,
    _gelu_mul_backward_backward, _gelu_mul_backward_jvp)
torch.library.register_autograd("fastloss::stat_topk_backward", _stat_topk_backward_backward,
                                setup_context=_stat_topk_backward_setup)
torch.library.register_autograd("fastloss::stat_topk_gelu_mul_backward", _gelu_mul_backward_backward,
                                setup_context=_gelu_mul_backward_setup)
_STAT_TOPK_FN = transform_function("stat_topk", torch.ops.fastloss.stat_topk.default, _stat_topk_transform_setup,
                                   _stat_topk_transform_backward, _stat_topk_jvp)
_GELU_MUL_FN = transform_function("stat_topk_gelu_mul", torch.ops.fastloss.stat_topk_gelu_mul.default,
                                  _gelu_mul_transform_setup, _gelu_mul_transform_backward, _gelu_mul_jvp)


# Batching rules: every tensor argument batched at the front (unbatched ones expanded).


torch.library.register_vmap("fastloss::stat_topk")(row_rule(torch.ops.fastloss.stat_topk.default, "stat_topk", 1))
torch.library.register_vmap("fastloss::stat_topk_backward")(
    row_rule(torch.ops.fastloss.stat_topk_backward.default, "stat_topk", 6))


@torch.library.register_vmap("fastloss::stat_topk_gelu_mul")
def _gelu_mul_vmap(info, in_dims, gate, up, sparsity, threshold_grad=True, k=0):
    gate, up = (batch_front(t, d, info.batch_size) for t, d in zip((gate, up), in_dims))
    return torch.ops.fastloss.stat_topk_gelu_mul.default(gate, up, sparsity, threshold_grad, k), (0, 0, 0, 0)


@torch.library.register_vmap("fastloss::stat_topk_gelu_mul_backward")
def _gelu_mul_backward_vmap(info, in_dims, grad_out, gate, up, theta, mean, std, sparsity, threshold_grad, k=0):
    tensors = [batch_front(t, d, info.batch_size) for t, d in zip((grad_out, gate, up, theta, mean, std), in_dims)]
    return torch.ops.fastloss.stat_topk_gelu_mul_backward.default(*tensors, sparsity, threshold_grad, k), (0, 0)
