"""Sinkhorn family: fastloss.sinkhorn against POT's batch solver (ot.batch.solve_batch, log
domain), POT's ot.bregman.sinkhorn_log on the torch backend (one call per problem) and GeomLoss
(tensorized; KeOps where it installs); the SinKD loss forward+backward against the eager
formulation of its authors (autograd through every normalization)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

import fastloss

from .harness import Case, Result, Roofline, Target, Unavailable

FAMILY = "sinkhorn"

EPS = 0.02  # entropic regularization; costs are squared distances of points in the unit square
TOLS = (1e-4, 1e-6)
MAX_ITER = 10000
SOLVE_SHAPES = [(512, 64, 64), (64, 256, 256), (1, 4096, 4096), (1, 16384, 16384)]
QUICK_SOLVE_SHAPES = [(512, 64, 64), (64, 256, 256)]
GPU_ONLY = {(1, 16384, 16384)}
SINKD_SHAPES = [(32, 3), (256, 3), (1024, 3), (32, 32000), (256, 32000), (1024, 32000)]
QUICK_SINKD_SHAPES = [(32, 3), (256, 32000)]
# The eager reference takes over a minute per call at 1024 x 32000 on a 2-core CPU.
CPU_SKIP_SINKD = {(1024, 32000)}
# One POT call per problem: 512 Python-level solves per call is measured only where it fits.
SINKHORN_LOG_MAX_BATCH = 64


def _peer(name: str):
    try:
        if name == "ot":
            import ot  # type: ignore
            import ot.batch  # noqa: F401  (type: ignore)

            return ot
        import geomloss  # type: ignore

        return geomloss
    except ImportError:
        return None
    except Exception as exc:  # a broken install: report and go on
        return f"{name}: import failed ({type(exc).__name__})"


def _keops_available() -> bool:
    try:
        import pykeops  # type: ignore  # noqa: F401

        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Sinkhorn solves: inputs (cost, x, y), cost_ij = |x_i - y_j|^2, uniform marginals


def _solve_inputs(shape, device):
    B, n, m = shape

    def make(seed: int):
        g = torch.Generator(device=device)
        g.manual_seed(4321 + seed)
        x = torch.rand(B, n, 2, device=device, generator=g)
        y = torch.rand(B, m, 2, device=device, generator=g)
        return (torch.cdist(x, y) ** 2, x, y)

    return make


def _fastloss_solve(tol):
    # POT's stopping rule: the L2 norm of the row-marginal error (fastloss's default is L1).
    def run(cost, x, y):
        r = fastloss.sinkhorn(cost, eps=EPS, tol=tol, max_iter=MAX_ITER, error_norm=2)
        return r.plan, r.value

    run.__name__ = "fastloss.sinkhorn"
    return run


def _pot_batch(ot, tol):
    def run(cost, x, y):
        res = ot.batch.solve_batch(cost, reg=EPS, max_iter=MAX_ITER, tol=tol, method="log_sinkhorn", grad="detach")
        return res.plan, res.value

    return run


def _pot_sinkhorn_log(ot, tol):
    def run(cost, x, y):
        B, n, m = cost.shape
        a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
        b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
        return [ot.bregman.sinkhorn_log(a, b, cost[k], EPS, numItermax=MAX_ITER, stopThr=tol) for k in range(B)]

    return run


def _geomloss(geomloss, backend):
    # GeomLoss's cost for p=2 is |x - y|^2 / 2 and eps = blur^p: blur = sqrt(EPS / 2) gives the
    # same entropic problem. It anneals eps (scaling 0.5) instead of iterating to a tolerance.
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(EPS / 2), debias=False, backend=backend)

    def run(cost, x, y):
        return loss(x, y)

    return run


def _check_solve(shape, device, ot):
    """fastloss against POT's batch solver on the first problems of the case; problems above
    256 x 256 (where POT would take minutes) and runs without ot.batch: the plan's own marginals."""

    def check() -> Optional[str]:
        B, n, m = shape
        if n * m > 256 * 256 or not hasattr(ot, "batch"):
            cost, _, _ = _solve_inputs((1, n, m), device)(99)
            r = fastloss.sinkhorn(cost, eps=EPS, tol=1e-6, max_iter=MAX_ITER)
            rows = (r.plan.double().sum(2) - 1.0 / n).abs().sum().item()
            cols = (r.plan.double().sum(1) - 1.0 / m).abs().sum().item()
            if not (rows <= 2e-6 and cols <= 1e-5 and torch.isfinite(r.value).all()):
                return f"MISMATCH: the plan's marginals are off by {rows:.2e} (rows) and {cols:.2e} (columns)"
            return None
        cost, _, _ = _solve_inputs((min(B, 8), n, m), device)(99)
        cost = cost.double()
        r = fastloss.sinkhorn(cost, eps=EPS, tol=1e-10, max_iter=MAX_ITER)
        res = ot.batch.solve_batch(cost, reg=EPS, max_iter=MAX_ITER, tol=1e-10, method="log_sinkhorn")
        err = ((r.plan - res.plan).abs().max() / res.plan.abs().max()).item()
        return None if err <= 1e-5 else f"MISMATCH vs ot.batch.solve_batch: plan max rel err {err:.2e}"

    return check


