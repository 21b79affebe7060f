"""Statistical top-k family: fastloss.stat_topk against the eager formula (Gemma 3n's
_gaussian_topk), torch.compile of it and exact top-k masking (torch.topk + scatter); the fused
stat_topk_gelu_mul against the unfused eager Gemma 3n MLP activation and torch.compile of it.
The notes report how well the statistical threshold recovers the exact top-k set."""

from __future__ import annotations

from statistics import NormalDist
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

import fastloss

from .harness import Case, Compiled, Result, Roofline, Target

FAMILY = "stat_topk"
SPARSITY = 0.95  # Gemma 3n's first layers
GPU_SHAPES = [(4096, 16384), (16384, 16384)]
CPU_SHAPES = [(4096, 16384)]  # (16384, 16384) costs minutes per case for the baselines here
QUICK_SHAPES = [(1024, 16384)]
DTYPES = [torch.float32, torch.bfloat16]
Z = NormalDist().inv_cdf(SPARSITY)


# --------------------------------------------------------------------------------------------
# Implementations


def eager_stat_topk(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False)
    return torch.relu(x - (mean + std * Z))


def fastloss_stat_topk(x: torch.Tensor) -> torch.Tensor:
    return fastloss.stat_topk(x, sparsity=SPARSITY)


def exact_topk_mask(x: torch.Tensor) -> torch.Tensor:
    k = round((1 - SPARSITY) * x.shape[-1])
    values, index = torch.topk(x, k, dim=-1, sorted=False)
    return torch.zeros_like(x).scatter(-1, index, values)


def eager_gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(eager_stat_topk(gate), approximate="tanh") * up


def fastloss_gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return fastloss.stat_topk_gelu_mul(gate, up, SPARSITY)


def _fwd_bwd_one(fn):
    def run(x, grad):
        y = fn(x)
        (dx,) = torch.autograd.grad(y, x, grad)
        return y, dx

    run.__name__ = getattr(fn, "__name__", "fn") + "_fwd_bwd"
    return run


def _fwd_bwd_two(fn):
    def run(gate, up, grad):
        y = fn(gate, up)
        dgate, dup = torch.autograd.grad(y, (gate, up), grad)
        return y, dgate, dup

    run.__name__ = getattr(fn, "__name__", "fn") + "_fwd_bwd"
    return run


# --------------------------------------------------------------------------------------------
# Cases


def _make_inputs(shape, dtype, device, n_tensors: int, backward: bool):
    def make(seed: int):
        g = torch.Generator(device=device)
        g.manual_seed(4321 + seed)
        tensors = [torch.randn(shape, dtype=dtype, device=device, generator=g) for _ in range(n_tensors)]
        if not backward:
            return tuple(tensors)
        grad = torch.randn(shape, dtype=dtype, device=device, generator=g)
        return tuple(t.requires_grad_(True) for t in tensors) + (grad,)

    return make


def _make_check(shape, dtype, device, gelu: bool, backward: bool):
    """fastloss against the float64 eager formula on 64 rows of the case's row length: the
    outputs, and for fwd+bwd cases the input gradients for a random output gradient."""

    def check() -> Optional[str]:
        g = torch.Generator(device=device)
        g.manual_seed(7)
        rows = (min(shape[0], 64),) + tuple(shape[1:])
        x = torch.randn(rows, dtype=dtype, device=device, generator=g)
        inputs = [x, torch.randn(rows, dtype=dtype, device=device, generator=g)] if gelu else [x]
        grad = torch.randn(rows, dtype=torch.float64, device=device, generator=g)
        fast, eager = (fastloss_gelu_mul, eager_gelu_mul) if gelu else (fastloss_stat_topk, eager_stat_topk)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        pairs = []
        for fn, ins in ((fast, inputs), (eager, [t.double() for t in inputs])):
            ins = [t.detach().requires_grad_(backward) for t in ins]
            y = fn(*ins)
            grads = torch.autograd.grad(y, ins, grad.to(y.dtype)) if backward else ()
            pairs.append([y, *grads])
        for name, a, b in zip(["y", "d gate" if gelu else "dx", "d up"], *pairs):
            err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            if not err <= tol:
                return f"MISMATCH ({name}) vs the float64 eager formula: max err {err:.2e} > {tol:g}"
        return None

    return check


