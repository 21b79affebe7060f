"""Checks shared by the wrappers and the fake kernels."""

from __future__ import annotations

import operator

import numpy as np
import torch


def check_same_device(op: str, **tensors) -> None:
    """The real kernels' device check, for the fake kernels: with one argument on meta the
    dispatcher picks the fake kernel, which would otherwise return an uninitialised tensor on
    the other arguments' device. The first argument given is the reference."""
    items = [(arg, t) for arg, t in tensors.items() if t is not None]
    ref_arg, ref = items[0]
    for arg, t in items[1:]:
        if t.device != ref.device:
            raise RuntimeError(f"fastloss.{op}: '{arg}' must be on the device of '{ref_arg}' ({ref.device}), got {t.device}")


def check_tensor(op: str, arg: str, t) -> None:
    """t is a dense (strided) torch.Tensor: nested, sparse, quantized and MKL-DNN tensors got
    errors from deep inside torch that named no argument (a nested one: "Internal error ...
    Please file an issue")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastloss.{op}: expected '{arg}' to be a torch.Tensor, got {type(t).__name__}")
    check_dense(f"fastloss.{op}", arg, t)


def check_dense(where: str, arg: str, t: torch.Tensor) -> None:
    """check_tensor's layout check, for messages that start with `where`."""
    kind = layout_kind(t)
    if kind is not None:
        raise TypeError(f"{where}: expected '{arg}' to be a dense (strided) tensor, got a {kind} tensor")


def layout_kind(t: torch.Tensor):
    """None for a dense (strided) tensor, else what it is: nested, quantized, sparse_coo, ..."""
    if t.is_nested:
        return "nested"
    if t.is_quantized:
        return "quantized"
    if t.layout != torch.strided:
        return str(t.layout).replace("torch.", "").strip("_")
    return None


# The real kernels' argument checks (csrc/common/*_op.h), for the fake kernels, so that a call
# the ops reject fails the same way (same exception type, the argument named) under
# torch.compile, on the meta device and in export instead of tracing through. Shape
# conditions go through torch._check, which keeps symbolic sizes symbolic.

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_floating(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"fastloss.{op}: expected '{arg}' to be a float32, float64, float16 or bfloat16 tensor, "
                           f"got {t.dtype}")


def check_dim(op: str, dim) -> int:
    """A dimension argument as torch takes one: any integer, a 0-d integer tensor included
    (through __index__), but not a bool. Its range waits for the input (wrap_dim)."""
    try:
        bad_tensor = isinstance(dim, torch.Tensor) and (dim.dim() != 0 or dim.dtype == torch.bool)
        if isinstance(dim, (bool, np.bool_)) or bad_tensor:
            raise TypeError
        return operator.index(dim)
    except TypeError:
        raise TypeError(f"fastloss.{op}: 'dim' must be an int, got {type(dim).__name__}") from None


def wrap_dim(op: str, dim: int, ndim: int) -> int:
    rank = max(ndim, 1)  # a 0-d tensor behaves as one element along dim 0
    if not -rank <= dim < rank:
        raise IndexError(f"fastloss.{op}: 'dim' out of range: expected a value in [{-rank}, {rank - 1}] for a "
                         f"{ndim}-d tensor, got {dim}")
    return dim % rank


def check_shape(op: str, arg: str, t: torch.Tensor, shape, expected: str) -> None:
    """t has exactly `shape` (sizes may be symbolic); `expected` describes it in the message."""
    torch._check(t.dim() == len(shape),
                 lambda: f"fastloss.{op}: '{arg}' must have shape {expected}, got {tuple(t.shape)}")
    for have, want in zip(t.shape, shape):
        torch._check(have == want, lambda: f"fastloss.{op}: '{arg}' must have shape {expected}, got {tuple(t.shape)}")


def check_like(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    """t has ref's shape and dtype."""
    check_shape(op, arg, t, ref.shape, f"{tuple(ref.shape)} (that of '{ref_arg}')")
    if t.dtype != ref.dtype:
        raise RuntimeError(f"fastloss.{op}: '{arg}' must have the dtype of '{ref_arg}' ({ref.dtype}), got {t.dtype}")


def check_dtype(op: str, arg: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise RuntimeError(f"fastloss.{op}: '{arg}' must be a {dtype} tensor, got {t.dtype}")


def check_bool(op: str, arg: str, value) -> bool:
    """A flag must be a bool (or a NumPy bool): a string such as "no" would otherwise count as
    true. Returns it as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"fastloss.{op}: '{arg}' must be a bool, got {type(value).__name__}")
    return bool(value)


def check_value(ok: bool, op: str, message: str, error: type = RuntimeError) -> None:
    """A check of a non-tensor argument: raises error(f"fastloss.{op}: {message}") unless ok."""
    if not ok:
        raise error(f"fastloss.{op}: {message}")
