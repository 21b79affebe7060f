"""Checks shared by the wrappers and the fake kernels."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def check_same_device(op: str, **tensors) -> None:
    """The real kernels' device check, for the fake kernels: with one argument on meta the
    dispatcher picks the fake kernel, which would otherwise return an uninitialised tensor on
    the other arguments' device. The first argument given is the reference."""
    items = [(arg, t) for arg, t in tensors.items() if t is not None]
    ref_arg, ref = items[0]
    for arg, t in items[1:]:
        if t.device != ref.device:
            raise RuntimeError(f"fastloss.{op}: '{arg}' must be on the device of '{ref_arg}' ({ref.device}), got {t.device}")


def forbid_forward_ad(op: str, *tensors) -> None:
    """Forward-mode AD (torch.func.jvp and jacfwd, forward_ad dual tensors) has no rule in
    fastloss: for the ops whose autograd is registered from Python torch would drop the tangents
    and return zero derivatives without a word (those with C++ autograd raise a torch error that
    does not name the op)."""
    if fwAD._current_level < 0 or torch.compiler.is_compiling():
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"fastloss.{op}: forward-mode AD (torch.func.jvp / jacfwd, forward_ad dual tensors) is not "
                "supported; use reverse mode (loss.backward() or torch.autograd.grad)")
