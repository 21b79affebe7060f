"""Statistical top-k masking (Spark Transformer, arXiv 2506.06644; Gemma 3n): wrappers, fake
kernels and autograd for ``torch.ops.fastloss.stat_topk`` and ``stat_topk_gelu_mul``."""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from ._double_backward import forbid_double_backward
from ._guards import check_same_device, forbid_forward_ad

_MODES = ("soft", "hard")


def resolve_sparsity(name: str, row_length: int, sparsity: Optional[float], k: Optional[int]) -> float:
    """The sparsity 1 - k/d from exactly one of ``sparsity`` and ``k``, validated."""
    if (sparsity is None) == (k is None):
        raise ValueError(f"fastloss.{name}: give exactly one of 'sparsity' and 'k' "
                         f"(got sparsity={sparsity!r}, k={k!r})")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"fastloss.{name}: 'k' must be an int, got {type(k).__name__}")
        if not 0 < k < row_length:
            raise ValueError(f"fastloss.{name}: 'k' must be in (0, {row_length}) for rows of length "
                             f"{row_length}, got {k}")
        return 1.0 - k / row_length
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"fastloss.{name}: 'sparsity' must be a float, got {type(sparsity).__name__}")
    sparsity = float(sparsity)
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"fastloss.{name}: 'sparsity' must be in (0, 1) (the fraction of each row "
                         f"that is zeroed), got {sparsity}")
    return sparsity


def _check_tensor(name: str, arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastloss.{name}: expected '{arg}' to be a torch.Tensor, got {type(t).__name__}")


def _row_length(name: str, x: torch.Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"fastloss.{name}: 'dim' must be an int, got {type(dim).__name__}")
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        raise IndexError(f"fastloss.{name}: 'dim' out of range: expected a value in [{-rank}, {rank - 1}] "
                         f"for a {x.dim()}-d tensor, got {dim}")
    return x.shape[dim] if x.dim() > 0 else 1


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
    _check_tensor("stat_topk", "x", x)
    forbid_forward_ad("stat_topk", x)
    if mode not in _MODES:
        raise ValueError(f"fastloss.stat_topk: 'mode' must be 'soft' or 'hard', got {mode!r}")
    s = resolve_sparsity("stat_topk", _row_length("stat_topk", x, dim), sparsity, k)
    y, theta, _mean, _std = torch.ops.fastloss.stat_topk.default(x, dim, s, mode == "hard", bool(threshold_grad))
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
    """
    _check_tensor("stat_topk_gelu_mul", "gate", gate)
    _check_tensor("stat_topk_gelu_mul", "up", up)
    forbid_forward_ad("stat_topk_gelu_mul", gate, up)
    if gate.dim() == 0:
        raise ValueError("fastloss.stat_topk_gelu_mul: 'gate' must have at least one dimension")
    s = resolve_sparsity("stat_topk_gelu_mul", gate.shape[-1], sparsity, k)
    out, _theta, _mean, _std = torch.ops.fastloss.stat_topk_gelu_mul.default(gate, up, s, bool(threshold_grad))
    return out


# --------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only)


def _stat_like(x: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    if shape:
        shape[dim] = 1
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(shape, dtype=dtype)


@torch.library.register_fake("fastloss::stat_topk")
def _stat_topk_fake(x, dim, sparsity, hard=False, threshold_grad=True):
    return x.new_empty(x.shape), _stat_like(x, dim), _stat_like(x, dim), _stat_like(x, dim)


@torch.library.register_fake("fastloss::stat_topk_backward")
def _stat_topk_backward_fake(grad_y, grad_theta, x, theta, mean, std, dim, sparsity, hard, threshold_grad):
    check_same_device("stat_topk_backward", x=x, grad_y=grad_y, grad_theta=grad_theta, theta=theta, mean=mean, std=std)
    return x.new_empty(x.shape)


@torch.library.register_fake("fastloss::stat_topk_gelu_mul")
def _gelu_mul_fake(gate, up, sparsity, threshold_grad=True):
    check_same_device("stat_topk_gelu_mul", gate=gate, up=up)
    return gate.new_empty(gate.shape), _stat_like(gate, -1), _stat_like(gate, -1), _stat_like(gate, -1)


@torch.library.register_fake("fastloss::stat_topk_gelu_mul_backward")
def _gelu_mul_backward_fake(grad_out, gate, up, theta, mean, std, sparsity, threshold_grad):
    check_same_device("stat_topk_gelu_mul_backward", gate=gate, up=up, grad_out=grad_out, theta=theta, mean=mean,
                      std=std)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


# --------------------------------------------------------------------------------------------
# Autograd


def _stat_topk_setup(ctx, inputs, output):
    x, dim, sparsity, hard, threshold_grad = inputs
    _y, theta, mean, std = output
    ctx.dim, ctx.sparsity, ctx.hard, ctx.threshold_grad = dim, sparsity, hard, threshold_grad
    ctx.save_for_backward(x, theta, mean, std)
    ctx.mark_non_differentiable(mean, std)


def _stat_topk_backward(ctx, grad_y, grad_theta, _grad_mean, _grad_std):
    x, theta, mean, std = ctx.saved_tensors
    dx = torch.ops.fastloss.stat_topk_backward.default(
        grad_y.to(x.dtype), grad_theta.to(mean.dtype), x, theta, mean, std, ctx.dim, ctx.sparsity, ctx.hard,
        ctx.threshold_grad)
    return dx, None, None, None, None


torch.library.register_autograd("fastloss::stat_topk", _stat_topk_backward, setup_context=_stat_topk_setup)


def _gelu_mul_setup(ctx, inputs, output):
    gate, up, sparsity, threshold_grad = inputs
    _out, theta, mean, std = output
    ctx.sparsity, ctx.threshold_grad = sparsity, threshold_grad
    ctx.save_for_backward(gate, up, theta, mean, std)
    ctx.mark_non_differentiable(theta, mean, std)


def _gelu_mul_backward(ctx, grad_out, _grad_theta, _grad_mean, _grad_std):
    gate, up, theta, mean, std = ctx.saved_tensors
    dgate, dup = torch.ops.fastloss.stat_topk_gelu_mul_backward.default(
        grad_out.to(gate.dtype), gate, up, theta, mean, std, ctx.sparsity, ctx.threshold_grad)
    return dgate, dup, None, None


torch.library.register_autograd("fastloss::stat_topk_gelu_mul", _gelu_mul_backward, setup_context=_gelu_mul_setup)
forbid_double_backward("stat_topk_backward", "fastloss.stat_topk")
forbid_double_backward("stat_topk_gelu_mul_backward", "fastloss.stat_topk_gelu_mul")
