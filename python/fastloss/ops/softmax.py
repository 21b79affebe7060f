"""Two-pass softmax and log-softmax (Dukhan & Ablavatski 2020): wrappers, fake kernels and
autograd for ``torch.ops.fastloss.softmax`` / ``log_softmax``."""

from __future__ import annotations

from typing import Optional

import torch

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _dispatch(op, name: str, input: torch.Tensor, dim: int, dtype: Optional[torch.dtype]):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"fastloss.{name}: expected 'input' to be a torch.Tensor, got {type(input).__name__}")
    if dtype is None:
        return op(input, dim, False)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"fastloss.{name}: expected 'dtype' to be a torch.dtype or None, got {dtype!r}")
    if input.dtype in _HALF_TYPES and dtype == torch.float32:
        # Read half precision, accumulate and write float32 in one pass (no cast kernel).
        return op(input, dim, True)
    # Like torch.softmax: cast first, then compute in `dtype`.
    return op(input.to(dtype), dim, False)


def softmax(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Softmax over ``dim``, with the semantics of :func:`torch.softmax`.

    Computed by the two-pass algorithm: one pass accumulates exp(x) as (mantissa, exponent)
    pairs, so no max pass is needed; a second pass writes the result.

    Args:
        input: a float32, float64, float16 or bfloat16 tensor (any shape, any strides).
        dim: the dimension to normalize over.
        dtype: if given, the input is cast to it first; float16/bfloat16 input with
            ``dtype=torch.float32`` is read in half precision and written in float32.
    """
    return _dispatch(torch.ops.fastloss.softmax.default, "softmax", input, dim, dtype)


def log_softmax(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Log-softmax over ``dim``, with the semantics of :func:`torch.log_softmax`."""
    return _dispatch(torch.ops.fastloss.log_softmax.default, "log_softmax", input, dim, dtype)


def _forward_fake(self: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else self.dtype
    return self.new_empty(self.shape, dtype=out_dtype)


def _backward_fake(grad_output: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    return output.new_empty(output.shape, dtype=input_dtype)


for _name in ("softmax", "log_softmax"):
    torch.library.register_fake(f"fastloss::{_name}")(_forward_fake)
    torch.library.register_fake(f"fastloss::{_name}_backward")(_backward_fake)


def _setup_context(ctx, inputs, output):
    self, dim, _half_to_float = inputs
    ctx.dim = dim
    ctx.input_dtype = self.dtype
    ctx.save_for_backward(output)


def _forward_grad(backward_op):
    def grad_fn(ctx, grad):
        (output,) = ctx.saved_tensors
        return backward_op(grad.to(output.dtype), output, ctx.dim, ctx.input_dtype), None, None

    return grad_fn


for _name in ("softmax", "log_softmax"):
    torch.library.register_autograd(
        f"fastloss::{_name}",
        _forward_grad(getattr(torch.ops.fastloss, f"{_name}_backward").default),
        setup_context=_setup_context,
    )


# Double backward: the backward ops are differentiable too (in terms of torch ops), so
# Hessian-vector products and gradgradcheck work.
def _backward_setup_context(ctx, inputs, output):
    grad_output, out, dim, _input_dtype = inputs
    ctx.dim = dim
    ctx.save_for_backward(grad_output, out)


def _softmax_backward_grad(ctx, u):
    # dx = y * (g - sum(g * y)):  d/dg = softmax_backward(u, y);
    # d/dy = u * (g - sum(g * y)) - g * sum(u * y).
    g, y = ctx.saved_tensors
    u = u.to(y.dtype)
    dim = ctx.dim
    grad_g = grad_y = None
    if ctx.needs_input_grad[0]:
        grad_g = torch.ops.fastloss.softmax_backward(u, y, dim, y.dtype)
    if ctx.needs_input_grad[1]:
        grad_y = u * (g - (g * y).sum(dim, keepdim=True)) - g * (u * y).sum(dim, keepdim=True)
    return grad_g, grad_y, None, None


def _log_softmax_backward_grad(ctx, u):
    # dx = g - exp(y) * sum(g):  d/dg = u - sum(u * exp(y));  d/dy = -u * exp(y) * sum(g).
    g, y = ctx.saved_tensors
    u = u.to(y.dtype)
    dim = ctx.dim
    p = y.exp()
    grad_g = grad_y = None
    if ctx.needs_input_grad[0]:
        grad_g = u - (u * p).sum(dim, keepdim=True)
    if ctx.needs_input_grad[1]:
        grad_y = -u * p * g.sum(dim, keepdim=True)
    return grad_g, grad_y, None, None


torch.library.register_autograd(
    "fastloss::softmax_backward", _softmax_backward_grad, setup_context=_backward_setup_context
)
torch.library.register_autograd(
    "fastloss::log_softmax_backward", _log_softmax_backward_grad, setup_context=_backward_setup_context
)