# --------------------------------------------------------------------------------------------
# SinKD: inputs (student_logits requiring grad, teacher_logits)


def sinkd_eager(zs, zt, temperature=2.0, eps=0.1, n_iter=20, scale=0.001):
    ps = torch.softmax(zs / temperature, dim=1)
    pt = torch.softmax(zt / temperature, dim=1)
    W = torch.cdist(ps, pt, p=1)
    P = torch.exp(-W / eps)
    for _ in range(n_iter):
        P = P / P.sum(dim=1, keepdim=True)
        P = P / P.sum(dim=0, keepdim=True)
    return scale * torch.sum(P * W)


def _sinkd_fwd_bwd(fn):
    def run(zs, zt):
        loss = fn(zs, zt)
        (grad,) = torch.autograd.grad(loss, zs)
        return loss, grad

    run.__name__ = getattr(fn, "__name__", "fn") + "_fwd_bwd"
    return run


def _sinkd_inputs(shape, device):
    B, C = shape

    def make(seed: int):
        g = torch.Generator(device=device)
        g.manual_seed(777 + seed)
        zs = torch.randn(B, C, device=device, generator=g) * 3
        zt = torch.randn(B, C, device=device, generator=g) * 3
        return (zs.requires_grad_(True), zt)

    return make


def _check_sinkd(shape, device):
    def check() -> Optional[str]:
        B, C = shape
        zs, zt = _sinkd_inputs((min(B, 64), min(C, 4096)), device)(99)
        la, ga = _sinkd_fwd_bwd(fastloss.sinkhorn_kd_loss)(zs, zt)
        lb, gb = _sinkd_fwd_bwd(sinkd_eager)(zs, zt)
        e1 = ((la - lb).abs() / lb.abs().clamp_min(1e-30)).item()
        e2 = ((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)).item()
        bad = [f"{k} rel err {v:.2e}" for k, v in (("loss", e1), ("grad", e2)) if not v <= 1e-3]
        return "MISMATCH vs eager SinKD: " + "; ".join(bad) if bad else None

    return check


# --------------------------------------------------------------------------------------------
# Cases


def cases(device: str, quick: bool) -> List[Case]:
    ot = _peer("ot")
    geomloss = _peer("geomloss")
    out = []
    for shape in QUICK_SOLVE_SHAPES if quick else SOLVE_SHAPES:
        if shape in GPU_ONLY and device != "cuda":
            continue
        B, n, m = shape
        for tol in (TOLS[:1] if quick else TOLS):
            baselines = {}
            if ot is None or isinstance(ot, str):
                reason = ot or "POT: not installed (optional peer)"
                baselines["POT batch"] = Unavailable(reason)
                baselines["POT sinkhorn_log"] = Unavailable(reason)
            else:
                baselines["POT batch"] = _pot_batch(ot, tol)
                if B <= SINKHORN_LOG_MAX_BATCH:
                    baselines["POT sinkhorn_log"] = _pot_sinkhorn_log(ot, tol)
                else:
                    baselines["POT sinkhorn_log"] = Unavailable(f"one call per problem: run for B <= {SINKHORN_LOG_MAX_BATCH}")
            if geomloss is None or isinstance(geomloss, str):
                baselines["GeomLoss tensorized"] = Unavailable(geomloss or "GeomLoss: not installed (optional peer)")
            elif n * m > 4096 * 4096 and device != "cuda":
                baselines["GeomLoss tensorized"] = Unavailable("not run on CPU at this size")
            else:
                baselines["GeomLoss tensorized"] = _geomloss(geomloss, "tensorized")
                if _keops_available():
                    baselines["GeomLoss KeOps"] = _geomloss(geomloss, "online")
            elem = 4
            out.append(
                Case(
                    family=FAMILY,
                    shape=shape,
                    dtype=torch.float32,
                    mode=f"solve tol={tol:g}",
                    device=device,
                    make_inputs=_solve_inputs(shape, device),
                    input_bytes=B * n * m * elem,
                    fastloss=_fastloss_solve(tol),
                    baselines=baselines,
                    # Read the cost once and write the plan (the iterations re-read it).
                    bytes_moved=2 * B * n * m * elem,
                    check=_check_solve(shape, device, ot) if not isinstance(ot, (str, type(None))) else None,
                )
            )
    for shape in QUICK_SINKD_SHAPES if quick else SINKD_SHAPES:
        B, C = shape
        if device != "cuda" and shape in CPU_SKIP_SINKD:
            continue
        out.append(
            Case(
                family=FAMILY,
                shape=shape,
                dtype=torch.float32,
                mode="SinKD fwd+bwd",
                device=device,
                make_inputs=_sinkd_inputs(shape, device),
                input_bytes=2 * B * C * 4,
                fastloss=_sinkd_fwd_bwd(fastloss.sinkhorn_kd_loss),
                baselines={"eager SinKD": _sinkd_fwd_bwd(sinkd_eager)},
                bytes_moved=3 * B * C * 4,  # read both logits, write the gradient
                check=_check_sinkd(shape, device),
            )
        )
    return out


