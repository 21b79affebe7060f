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


def releasing(method):
    """``method`` freeing the buffers it made (it returns clones)."""

    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self.release()

    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


class Emulator:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.fastloss_emu_alloc.restype = _c_ptr
        lib.fastloss_emu_alloc.argtypes = [_c_size]
        lib.fastloss_emu_free.argtypes = [_c_ptr]
        self._allocations: list = []
        for name in ("emu_softmax_forward_workspace_bytes", "emu_softmax_backward_workspace_bytes",
                     "emu_stat_topk_workspace_bytes", "emu_sinkhorn_workspace_bytes",
                     "emu_lce_forward_workspace_bytes"):
            getattr(lib, name).restype = _c_size

    def set_device(self, index: int, sms: int) -> None:
        """Makes emulated device ``index`` (with ``sms`` multiprocessors) the current one. The
        launchers cache device properties per index: give each SM count its own."""
        self.lib.fastloss_emu_set_device(index, sms)

    def ldmatrix_stats(self, reset: bool = False) -> tuple:
        """(ldmatrix instructions run, those with a shared-memory bank conflict) since the last reset."""
        ops, conflicts = ctypes.c_uint64(), ctypes.c_uint64()
        self.lib.fastloss_emu_ldmatrix_stats(ctypes.byref(ops), ctypes.byref(conflicts), int(reset))
        return ops.value, conflicts.value

    # -- memory -----------------------------------------------------------------------------

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in guarded memory (0xff bytes: NaN for floats) that a kernel may write."""
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = max(1, numel) * torch.empty((), dtype=dtype).element_size()
        ptr = self.lib.fastloss_emu_alloc(nbytes)
        self._allocations.append(ptr)
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)[:numel].view(*shape)

    def release(self) -> None:
        """Frees every buffer made since the last release (views of them must be gone)."""
        for ptr in self._allocations:
            self.lib.fastloss_emu_free(ptr)
        self._allocations.clear()

    def put(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A contiguous copy of ``t`` in guarded memory."""
        if t is None:
            return None
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out

    def put_strided(self, t: Optional[torch.Tensor], pad: int, offset: int = 0) -> Optional[torch.Tensor]:
        """A strided copy of ``t`` in guarded memory, the gaps left 0xff (NaN: a kernel that reads
        outside the view sees it): a 2-D ``t`` with rows ``pad`` elements longer, starting
        ``offset`` elements in (offset <= pad); a 1-D one with every (pad + 1)-th element."""
        if t is None:
            return None
        if t.dim() == 1:
            return self.empty((t.shape[0], pad + 1), t.dtype)[:, 0].copy_(t)
        rows, cols = t.shape
        return self.empty((rows, cols + pad), t.dtype)[:, offset:offset + cols].copy_(t)

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

    @releasing
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

    @releasing
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

    # -- stat_topk ---------------------------------------------------------------------------

    def _stats(self, outer, inner, dtype):
        return [self.empty((outer, inner), ACC[dtype]) for _ in range(3)]

    @releasing
    def stat_topk(self, x: torch.Tensor, dim: int, z: float, hard: bool):
        """(y, theta, mean, std) with theta etc. of shape (outer, inner)."""
        outer, size, inner = self._layout(x.shape, dim)
        xd = self.put(x.contiguous())
        y = self.empty(x.shape, x.dtype)
        theta, mean, sd = self._stats(outer, inner, x.dtype)
        ws, wsb = self.workspace(self.lib.emu_stat_topk_workspace_bytes(
            _c_i64(outer), _c_i64(size), _c_i64(inner), DTYPES[x.dtype]))
        self.check(self.lib.emu_stat_topk_forward(
            _c_ptr(xd.data_ptr()), _c_ptr(y.data_ptr()), _c_ptr(theta.data_ptr()), _c_ptr(mean.data_ptr()),
            _c_ptr(sd.data_ptr()), DTYPES[x.dtype], _c_i64(outer), _c_i64(size), _c_i64(inner), ctypes.c_double(z),
            int(hard), _c_ptr(ws), _c_size(wsb)), "stat_topk forward")
        return y.clone(), theta.clone(), mean.clone(), sd.clone()

    @releasing
    def stat_topk_backward(self, grad_y, x, theta, mean, sd, grad_theta, dim, z, hard, threshold_grad):
        outer, size, inner = self._layout(x.shape, dim)
        g, xd, th, mu, s_, gt = (self.put(t.contiguous()) if t is not None else None
                                 for t in (grad_y, x, theta, mean, sd, grad_theta))
        dx = self.empty(x.shape, x.dtype)
        ws, wsb = self.workspace(self.lib.emu_stat_topk_workspace_bytes(
            _c_i64(outer), _c_i64(size), _c_i64(inner), DTYPES[x.dtype]))
        self.check(self.lib.emu_stat_topk_backward(
            _c_ptr(g.data_ptr()), _c_ptr(xd.data_ptr()), _c_ptr(th.data_ptr()), _c_ptr(mu.data_ptr()),
            _c_ptr(s_.data_ptr()), _c_ptr(gt.data_ptr() if gt is not None else None), _c_ptr(dx.data_ptr()),
            DTYPES[x.dtype], _c_i64(outer), _c_i64(size), _c_i64(inner), ctypes.c_double(z), int(hard),
            int(threshold_grad), _c_ptr(ws), _c_size(wsb)), "stat_topk backward")
        return dx.clone()

    @releasing
    def gelu_mul(self, gate: torch.Tensor, up: torch.Tensor, z: float):
        rows, size = gate.numel() // gate.shape[-1], gate.shape[-1]
        gd, ud = self.put(gate.contiguous()), self.put(up.contiguous())
        out = self.empty(gate.shape, gate.dtype)
        theta, mean, sd = self._stats(rows, 1, gate.dtype)
        ws, wsb = self.workspace(self.lib.emu_stat_topk_workspace_bytes(
            _c_i64(rows), _c_i64(size), _c_i64(1), DTYPES[gate.dtype]))
        self.check(self.lib.emu_gelu_mul_forward(
            _c_ptr(gd.data_ptr()), _c_ptr(ud.data_ptr()), _c_ptr(out.data_ptr()), _c_ptr(theta.data_ptr()),
            _c_ptr(mean.data_ptr()), _c_ptr(sd.data_ptr()), DTYPES[gate.dtype], _c_i64(rows), _c_i64(size),
            ctypes.c_double(z), _c_ptr(ws), _c_size(wsb)), "gelu_mul forward")
        return out.clone(), theta.clone(), mean.clone(), sd.clone()

    @releasing
    def gelu_mul_backward(self, grad, gate, up, theta, mean, sd, z, threshold_grad):
        rows, size = gate.numel() // gate.shape[-1], gate.shape[-1]
        g, gd, ud, th, mu, s_ = (self.put(t.contiguous()) for t in (grad, gate, up, theta, mean, sd))
        dgate, dup = self.empty(gate.shape, gate.dtype), self.empty(up.shape, up.dtype)
        ws, wsb = self.workspace(self.lib.emu_stat_topk_workspace_bytes(
            _c_i64(rows), _c_i64(size), _c_i64(1), DTYPES[gate.dtype]))
        self.check(self.lib.emu_gelu_mul_backward(
            _c_ptr(g.data_ptr()), _c_ptr(gd.data_ptr()), _c_ptr(ud.data_ptr()), _c_ptr(th.data_ptr()),
            _c_ptr(mu.data_ptr()), _c_ptr(s_.data_ptr()), _c_ptr(dgate.data_ptr()), _c_ptr(dup.data_ptr()),
            DTYPES[gate.dtype], _c_i64(rows), _c_i64(size), ctypes.c_double(z), int(threshold_grad), _c_ptr(ws),
            _c_size(wsb)), "gelu_mul backward")
        return dgate.clone(), dup.clone()

    # -- log-Bessel and von Mises-Fisher ------------------------------------------------------

    @releasing
    def log_bessel(self, fn: int, v: torch.Tensor, x: torch.Tensor):
        """fn: 0 log I, 1 log K (one output), 2 / 3 their derivatives in (v, x) (two outputs),
        4 / 5 their second derivatives in (v v, v x, x x) (three outputs)."""
        vd, xd = self.put(v.contiguous()), self.put(x.contiguous())
        outs = [self.empty(x.shape, x.dtype) for _ in range(3)]
        self.check(self.lib.emu_log_bessel(fn, int(x.dtype == torch.float64), _c_ptr(vd.data_ptr()),
                                           _c_ptr(xd.data_ptr()), *(_c_ptr(o.data_ptr()) for o in outs),
                                           _c_i64(x.numel())), "log_bessel")
        count = 1 if fn < 2 else 2 if fn < 4 else 3
        return tuple(o.clone() for o in outs[:count]) if count > 1 else outs[0].clone()

    @releasing
    def vmf(self, fn: int, values: torch.Tensor, p: int, iterations: int = 1) -> torch.Tensor:
        vd = self.put(values.contiguous())
        out = self.empty(values.shape, values.dtype)
        self.check(self.lib.emu_vmf(fn, int(values.dtype == torch.float64), _c_ptr(vd.data_ptr()),
                                    _c_ptr(out.data_ptr()), _c_i64(values.numel()), ctypes.c_double(p),
                                    iterations), "vmf")
        return out.clone()

    @releasing
    def vmf_sample_w_derivative(self, w: torch.Tensor, kappa: torch.Tensor, p: int) -> torch.Tensor:
        wd, kd = self.put(w.contiguous()), self.put(kappa.contiguous())
        out = self.empty(w.shape, w.dtype)
        self.check(self.lib.emu_vmf_sample_w_derivative(int(w.dtype == torch.float64), _c_ptr(wd.data_ptr()),
                                                        _c_ptr(kd.data_ptr()), _c_ptr(out.data_ptr()),
                                                        _c_i64(w.numel()), ctypes.c_double(p)),
                   "vmf_sample_w_derivative")
        return out.clone()

    # -- Sinkhorn ----------------------------------------------------------------------------

    @releasing
    def sinkhorn(self, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, tol: float,
                 mass_tol: float, error_norm: int = 1):
        """(plan, alpha, beta, value, n_iter, error) for cost (B, n, m) in float32 or float64."""
        batch, n, m = cost.shape
        dtype = cost.dtype
        ins = [self.put(t.contiguous()) for t in (cost, a, b, a.log(), b.log())]
        outs = [self.empty((batch, n, m), dtype), self.empty((batch, n), dtype), self.empty((batch, m), dtype),
                self.empty((batch,), dtype), self.empty((batch,), torch.int64), self.empty((batch,), dtype)]
        for t in outs[3:]:
            t.zero_()
        ptrs = (_c_ptr * 11)(*[t.data_ptr() for t in ins + outs])
        ws, wsb = self.workspace(self.lib.emu_sinkhorn_workspace_bytes(
            _c_i64(batch), _c_i64(n), _c_i64(m), _c_size(cost.element_size())))
        self.check(self.lib.emu_sinkhorn(int(dtype == torch.float64), ptrs, _c_i64(batch), _c_i64(n), _c_i64(m),
                                         ctypes.c_double(1.0 / eps), _c_i64(max_iter), ctypes.c_double(tol),
                                         ctypes.c_double(mass_tol), error_norm, _c_ptr(ws), _c_size(wsb)),
                   "sinkhorn")
        return tuple(t.clone() for t in outs)

    # -- cut cross-entropy -------------------------------------------------------------------

    def _lce_inputs(self, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss,
                    vocab_start, vocab_total, strided=False):
        """strided=True: hidden's rows 24 elements longer and 16 in, classifier's 8 longer, every
        3rd element of bias and every 2nd of targets (views as the glue may pass them)."""
        tokens, dim = hidden.shape
        vocab = classifier.shape[0]
        assert self.lib.emu_lce_runnable() == 1
        if strided:
            hd, cd = self.put_strided(hidden, 24, 16), self.put_strided(classifier, 8)
            bd, td = self.put_strided(bias, 2), self.put_strided(targets, 1)
        else:
            hd, cd, td, bd = self.put(hidden), self.put(classifier), self.put(targets), self.put(bias)
        ptrs = (_c_ptr * 4)(hd.data_ptr(), cd.data_ptr(), bd.data_ptr() if bd is not None else None, td.data_ptr())
        ints = (_c_i64 * 10)(hd.stride(0), cd.stride(0), bd.stride(0) if bd is not None else 1, td.stride(0), tokens,
                             vocab, dim, vocab_start, vocab if vocab_total is None else vocab_total, ignore_index)
        floats = (ctypes.c_float * 3)(softcap or 0.0, label_smoothing, z_loss)
        return ptrs, ints, floats, int(targets.dtype == torch.int64)

    @releasing
    def lce_forward(self, hidden, classifier, targets, bias=None, *, ignore_index=-100, softcap=None,
                    label_smoothing=0.0, z_loss=0.0, shard=False, vocab_start=0, vocab_total=None, strided=False):
        """(loss, lse), or for shard=True (lse over this shard, linear term), float32 (tokens)."""
        tokens, dim = hidden.shape
        vocab = classifier.shape[0]
        ptrs, ints, floats, t64 = self._lce_inputs(hidden, classifier, targets, bias, ignore_index, softcap,
                                                   label_smoothing, z_loss, vocab_start, vocab_total, strided)
        out0, out1 = self.empty((tokens,), torch.float32), self.empty((tokens,), torch.float32)
        ws, wsb = self.workspace(self.lib.emu_lce_forward_workspace_bytes(_c_i64(tokens), _c_i64(vocab),
                                                                         _c_i64(dim)))
        self.check(self.lib.emu_lce_forward(
            DTYPES[hidden.dtype], ptrs, ints, floats, t64, int(shard), _c_ptr(out0.data_ptr()),
            _c_ptr(out1.data_ptr()), _c_ptr(ws), _c_size(wsb)), "linear_cross_entropy forward")
        return out0.clone(), out1.clone()

    @releasing
    def lce_backward(self, grad_loss, grad_lse, lse, hidden, classifier, targets, bias=None, *, ignore_index=-100,
                     softcap=None, label_smoothing=0.0, z_loss=0.0, filter_eps=0.0, vocab_start=0,
                     vocab_total=None, strided=False):
        """(d hidden, d classifier, d bias) in float32 (d bias None without a bias)."""
        tokens, dim = hidden.shape
        vocab = classifier.shape[0]
        ptrs, ints, floats, t64 = self._lce_inputs(hidden, classifier, targets, bias, ignore_index, softcap,
                                                   label_smoothing, z_loss, vocab_start, vocab_total, strided)
        gl, gs, ls = (self.put(t.float().contiguous()) if t is not None else None for t in (grad_loss, grad_lse, lse))
        dh, dc = self.empty((tokens, dim), torch.float32), self.empty((vocab, dim), torch.float32)
        db = self.empty((vocab,), torch.float32) if bias is not None else None
        for t in (dh, dc, db):
            if t is not None:
                t.zero_()
        g = (_c_ptr * 3)(gl.data_ptr(), gs.data_ptr() if gs is not None else None, ls.data_ptr())
        d = (_c_ptr * 3)(dh.data_ptr(), dc.data_ptr(), db.data_ptr() if db is not None else None)
        self.check(self.lib.emu_lce_backward(DTYPES[hidden.dtype], ptrs, ints, floats, t64,
                                             ctypes.c_float(filter_eps), g, d), "linear_cross_entropy backward")
        return dh.clone(), dc.clone(), (db.clone() if db is not None else None)


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
