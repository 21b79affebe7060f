"""Checks shared by the wrappers and the fake kernels."""

from __future__ import annotations

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