def notes(device: str, _cases: Sequence[Case]) -> List[str]:
    out = [
        f"solve: cost_ij = |x_i - y_j|^2 for x, y uniform in the unit square, uniform marginals, eps = {EPS}, "
        f"max_iter = {MAX_ITER}, float32. Stopping rules at the same tol: fastloss with error_norm=2 stops each "
        "problem when the L2 norm of its row-marginal error is <= tol (checked every iteration); POT's batch "
        "solver when the largest L2 row-marginal error of the batch is < tol (checked after iterations 1, 11, "
        "21, ...), POT's sinkhorn_log when the L2 column-marginal error is < tol",
        "GeomLoss: SamplesLoss('sinkhorn', p=2, blur=sqrt(eps/2), debias=False) on the point clouds: the same "
        "entropic problem, solved by eps-annealing with a fixed schedule (no tolerance), value only",
        "SinKD: eager = the authors' formulation (softmax, torch.cdist p=1, exp, 20 row/column normalizations, "
        "scale * sum(P * W)), backward by autograd; fastloss = fused forward and reverse sweep; gradient w.r.t. "
        "the student logits",
        "bytes moved: solve = read the cost once + write the plan; SinKD = read both logits + write the gradient",
    ]
    ot = _peer("ot")
    if ot is None or isinstance(ot, str):
        out.append(ot or "POT: not installed")
    geomloss = _peer("geomloss")
    if geomloss is None or isinstance(geomloss, str):
        out.append(geomloss or "GeomLoss: not installed")
    elif not _keops_available():
        out.append("GeomLoss KeOps backend: pykeops not installed (needs a CUDA toolchain at run time); tensorized only")
    if device != "cuda":
        out.append("CPU: 16384 x 16384 and SinKD 1024 x 32000 are GPU-only cases (the eager reference alone takes "
                   "minutes per call on 2 cores)")
    return out


# --------------------------------------------------------------------------------------------
# Targets (printed next to the results, not asserted)


def _vs(name: str):
    def value(r: Result, _roof: Roofline) -> Optional[float]:
        return r.speedup(name)

    return value


def _is_solve(r: Result) -> bool:
    return r.case.mode.startswith("solve")


def targets(device: str) -> List[Target]:
    sinkd = lambda r: r.case.mode.startswith("SinKD")
    if device == "cuda":
        return [
            Target("GPU: >=10x POT's batch solver (each solve case)", _is_solve, _vs("POT batch"), 10.0),
            Target("GPU: >=3x GeomLoss tensorized (each solve case)", _is_solve, _vs("GeomLoss tensorized"), 3.0),
            Target("GPU: SinKD fwd+bwd >=10x the eager formulation", sinkd, _vs("eager SinKD"), 10.0),
        ]
    return [
        Target("CPU: >=10x POT's batch solver at the same tol (each solve case)", _is_solve, _vs("POT batch"), 10.0),
        Target("CPU: SinKD fwd+bwd >=10x the eager formulation (GPU target, shown for reference)", sinkd,
               _vs("eager SinKD"), 10.0),
    ]
