"""Two-pass softmax and log-softmax (Dukhan & Ablavatski 2020): wrappers, fake kernels and
autograd for ``torch.ops.fastloss.softmax`` / ``log_softmax``."""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .. import _C
from ._direct import direct_call_ok
from ._guards import check_same_device, forbid_forward_ad

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _dispatch(op, direct, name: str, input: torch.Tensor, dim: int, dtype: Optional[torch.dtype]):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"fastloss.{name}: expected 'input' to be a torch.Tensor, got {type(input).__name__}")
    forbid_forward_ad(name, input)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"fastloss.{name}: expected 'dim' to be an int, got {dim!r}")
    dim = int(dim)
    half_to_float = False
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"fastloss.{name}: expected 'dtype' to be a floating-point torch.dtype or None, got {dtype!r}")
        if input.dtype in _HALF_TYPES and dtype == torch.float32:
            # Read half precision, accumulate and write float32 in one pass (no cast kernel).
            half_to_float = True
        else:
            # Like torch.softmax: cast first, then compute in `dtype`.
            input = input.to(dtype)
    elif not input.is_floating_point():
        raise TypeError(f"fastloss.{name}: expected 'input' to be a floating-point tensor (or a floating 'dtype'), "
                        f"got {input.dtype}")
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
    """Log-softmax over ``dim``, with the semantics of :func:`torch.log_softmax`."""
    return _dispatch(_LOG_SOFTMAX, _C.log_softmax, "log_softmax", input, dim, dtype)


def _forward_fake(self: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    out_dtype = torch.float32 if half_to_float else self.dtype
    return self.new_empty(self.shape, dtype=out_dtype)


def _backward_fake(grad_output: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype) -> torch.Tensor:
    check_same_device("softmax_backward", output=output, grad_output=grad_output)
    return output.new_empty(output.shape, dtype=input_dtype)


for _name in ("softmax", "log_softmax"):
    torch.library.register_fake(f"fastloss::{_name}")(_forward_fake)
    torch.library.register_fake(f"fastloss::{_name}_backward")(_backward_fake)


# Autograd (and double backward through the backward ops) is registered in C++
# (csrc/autograd.cpp): a Python registration would add ~30 us to every call.
