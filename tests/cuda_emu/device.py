"""The emulated CUDA kernels as functions of CPU tensors (what csrc/cuda's glue does on a GPU:
layout, workspace, outputs), for tests/test_cuda_emu.py."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.float16: torch.float32,
       torch.bfloat16: torch.float32}

_c_size = ctypes.c_size_t
_c_i64 = ctypes.c_int64
_c_ptr = ctypes.c_void_p


class EmuError(RuntimeError):
    pass


class Emulator:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.fastloss_emu_alloc.restype = _c_ptr
        lib.fastloss_emu_alloc.argtypes = [_c_size]
        for name in ("emu_softmax_forward_workspace_bytes", "emu_softmax_backward_workspace_bytes",
                     "emu_stat_topk_workspace_bytes", "emu_sinkhorn_workspace_bytes",
                     "emu_lce_forward_workspace_bytes"):
            getattr(lib, name).restype = _c_size

    # -- memory -----------------------------------------------------------------------------

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in guarded memory (0xff bytes: NaN for floats) that a kernel may write."""
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = max(1, numel) * torch.empty((), dtype=dtype).element_size()
        ptr = self.lib.fastloss_emu_alloc(nbytes)
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return torch.frombuffer(buf, dtype=torch.uint8)[: nbytes].view(dtype)[:numel].view(*shape)

    def put(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A contiguous copy of ``t`` in guarded memory."""
        if t is None:
            return None
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out

    def workspace(self, nbytes: int) -> tuple:
        if nbytes == 0:
            return None, 0
        return self.empty((nbytes,), torch.uint8).data_ptr(), nbytes

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise EmuError(f"{what}: emulated CUDA error {status}")

    # -- softmax ----------------------------------------------------------------------------

    @staticmethod
    def _layout(shape, dim):
        dim = dim % len(shape)
        outer = 1
        for s in shape[:dim]:
            outer *= s
        inner = 1
        for s in shape[dim + 1:]:
            inner *= s
        return outer, shape[dim], inner

    def softmax(self, x: torch.Tensor, dim: int = -1, log: bool = False, out_dtype=None) -> torch.Tensor:
        out_dtype = out_dtype or x.dtype
        outer, size, inner = self._layout(x.shape, dim)
        xd = self.put(x.contiguous())
        y = self.empty(x.shape, out_dtype)
        ws, wsb = self.workspace(self.lib.emu_softmax_forward_workspace_bytes(
            _c_i64(outer), _c_i64(size), _c_i64(inner), DTYPES[x.dtype], DTYPES[out_dtype]))
        self.check(self.lib.emu_softmax_forward(
            _c_ptr(xd.data_ptr()), DTYPES[x.dtype], _c_ptr(y.data_ptr()), DTYPES[out_dtype], _c_i64(outer),
            _c_i64(size), _c_i64(inner), int(log), _c_ptr(ws), _c_size(wsb)), "softmax forward")
        return y.clone()

    def softmax_backward(self, g: torch.Tensor, y: torch.Tensor, dim: int = -1, log: bool = False,
                         in_dtype=None) -> torch.Tensor:
        in_dtype = in_dtype or y.dtype
        outer, size, inner = self._layout(y.shape, dim)
        gd, yd = self.put(g.contiguous()), self.put(y.contiguous())
        dx = self.empty(y.shape, in_dtype)
        ws, wsb = self.workspace(self.lib.emu_softmax_backward_workspace_bytes(
            _c_i64(outer), _c_i64(size), _c_i64(inner), DTYPES[y.dtype], DTYPES[in_dtype]))
        self.check(self.lib.emu_softmax_backward(
            _c_ptr(gd.data_ptr()), _c_ptr(yd.data_ptr()), DTYPES[y.dtype], _c_ptr(dx.data_ptr()), DTYPES[in_dtype],
            _c_i64(outer), _c_i64(size), _c_i64(inner), int(log), _c_ptr(ws), _c_size(wsb)), "softmax backward")
        return dx.clone()


@contextmanager
def schedule(order: str):
    """Runs the emulated threads between barriers in increasing ("forward") or decreasing
    ("reverse") order."""
    old = os.environ.get("FASTLOSS_EMU_ORDER")
    os.environ["FASTLOSS_EMU_ORDER"] = order
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTLOSS_EMU_ORDER"]
        else:
            os.environ["FASTLOSS_EMU_ORDER"] = old
