"""Two-pass softmax and log-softmax (Dukhan & Ablavatski 2020): wrappers, fake kernels and
autograd for ``torch.ops.fastloss.softmax`` / ``log_softmax``."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from ._direct import direct_call_ok
from ._func import row_rule, transform_function, transforms_active
from ._guards import (FLOAT_DTYPES, check_dim, check_floating, check_like, check_same_device, check_tensor, check_value,
                      wrap_dim)

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _dispatch(op, direct, name: str, input: torch.Tensor, dim: int, dtype: Optional[torch.dtype]):
    check_tensor(name, "input", input)
    dim = check_dim(name, dim)
    half_to_float = False
    if dtype is float:  # torch's Python-type alias for float64, as torch.softmax takes it
        dtype = torch.float64
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"fastloss.{name}: expected 'dtype' to be float32, float64, float16, bfloat16 or None, "
                            f"got {dtype!r}")
        if input.dtype in _HALF_TYPES and dtype == torch.float32:
            # Read half precision, accumulate and write float32 in one pass (no cast kernel).
            half_to_float = True
        else:
            # Like torch.softmax: cast first, then compute in `dtype`.
            input = input.to(dtype)
    elif input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastloss.{name}: expected 'input' to be a float32, float64, float16 or bfloat16 tensor "
                        f"(or one of those as 'dtype'), got {input.dtype}")
    elif input.dtype in _HALF_TYPES and input.is_cuda and torch.is_autocast_enabled("cuda"):
        # torch.autocast runs torch.softmax / log_softmax in float32 on CUDA (without an
        # explicit dtype); here that is the fused half-in, float32-out pass.
        half_to_float = True
    if transforms_active(input):
        return _TRANSFORM_FUNCTIONS[name].apply(input, dim, half_to_float)
    if direct_call_ok(input):
        return direct(input, dim, half_to_float)
    return op(input, dim, half_to_float)


_SOFTMAX = torch.ops.fastloss.softmax.default
_LOG_SOFTMAX = torch.ops.fastloss.log_softmax.default


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
    return _dispatch(_SOFTMAX, _C.softmax, "softmax", input, dim, dtype)


def log_softmax(input: torch.Tensor, dim: int = -1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Log-softmax over ``dim``, with the semantics of :func:`torch.log_softmax`.

    The same two-pass algorithm and arguments as :func:`softmax`; the result is
    ``x - log(sum exp(x))`` computed from the (mantissa, exponent) sum, so it never overflows
    and needs no max pass.
    """
    return _dispatch(_LOG_SOFTMAX, _C.log_softmax, "log_softmax", input, dim, dtype)


def _forward_fake(op: str):
    def fake(self: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
        check_floating(op, "self", self)
        wrap_dim(op, dim, self.dim())
        check_value(not half_to_float or self.dtype in (torch.float16, torch.bfloat16), op,
                    f"'half_to_float' needs a float16 or bfloat16 'self', got {self.dtype}")
        return self.new_empty(self.shape, dtype=torch.float32 if half_to_float else self.dtype)
    return fake


def _backward_fake(op: str):
    def fake(grad_output: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
        check_floating(op, "grad_output", grad_output)
        check_floating(op, "output", output)
        check_like(op, "grad_output", grad_output, "output", output)
        check_same_device(op, output=output, grad_output=grad_output)
        check_value(input_dtype == output.dtype or (output.dtype == torch.float32 and input_dtype in (torch.float16,
                    torch.bfloat16)), op, f"'input_dtype' must be the output dtype ({output.dtype}) or "
                    f"float16/bfloat16 for a float32 output, got {input_dtype}")
        wrap_dim(op, dim, output.dim())
        return output.new_empty(output.shape, dtype=input_dtype)
    return fake


for _name in ("softmax", "log_softmax"):
    torch.library.register_fake(f"fastloss::{_name}")(_forward_fake(_name))
    torch.library.register_fake(f"fastloss::{_name}_backward")(_backward_fake(f"{_name}_backward"))


# Autograd (and double backward through the backward ops) is registered in C++
# (csrc/autograd.cpp): a Python registration would add ~30 us to every call. Under torch.func
# transforms and forward-mode AD the wrappers use the functions below (see _func.py).


def _make_transform_functions(log: bool):
    name = "log_softmax" if log else "softmax"
    op = _LOG_SOFTMAX if log else _SOFTMAX
    backward_op = getattr(torch.ops.fastloss, f"{name}_backward").default

    def setup(ctx, inputs, output):
        x, dim, _half_to_float = inputs
        ctx.dim, ctx.input_dtype = dim, x.dtype
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return backward_fn.apply(grad.to(y.dtype), y, ctx.dim, ctx.input_dtype), None, None

    def jvp(ctx, tangent, _dim, _half_to_float):
        (y,) = ctx.saved_tensors
        t = tangent.to(y.dtype)
        if log:  # t - sum(softmax * t)
            return t - (y.exp() * t).sum(ctx.dim, keepdim=True)
        return y * (t - (y * t).sum(ctx.dim, keepdim=True))

    def backward_setup(ctx, inputs, output):
        g, y, dim, input_dtype = inputs
        ctx.dim = dim
        ctx.input_dtype = input_dtype  # dx's dtype (jvp's last argument is its tangent: None)
        ctx.save_for_backward(g, y)
        ctx.save_for_forward(g, y)

    # The backward op as a function of (g, y), as in csrc/autograd.cpp:
    # softmax: dx = y (g - sum(g y)); log-softmax: dx = g - exp(y) sum(g).
    def backward_backward(ctx, u):
        g, y = ctx.saved_tensors
        u = u.to(y.dtype)
        d = ctx.dim
        if log:
            p = y.exp()
            return u - (u * p).sum(d, keepdim=True), -u * p * g.sum(d, keepdim=True), None, None
        grad_g = backward_fn.apply(u, y, d, y.dtype)
        grad_y = u * (g - (g * y).sum(d, keepdim=True)) - g * (u * y).sum(d, keepdim=True)
        return grad_g, grad_y, None, None

    def backward_jvp(ctx, tg, ty, _dim, _input_dtype):
        g, y = ctx.saved_tensors
        d = ctx.dim
        tg = torch.zeros_like(g) if tg is None else tg.to(y.dtype)
        ty = torch.zeros_like(y) if ty is None else ty.to(y.dtype)
        if log:
            out = tg - y.exp() * (ty * g.sum(d, keepdim=True) + tg.sum(d, keepdim=True))
        else:
            out = ty * (g - (g * y).sum(d, keepdim=True)) + y * (tg - (tg * y + g * ty).sum(d, keepdim=True))
        return out.to(ctx.input_dtype)

    backward_fn = transform_function(f"{name}_backward", backward_op, backward_setup, backward_backward, backward_jvp)
    return transform_function(name, op, setup, backward, jvp)


_TRANSFORM_FUNCTIONS = {"softmax": _make_transform_functions(False), "log_softmax": _make_transform_functions(True)}


for _name in ("softmax", "log_softmax"):
    for _op_name, _tensors in ((_name, 1), (f"{_name}_backward", 2)):
        torch.library.register_vmap(f"fastloss::{_op_name}")(
            row_rule(getattr(torch.ops.fastloss, _op_name).default, _name, _tensors))