def cases(device: str, quick: bool) -> List[Case]:
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    out = []
    for shape in shapes:
        numel = shape[0] * shape[1]
        for dtype in DTYPES:
            elem = torch.empty((), dtype=dtype).element_size()
            key = (shape, dtype, device)
            topk_impls = {"eager": eager_stat_topk, "torch.compile": Compiled(eager_stat_topk, key),
                          "exact top-k": exact_topk_mask}
            gelu_impls = {"eager": eager_gelu_mul, "torch.compile": Compiled(eager_gelu_mul, key)}
            specs = [
                # mode, fastloss, baselines, tensors in, bytes moved (elements x elem size)
                ("fwd", fastloss_stat_topk, topk_impls, 1, 2),  # read x, write y
                ("fwd+bwd", _fwd_bwd_one(fastloss_stat_topk), {k: _fwd_bwd_one(v) for k, v in topk_impls.items()},
                 1, 5),  # + read x, read grad, write dx
                ("gelu-mul fwd", fastloss_gelu_mul, gelu_impls, 2, 3),  # read gate, up, write out
                ("gelu-mul fwd+bwd", _fwd_bwd_two(fastloss_gelu_mul),
                 {k: _fwd_bwd_two(v) for k, v in gelu_impls.items()}, 2, 8),  # + read 3, write 2
            ]
            for mode, fast, baselines, n_in, moved in specs:
                backward = mode.endswith("fwd+bwd")
                out.append(Case(
                    family=FAMILY, shape=shape, dtype=dtype, mode=mode, device=device,
                    make_inputs=_make_inputs(shape, dtype, device, n_in, backward),
                    input_bytes=(n_in + backward) * numel * elem,
                    fastloss=fast, baselines=baselines, bytes_moved=moved * numel * elem,
                    check=_make_check(shape, dtype, device, mode.startswith("gelu"), backward),
                ))
    return out


# --------------------------------------------------------------------------------------------
# Recall of the exact top-k set (how good the Gaussian assumption is)


def _recall(x: torch.Tensor) -> float:
    k = round((1 - SPARSITY) * x.shape[-1])
    exact = torch.zeros_like(x, dtype=torch.bool).scatter(-1, torch.topk(x, k, dim=-1).indices, True)
    kept = fastloss.stat_topk(x, sparsity=SPARSITY, mode="hard") != 0
    return ((kept & exact).sum() / exact.sum()).item(), (kept.sum() / exact.sum()).item()


def notes(device: str, _cases: Sequence[Case]) -> List[str]:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(256, 16384, generator=g)
    student = torch.distributions.StudentT(3.0).sample((256, 16384))
    lines = [
        f"sparsity {SPARSITY} (Gemma 3n): theta = mean + std * PhiInv({SPARSITY}) = mean + {Z:.4f} std per row",
        "baselines: `eager` = Gemma 3n's formula with torch ops (mean, std, relu; gelu-mul: then gelu-tanh and *), "
        "`torch.compile` = torch.compile of it, `exact top-k` = torch.topk + scatter of the k kept values",
        "bytes moved: fwd = read x + write y; fwd+bwd = fwd + read x, grad + write dx; gelu-mul fwd = read gate, up + "
        "write out; gelu-mul fwd+bwd = fwd + read grad, gate, up + write dgate, dup",
    ]
    if device == "cpu":
        lines.append("CPU: only 4096x16384 (the 16384x16384 baselines take minutes per case on this machine)")
    for name, x in (("Gaussian", gauss), ("Student-t (3 dof)", student)):
        recall, kept = _recall(x)
        lines.append(f"recall of the exact top-k set on {name} rows (256 x 16384, k = {round((1 - SPARSITY) * 16384)}): "
                     f"{100 * recall:.1f}%, kept {kept:.2f} x k entries")
    return lines


# --------------------------------------------------------------------------------------------
# Targets (printed next to the results, not asserted)


def _vs(name):
    return lambda r, _roof: r.speedup(name)


def _pct_copy(r: Result, roof: Roofline) -> Optional[float]:
    if r.gbps is None or not roof.copy_gbps:
        return None
    return r.gbps / roof.copy_gbps


def targets(device: str) -> List[Target]:
    topk_fwd = lambda r: r.case.mode == "fwd"
    topk = lambda r: r.case.mode in ("fwd", "fwd+bwd")
    gelu = lambda r: r.case.mode.startswith("gelu")
    if device == "cuda":
        return [
            Target("GPU: stat_topk fwd >= 85% of copy bandwidth", topk_fwd, _pct_copy, 0.85, percent=True),
            Target("GPU: stat_topk fwd >= 3x the eager formula", topk_fwd, _vs("eager"), 3.0),
            Target("GPU: stat_topk >= 10x exact top-k masking", topk, _vs("exact top-k"), 10.0),
            Target("GPU: fused gelu-mul >= 1.5x the unfused eager path", gelu, _vs("eager"), 1.5),
        ]
    return [Target("CPU: >= 2x the eager formula (every case)", lambda r: True, _vs("eager"), 2.0)]
