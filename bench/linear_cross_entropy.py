"""Linear cross-entropy family (cut cross-entropy): fastloss.linear_cross_entropy against the
eager formulation (logits = hidden @ classifier.T, softcap, F.cross_entropy), torch.compile of it
on the GPU, and the peers cut-cross-entropy (Apple) and Liger's fused linear cross-entropy when
installed. On the CPU, the peak extra memory (peak RSS) of one forward+backward is measured in a
fresh process per implementation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import fastloss

from .harness import Case, Compiled, Result, Roofline, Target, Unavailable

FAMILY = "linear_cross_entropy"
# (N tokens, V vocabulary, D hidden, softcap, name)
GPU_SHAPES = [(8192, 256000, 2304, 30.0, "Gemma-2 head"), (8192, 128256, 4096, None, "Llama-3 head"),
              (16384, 128256, 4096, None, "Llama-3 head")]
CPU_SHAPES = [(4096, 32000, 1024, None, "CPU target shape"),
              (65536, 100, 256, None, "small head: one vocabulary block, token tiles in parallel")]
QUICK_SHAPES = [(1024, 8192, 512, None, "quick")]


# --------------------------------------------------------------------------------------------
# Implementations: (hidden, classifier, targets) -> loss


def eager(softcap):
    def loss_fn(h, c, t):
        z = h @ c.T
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z.float(), t)

    loss_fn.__name__ = "eager"
    return loss_fn


def fastloss_lce(softcap, filter_eps="auto"):
    def loss_fn(h, c, t):
        return fastloss.linear_cross_entropy(h, c, t, softcap=softcap, filter_eps=filter_eps)

    loss_fn.__name__ = "fastloss" if filter_eps == "auto" else f"fastloss_filter_{filter_eps}"
    return loss_fn


def apple_cce(softcap):
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as exc:  # not installed, or installed but broken
        return Unavailable(f"cut-cross-entropy: {type(exc).__name__}")

    def loss_fn(h, c, t):
        return cce(h, c, t, softcap=softcap)

    loss_fn.__name__ = "cut-cross-entropy"
    return loss_fn


def liger_flce(softcap):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        module = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
    except Exception as exc:  # not installed, or installed but broken
        return Unavailable(f"liger-kernel: {type(exc).__name__}")

    def loss_fn(h, c, t):
        return module(c, h, t)

    loss_fn.__name__ = "liger"
    return loss_fn


def _fwd_bwd(fn):
    if isinstance(fn, Unavailable):
        return fn

    def run(h, c, t):
        loss = fn(h, c, t)
        dh, dc = torch.autograd.grad(loss, (h, c))
        return loss, dh, dc

    run.__name__ = getattr(fn, "__name__", "fn") + "_fwd_bwd"
    return run


# --------------------------------------------------------------------------------------------
# Cases


def _make_inputs(n, v, d, dtype, device, backward):
    def make(seed: int):
        g = torch.Generator(device=device)
        g.manual_seed(1234 + seed)
        h = torch.randn(n, d, dtype=dtype, device=device, generator=g)
        c = torch.randn(v, d, dtype=dtype, device=device, generator=g) / d**0.5
        t = torch.randint(0, v, (n,), device=device, generator=g)
        if backward:
            h.requires_grad_(True)
            c.requires_grad_(True)
        return h, c, t

    return make


def _make_check(v, d, dtype, device, softcap):
    """The loss, and the gradients both without filtering (the kernels' arithmetic) and with
    the default filter (what is timed), against float64 on 256 tokens of the case's head."""
    def check() -> Optional[str]:
        h, c, t = _make_inputs(256, v, d, dtype, device, True)(99)
        loss, dh, dc = _fwd_bwd(fastloss_lce(softcap, None))(h, c, t)
        _, fh, fc = _fwd_bwd(fastloss_lce(softcap))(h, c, t)
        h64, c64 = h.detach().double().requires_grad_(), c.detach().double().requires_grad_()
        ref, rh, rc = _fwd_bwd(eager(softcap))(h64, c64, t)
        errs = [abs(loss.item() - ref.item()) / abs(ref.item())]
        errs += [((a.double() - b).norm() / b.norm()).item() for a, b in ((dh, rh), (dc, rc), (fh, rh), (fc, rc))]
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return None if max(errs) <= tol else f"MISMATCH vs float64 eager: rel errs {errs} > {tol:g}"

    return check


def cases(device: str, quick: bool) -> List[Case]:
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    # CPU: the target is float32's; bfloat16 is what training runs in
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    out = []
    for dtype, (n, v, d, softcap, _name) in ((dt, shape) for dt in dtypes for shape in shapes):
        elem = torch.empty((), dtype=dtype).element_size()
        baselines = {"eager": eager(softcap)}
        if device == "cuda":
            baselines["torch.compile"] = Compiled(eager(softcap), (n, v, d, dtype, device))
            baselines["cut-cross-entropy"] = apple_cce(softcap)
            baselines["liger"] = liger_flce(softcap)
        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            impls = {k: (_fwd_bwd(f) if backward else f) for k, f in baselines.items()}
            if backward and device == "cuda":  # the exact backward, every tile's gradient computed
                impls["fastloss, no filter"] = _fwd_bwd(fastloss_lce(softcap, None))
            fast = _fwd_bwd(fastloss_lce(softcap)) if backward else fastloss_lce(softcap)
            out.append(Case(
                family=FAMILY, shape=(n, v, d), dtype=dtype, mode=mode + (f" softcap {softcap:g}" if softcap else ""),
                device=device, make_inputs=_make_inputs(n, v, d, dtype, device, backward),
                input_bytes=(n + v) * d * elem + 8 * n, fastloss=fast, baselines=impls,
                # read E and C (+ write dE, dC): the logits never reach memory
                bytes_moved=(n + v) * d * elem * (2 if backward else 1),
                flops=(6 if backward else 2) * n * v * d,
                check=_make_check(v, d, dtype, device, softcap)))
    return out


# --------------------------------------------------------------------------------------------
# Peak extra memory on the CPU (peak RSS of a fresh process minus its RSS with the inputs)

_RSS_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F, fastloss
n, v, d, impl = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g).requires_grad_()
c = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()
t = torch.randint(0, v, (n,), generator=g)
def run():
    if impl == "fastloss":
        loss = fastloss.linear_cross_entropy(h, c, t)
    else:
        loss = F.cross_entropy(h @ c.T, t)
    return torch.autograd.grad(loss, (h, c))
with torch.no_grad():  # warm up the thread pool and libraries (BLAS keeps its packing buffers)
    torch.randn(1024, 1024) @ torch.randn(1024, 1024)
    fastloss.linear_cross_entropy(h[:8], c[:64], t[:8] % 64); F.cross_entropy(h[:8] @ c[:64].T, t[:8] % 64)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
base = status("VmRSS:")
grads = run()
print(json.dumps({"extra": status("VmHWM:") - base}))
"""

_RSS: Dict[str, int] = {}


def _peak_extra_rss(n, v, d, impl) -> Optional[int]:
    try:
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n), str(v), str(d), impl], capture_output=True,
                             text=True, timeout=600, check=True)
        return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError):
        return None


def notes(device: str, cases: Sequence[Case]) -> List[str]:
    bf16_path = fastloss.build_info()["linear_cross_entropy_cpu_bf16"]
    lines = [
        "baselines: `eager` = logits = hidden @ classifier.T (softcap: s * tanh(z / s)), then F.cross_entropy in "
        "float32; GPU: `torch.compile` of it, and the peers cut-cross-entropy (Apple, impl 'cce', filter_eps auto) "
        "and liger-kernel's fused linear cross-entropy when installed",
        "fastloss runs with its defaults (reduction mean, filter_eps auto); targets uniform random, no ignored tokens",
        "checked before timing against float64 eager on 256 tokens: the loss, and the gradients with filter_eps=None "
        "and with filter_eps auto. The filter skips a tile only if it holds no target and every probability in it is "
        "below filter_eps (fp32 3.7e-9, bf16 2.4e-4). The logits here are standard normal: on the CPU's shapes every "
        "1024 x 512 tile holds targets and larger probabilities, so nothing is skipped and the timed backward is the "
        "exact one; the GPU's 128 x 128 bf16 tiles at V >= 128256 hold fewer such probabilities the larger V is, and "
        "some tiles without a target are skipped: `fastloss, no filter` (filter_eps=None) times the exact backward",
        "TFLOP/s: 2 N V D (fwd) and 6 N V D (fwd+bwd) useful FLOPs over the fastloss time; fastloss recomputes the "
        "logits in the backward (8 N V D done), like cut cross-entropy",
        "fastloss CUDA: float16 / bfloat16 run the hand-written tensor-core kernels (mma.sync, logits kept "
        "on chip); float32 the blocked cuBLAS + ATen path",
        "fastloss CPU, bfloat16: " + (
            f"the bfloat16 operands are multiplied into float32 ({bf16_path}; eager's bfloat16 matmul rounds its "
            "logits to bfloat16); `% of matmul` is against the float32 matmul roofline"
            if bf16_path.startswith("oneDNN")
            else f"converted to float32 for float32 matmuls ({bf16_path})"),
    ]
    # Measured at the CPU target shape only (two fresh processes, ~25 s), when its fp32
    # forward+backward case runs: the memory targets are that case's.
    n, v, d = CPU_SHAPES[0][:3]
    target_case = any(c.shape == (n, v, d) and c.dtype == torch.float32 and c.mode.startswith("fwd+bwd")
                      for c in cases)
    if device == "cpu" and target_case and os.path.exists("/proc/self/clear_refs"):
        fl = _peak_extra_rss(n, v, d, "fastloss")
        ea = _peak_extra_rss(n, v, d, "eager")
        bound = (n + v) * d * 4
        if fl is not None and ea is not None:
            _RSS["fastloss"], _RSS["eager"], _RSS["bound"] = fl, ea, bound
            lines.append(
                f"peak extra memory (peak RSS minus RSS with the inputs, fresh process, one fwd+bwd, {n}x{v}x{d} "
                f"fp32): fastloss {fl / 2**20:.0f} MiB = {100 * fl / ea:.1f}% of eager's {ea / 2**20:.0f} MiB; "
                f"lower bound dE + dC = {bound / 2**20:.0f} MiB (fastloss = {fl / bound:.2f}x the bound)")
        else:
            lines.append("peak RSS: the measurement failed (needs Linux /proc/self/clear_refs)")
    return lines


# --------------------------------------------------------------------------------------------
# Targets (printed next to the results, not asserted)


def _vs(name):
    return lambda r, _roof: r.speedup(name)


def _rss_saving(_r: Result, _roof: Roofline) -> Optional[float]:
    if "fastloss" not in _RSS or not _RSS.get("eager"):
        return None
    return 1.0 - _RSS["fastloss"] / _RSS["eager"]


def _rss_bound_ratio(_r: Result, _roof: Roofline) -> Optional[float]:
    # lower bound / fastloss's peak extra memory: >= 1 / 1.05 means within 1.05x the bound
    if not _RSS.get("fastloss") or "bound" not in _RSS:
        return None
    return _RSS["bound"] / _RSS["fastloss"]


def targets(device: str) -> List[Target]:
    fwd_bwd = lambda r: r.case.mode.startswith("fwd+bwd")
    fwd_bwd_fp32 = lambda r: fwd_bwd(r) and r.case.dtype == torch.float32
    if device == "cuda":
        return [
            Target("GPU: fwd+bwd faster than cut-cross-entropy (aim 1.1x)", fwd_bwd, _vs("cut-cross-entropy"), 1.0),
            Target("GPU: fwd+bwd >= 2x Liger's fused linear cross-entropy", fwd_bwd, _vs("liger"), 2.0),
        ]
    # The peak RSS is measured (in fresh processes) at the CPU target shape only: its targets
    # are that case's, not whatever fwd+bwd case a --quick or -k run timed.
    n, v, d = CPU_SHAPES[0][:3]
    rss_case = lambda r: fwd_bwd_fp32(r) and r.case.shape_str == f"{n}x{v}x{d}"
    return [
        # time <= 1.3x the baseline's, i.e. speed-up >= 1 / 1.3
        Target("CPU: fwd+bwd time <= 1.3x eager (speed-up >= 0.77x)", fwd_bwd_fp32, _vs("eager"), 1 / 1.3),
        Target("CPU: peak extra memory <= 15% of eager's (saving >= 85%)", rss_case, _rss_saving, 0.85, percent=True),
        Target("CPU: peak extra memory <= 1.05x the bound dE + dC (bound / peak >= 0.95)", rss_case, _rss_bound_ratio,
               1 / 1.05),
    ]
