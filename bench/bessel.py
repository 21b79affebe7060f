"""log-Bessel family: fastloss.log_bessel_iv / log_bessel_kv over a grid of (v, x) regions,
against SciPy (log(ive(v, x)) + x, log(kve(v, x)) - x; a zero, inf or NaN where the true value
is finite is a failure) and, for v in {0, 1}, torch.special (i0e, i1e, scaled k0/k1). The
notes carry an accuracy table against mpmath (tests/data/log_bessel_mpmath.csv, plus orders
0 and 1 computed here). Also the von Mises-Fisher helpers built on them: the mean resultant
length A_p and the concentration MLE, against the usual SciPy recipes."""

from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fastloss
from fastloss.distributions import VonMisesFisher

from .harness import Case, Result, Roofline, Target, Unavailable

FAMILY = "bessel"
N = 1 << 16
QUICK_N = 1 << 12
DTYPES = [torch.float32, torch.float64]
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "log_bessel_mpmath.csv")

# (v, x) samplers covering the methods of csrc/common/log_bessel.h: name -> (v range, x range, log-uniform x?)
REGIONS: Dict[str, Tuple[Tuple[float, float], Tuple[float, float], bool]] = {
    "small v,x (series / Temme / CF2)": ((0.0, 15.0), (0.05, 20.0), False),
    "tiny x": ((0.0, 15.0), (1e-10, 1e-2), True),
    "large v (Debye)": ((16.0, 1e4), (1e-2, 1e4), True),
    "small v, large x (Debye)": ((0.0, 15.0), (30.0, 1000.0), False),
    "huge x (Hankel)": ((0.0, 10.0), (1e3, 1e5), True),
}
TORCH_SPECIAL_X = (1e-3, 700.0)
# The CPU target compares one thread each (SciPy's ufuncs are single-threaded).
CPU_THREADS = 1


def _scipy():
    try:
        import scipy.special as sp  # type: ignore

        return sp
    except ImportError:
        return None


def _sample(region, n, dtype, device, seed):
    (v_lo, v_hi), (x_lo, x_hi), log_x = region
    g = torch.Generator().manual_seed(seed)
    if v_hi / max(v_lo, 1e-300) > 100 and v_lo > 0:
        v = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(v_lo), math.log(v_hi), generator=g))
    else:
        v = torch.empty(n, dtype=torch.float64).uniform_(v_lo, v_hi, generator=g)
    if log_x:
        x = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(x_lo), math.log(x_hi), generator=g))
    else:
        x = torch.empty(n, dtype=torch.float64).uniform_(x_lo, x_hi, generator=g)
    return v.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def _scipy_log(kind: str) -> Callable:
    sp = _scipy()

    def run(v: torch.Tensor, x: torch.Tensor):
        vn, xn = v.cpu().numpy(), x.cpu().numpy()
        with np.errstate(all="ignore"):
            if kind == "iv":
                return np.log(sp.ive(vn, xn)) + xn
            return np.log(sp.kve(vn, xn)) - xn

    run.__name__ = f"scipy_log_{kind}"
    return run


def _torch_special_log(kind: str, order: int) -> Callable:
    def run(v: torch.Tensor, x: torch.Tensor):
        if kind == "iv":
            scaled = torch.special.i0e(x) if order == 0 else torch.special.i1e(x)
            return scaled.log() + x
        scaled = torch.special.scaled_modified_bessel_k0(x) if order == 0 else torch.special.scaled_modified_bessel_k1(x)
        return scaled.log() - x

    run.__name__ = f"torch_special_log_{kind}{order}"
    return run


def _fastloss(kind: str) -> Callable:
    return fastloss.log_bessel_iv if kind == "iv" else fastloss.log_bessel_kv


def _fastloss_derivatives(kind: str, order: int) -> Callable:
    """(d/dv, d/dx) of the log (order 1) or (d2/dv2, d2/dv dx, d2/dx2) (order 2)."""
    suffix = "grad" if order == 1 else "hess"
    op = getattr(torch.ops.fastloss, f"log_bessel_{kind}_{suffix}")

    def run(v: torch.Tensor, x: torch.Tensor):
        return op(v, x)

    run.__name__ = f"fastloss_log_{kind}_{suffix}"
    return run


def _scipy_log_dx(kind: str) -> Callable:
    """SciPy's x-derivative of the log (it has none in v): ivp / iv, kvp / kv (unscaled)."""
    sp = _scipy()

    def run(v: torch.Tensor, x: torch.Tensor):
        vn, xn = v.cpu().numpy(), x.cpu().numpy()
        with np.errstate(all="ignore"):
            if kind == "iv":
                return sp.ivp(vn, xn) / sp.iv(vn, xn)
            return sp.kvp(vn, xn) / sp.kv(vn, xn)

    run.__name__ = f"scipy_dlog_{kind}_dx"
    return run


def _scipy_log_dx2(kind: str) -> Callable:
    """SciPy's second x-derivative of the log: F''/F - (F'/F)^2 from ivp / kvp (n = 1, 2)."""
    sp = _scipy()

    def run(v: torch.Tensor, x: torch.Tensor):
        vn, xn = v.cpu().numpy(), x.cpu().numpy()
        f, fp = (sp.iv, sp.ivp) if kind == "iv" else (sp.kv, sp.kvp)
        with np.errstate(all="ignore"):
            value = f(vn, xn)
            return fp(vn, xn, 2) / value - (fp(vn, xn) / value) ** 2

    run.__name__ = f"scipy_d2log_{kind}_dx2"
    return run


def _elementwise_case(mode, sampler, dtype, device, n, fastloss, baselines, reads, writes) -> Case:
    """A case over n elements: `reads` input and `writes` output arrays of dtype."""
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(family=FAMILY, shape=(n,), dtype=dtype, mode=mode, device=device, make_inputs=sampler,
                input_bytes=reads * n * elem, fastloss=fastloss, baselines=baselines,
                bytes_moved=(reads + writes) * n * elem)


def _make_check(kind: str, sampler, dtype) -> Optional[Callable[[], Optional[str]]]:
    """A sanity check before timing (the tests, against mpmath, own accuracy): the values on 4096
    of the case's points against SciPy's log(ive) + x / log(kve) - x where SciPy is finite and
    nonzero, within 1e-6 relative in float64 and 1e-5 in float32 (absolute below 1): a broken
    kernel is off by O(1)."""
    if _scipy() is None:
        return None

    def check() -> Optional[str]:
        v, x = (t[:4096] for t in sampler(12345))
        ours = _fastloss(kind)(v, x).double().cpu().numpy()
        ref = _scipy_log(kind)(v.double(), x.double())
        ok = np.isfinite(ref)
        if not ok.any():
            return None
        tol = 1e-6 if dtype == torch.float64 else 1e-5
        err = np.max(np.abs(ours[ok] - ref[ok]) / np.maximum(1.0, np.abs(ref[ok])))
        return None if err <= tol else f"MISMATCH vs SciPy: max err {err:.2e} > {tol:g}"

    return check


def _case(kind, label, sampler, dtype, device, n, baselines, order=0) -> Case:
    # reads v and x, writes the value, the two first derivatives or the three second ones
    mode = f"log {'I' if kind == 'iv' else 'K'}{('', ' grad', ' hess')[order]}: {label}"
    ours = _fastloss_derivatives(kind, order) if order else _fastloss(kind)
    case = _elementwise_case(mode, sampler, dtype, device, n, ours, baselines, reads=2, writes=(1, 2, 3)[order])
    if order == 0:  # the derivative cases: checked by the tests (against mpmath's derivatives)
        case.check = _make_check(kind, sampler, dtype)
    return case


# von Mises-Fisher: A_p = I_(p/2) / I_(p/2-1) and the MLE of kappa, at these dimensions.
VMF_DIMS = (3, 64, 2048)
VMF_KAPPA = (1e-2, 1e4)


def _scipy_mean_resultant(p: int) -> Callable:
    """A_p as ive(p/2, kappa) / ive(p/2 - 1, kappa) (NaN where both underflow)."""
    sp = _scipy()

    def run(kappa: torch.Tensor):
        k = kappa.cpu().numpy()
        with np.errstate(all="ignore"):
            return sp.ive(p / 2, k) / sp.ive(p / 2 - 1, k)

    run.__name__ = f"scipy_mean_resultant_p{p}"
    return run


def _scipy_kappa_mle(p: int) -> Callable:
    """The common NumPy recipe (Sra 2012): Banerjee's start rbar (p - rbar^2) / (1 - rbar^2) and
    two Newton steps on A_p(kappa) = rbar with A_p from SciPy's ive and A_p' = 1 - A^2 - (p-1) A / kappa."""
    ratio = _scipy_mean_resultant(p)

    def run(rbar: torch.Tensor):
        r = rbar.cpu().numpy()
        kappa = r * (p - r * r) / (1 - r * r)
        with np.errstate(all="ignore"):
            for _ in range(2):
                a = ratio(torch.from_numpy(kappa))
                kappa = kappa - (a - r) / (1 - a * a - (p - 1) * a / kappa)
        return kappa

    run.__name__ = f"scipy_kappa_mle_p{p}"
    return run


def _vmf_case(what: str, p: int, dtype, device, n) -> Case:
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        if what == "A_p":
            lo, hi = VMF_KAPPA
            t = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g))
        else:  # the mean resultant lengths of those concentrations
            t = torch.rand(n, dtype=torch.float64, generator=g) * 0.98 + 0.01
        return (t.to(device=device, dtype=dtype),)

    sp = _scipy()
    if what == "A_p":
        ours = lambda kappa: fastloss.vmf_mean_resultant(kappa, p)
        peer = _scipy_mean_resultant(p) if sp else Unavailable("scipy: not installed")
    else:
        ours = lambda rbar: fastloss.vmf_kappa_mle(rbar, p)
        peer = _scipy_kappa_mle(p) if sp else Unavailable("scipy: not installed")
    return _elementwise_case(f"vMF {what}, p={p}", sample, dtype, device, n, ours, {"scipy": peer}, reads=1,
                             writes=1)


VMF_SAMPLE_KAPPA = 100.0


def _vmf_sample_case(p: int, device, n) -> Case:
    """Samples of VonMisesFisher(e_1, kappa = 100) on S^(p-1), fp64: fastloss's sample()
    against scipy.stats.vonmises_fisher's rvs (both by Wood's rejection sampler, and by
    inverting the CDF at p = 3). min(n, 16 n / p) samples, so that p = 2048 writes 8 MiB."""
    samples = min(n, 16 * n // p)

    def sample(seed):
        loc = torch.zeros(p, dtype=torch.float64)
        loc[0] = 1
        return loc.to(device), torch.tensor(VMF_SAMPLE_KAPPA, dtype=torch.float64, device=device)

    def ours(loc, kappa):
        return VonMisesFisher(loc, kappa).sample((samples,))

    def scipy_rvs(loc, kappa):
        from scipy.stats import vonmises_fisher  # type: ignore

        return vonmises_fisher(loc.cpu().numpy(), float(kappa)).rvs(samples)

    peer = scipy_rvs if _scipy() else Unavailable("scipy: not installed")
    elem = 8
    return Case(family=FAMILY, shape=(samples, p), dtype=torch.float64, mode=f"vMF sample, p={p}", device=device,
                make_inputs=sample, input_bytes=(p + 1) * elem, fastloss=ours, baselines={"scipy": peer},
                bytes_moved=samples * p * elem)


def cases(device: str, quick: bool) -> List[Case]:
    n = QUICK_N if quick else N
    sp = _scipy()
    out = []
    for kind in ("iv", "kv"):
        for dtype in DTYPES:
            for label, region in REGIONS.items():
                sampler = lambda seed, region=region, dtype=dtype: _sample(region, n, dtype, device, seed)
                baselines = {"scipy": _scipy_log(kind) if sp else Unavailable("scipy: not installed")}
                out.append(_case(kind, label, sampler, dtype, device, n, baselines))
            for order in (0, 1):
                region = ((float(order), float(order)), TORCH_SPECIAL_X, True)
                sampler = lambda seed, region=region, dtype=dtype: _sample(region, n, dtype, device, seed)
                baselines = {
                    "torch.special": _torch_special_log(kind, order),
                    "scipy": _scipy_log(kind) if sp else Unavailable("scipy: not installed"),
                }
                out.append(_case(kind, f"v={order} (torch.special range)", sampler, dtype, device, n, baselines))
        # The gradients (d/dv and d/dx together), fp64: SciPy's d/dx is the only peer.
        for label, region in REGIONS.items():
            sampler = lambda seed, region=region: _sample(region, n, torch.float64, device, seed)
            baselines = {"scipy d/dx": _scipy_log_dx(kind) if sp else Unavailable("scipy: not installed")}
            out.append(_case(kind, label, sampler, torch.float64, device, n, baselines, order=1))
        # The second derivatives (three together), fp64, against SciPy's d2/dx2 and fastloss's first derivatives.
        for label, region in REGIONS.items():
            sampler = lambda seed, region=region: _sample(region, n, torch.float64, device, seed)
            baselines = {"scipy d2/dx2": _scipy_log_dx2(kind) if sp else Unavailable("scipy: not installed"),
                         "fastloss grad": _fastloss_derivatives(kind, 1)}
            out.append(_case(kind, label, sampler, torch.float64, device, n, baselines, order=2))
    for p in VMF_DIMS:
        out.append(_vmf_case("A_p", p, torch.float64, device, n))
        out.append(_vmf_case("kappa MLE", p, torch.float64, device, n))
    for p in VMF_DIMS:
        out.append(_vmf_sample_case(p, device, n))
    return out


def vmf_accuracy_table() -> List[str]:
    """A_p against mpmath, and the MLE's round trip kappa -> A_p(kappa) -> kappa, per dimension:
    fastloss and the SciPy recipes of the timed rows."""
    try:
        import mpmath as mp  # type: ignore
    except ImportError:
        return ["vMF accuracy: mpmath not installed"]
    sp = _scipy()
    kappas = np.exp(np.linspace(math.log(VMF_KAPPA[0]), math.log(VMF_KAPPA[1]), 13))
    lines = [
        "",
        f"vMF accuracy, kappa at 13 log-spaced points in [{VMF_KAPPA[0]:g}, {VMF_KAPPA[1]:g}]: max relative error of A_p "
        "against mpmath (40 digits), and of the MLE of kappa from the exact (mpmath) A_p(kappa); "
        "failures = NaN / inf / 0",
        "",
        "| p | A_p fastloss | A_p SciPy ive ratio | kappa MLE fastloss | kappa MLE SciPy recipe |",
        "|---:|---|---|---|---|",
    ]
    mp.mp.dps = 40
    for p in VMF_DIMS:
        nu = mp.mpf(p) / 2 - 1
        exact = np.array([float(mp.besseli(nu + 1, k, maxterms=10**6) / mp.besseli(nu, k, maxterms=10**6))
                          for k in (mp.mpf(float(k)) for k in kappas)])
        kt = torch.from_numpy(kappas)
        cells = []
        for got, ref in ((fastloss.vmf_mean_resultant(kt, p).numpy(), exact),
                         (_scipy_mean_resultant(p)(kt) if sp else None, exact),
                         (fastloss.vmf_kappa_mle(torch.from_numpy(exact), p).numpy(), kappas),
                         (_scipy_kappa_mle(p)(torch.from_numpy(exact)) if sp else None, kappas)):
            if got is None:
                cells.append("not installed")
                continue
            bad = ~np.isfinite(got) | (got == 0)
            err = np.abs(got[~bad] - ref[~bad]) / np.abs(ref[~bad])
            cells.append((f"{err.max():.1e}" if len(err) else "-") + (f", {int(bad.sum())} failures" if bad.any() else ""))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("(the MLE's error includes the problem's conditioning: kappa A_p' / A_p is small where A_p is flat)")
    return lines


# --------------------------------------------------------------------------------------------
# Accuracy table against mpmath


def _region_of(kind: str, v: float, x: float) -> str:
    """The method csrc/common/log_bessel.h uses at (v, x)."""
    if x >= 1024 and 4 * v * v <= x:
        return "Hankel"
    if v >= 16 or math.hypot(v, x) >= 29:
        return "Debye"
    if kind == "iv":
        return "series"
    return "Temme" if x <= 2 else "K_u integral (CPU) / CF2, + recurrence"


def _reference_points() -> List[Tuple[float, float, float, float]]:
    """(v, x, log I, log K) from the committed mpmath data and mpmath at orders 0 and 1."""
    rows = []
    with open(DATA) as f:
        for r in csv.DictReader(f):
            rows.append((float(r["v"]), float(r["x"]), float(r["log_i"]), float(r["log_k"])))
    try:
        import mpmath as mp  # type: ignore
    except ImportError:
        return rows
    mp.mp.dps = 40
    for order in (0, 1):
        for x in np.exp(np.linspace(math.log(1e-3), math.log(700.0), 25)):
            xm = mp.mpf(float(x))
            rows.append((float(order), float(x), float(mp.log(mp.besseli(order, xm))), float(mp.log(mp.besselk(order, xm)))))
    return rows


def _errors(got: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, int]:
    """Relative error (absolute where |ref| < 1) and the number of failures (non-finite)."""
    bad = ~np.isfinite(got)
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    return err[~bad], int(bad.sum())


def accuracy_table() -> List[str]:
    try:
        rows = _reference_points()
    except OSError:
        return ["accuracy table: tests/data/log_bessel_mpmath.csv not found"]
    sp = _scipy()
    v = np.array([r[0] for r in rows])
    x = np.array([r[1] for r in rows])
    lines = [
        "accuracy against mpmath (40 digits) over the test data (log-uniform v in [1e-3, 1e4], x in [1e-10, 1e5], "
        "region edges, orders 0 and 1): max / median relative error (absolute where |log| < 1), "
        "failures = inf/NaN/zero where the value is finite; `fastloss fp32` against fastloss fp64 at the "
        "fp32-rounded v and x (the rounding of the inputs is not the op's error)",
        "",
        "| function | region | points | fastloss fp64 | fastloss fp32 | SciPy (fp64) | torch.special (fp64, v in {0,1}) |",
        "|---|---|---:|---|---|---|---|",
    ]
    for col, kind in ((2, "iv"), (3, "kv")):
        ref = np.array([r[col] for r in rows])
        fn = _fastloss(kind)
        ours64 = fn(torch.from_numpy(v), torch.from_numpy(x)).numpy()
        v32, x32 = torch.from_numpy(v).float(), torch.from_numpy(x).float()
        # fp32 error against the fp64 result at the fp32-rounded inputs (input rounding is not the op's error)
        ours32 = fn(v32, x32).double().numpy()
        ref32 = fn(v32.double(), x32.double()).numpy()
        scipy_vals = _scipy_log(kind)(torch.from_numpy(v), torch.from_numpy(x)) if sp else None
        regions = np.array([_region_of(kind, a, b) for a, b in zip(v, x)])
        for region in sorted(set(regions)):
            m = regions == region
            cells = []
            for got, r in ((ours64, ref), (ours32, ref32), (scipy_vals, ref)):
                if got is None:
                    cells.append("not installed")
                    continue
                err, fails = _errors(got[m], r[m])
                cells.append(f"{err.max():.1e} / {np.median(err):.1e}" + (f", {fails} failures" if fails else "") if len(err) else f"{fails} failures")
            ts = m & ((v == 0) | (v == 1))
            if ts.any():
                ts_vals = np.array([_torch_special_log(kind, int(a))(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item() for a, b in zip(v[ts], x[ts])])
                err, fails = _errors(ts_vals, ref[ts])
                cells.append(f"{err.max():.1e} / {np.median(err):.1e}" + (f", {fails} failures" if fails else "") + f" ({ts.sum()} pts)")
            else:
                cells.append("-")
            lines.append(f"| log {'I' if kind == 'iv' else 'K'} | {region} | {m.sum()} | " + " | ".join(cells) + " |")
    return lines


def notes(device: str, cases: Sequence[Case]) -> List[str]:
    sizes = sorted({c.shape[0] for c in cases})
    out = [
        f"each case: {', '.join(map(str, sizes))} elements (v, x) drawn in one region; inputs are rotated between calls",
        "baselines: `scipy` = np.log(scipy.special.ive(v, x)) + x / np.log(kve(v, x)) - x on the CPU (one thread); "
        "`torch.special` = log(i0e / i1e / scaled_modified_bessel_k0 / k1) +- x",
        "fastloss evaluates every dtype in double internally",
        "`grad` rows: torch.ops.fastloss.log_bessel_*_grad, d/dv and d/dx together (fp64); `scipy d/dx` = "
        "ivp(v, x) / iv(v, x) or kvp / kv, the x-derivative only (SciPy has none in v; unscaled, so it overflows "
        "at large x); no target is set for the gradients",
        "`hess` rows: torch.ops.fastloss.log_bessel_*_hess, d2/dv2, d2/dv dx and d2/dx2 together (fp64); `scipy "
        "d2/dx2` = ivp(v, x, 2) / iv - (ivp / iv)^2 or the same with kv, the x-x entry only; `fastloss grad` = "
        "the first derivatives, for their relative cost; no target is set for them",
    ]
    if device == "cuda":
        out.append("on a GPU the SciPy time includes copying v and x to the host (SciPy runs on the CPU)")
    if _scipy() is None:
        out.append("scipy: not installed (optional peer): `pip install scipy`")
    out.append("`vMF` rows: fastloss.vmf_mean_resultant / vmf_kappa_mle (fp64); `scipy` = ive(p/2, kappa) / "
               "ive(p/2 - 1, kappa), and for the MLE Banerjee's start with two Newton steps on that ratio (Sra 2012); "
               "no target is set for them")
    out += accuracy_table()
    out += vmf_accuracy_table()
    return out


def _vs(name: str) -> Callable[[Result, Roofline], Optional[float]]:
    return lambda r, _roof: r.speedup(name)


def targets(device: str) -> List[Target]:
    grid = lambda r: (r.case.mode.startswith("log ") and "torch.special" not in r.case.mode
                      and " grad" not in r.case.mode and " hess" not in r.case.mode)
    if device == "cuda":
        return [Target("GPU: >=100x SciPy (every grid case)", grid, _vs("scipy"), 100.0)]
    return [
        Target("CPU: >=5x SciPy, one thread each (every grid case)", grid, _vs("scipy"), 5.0),
    ]
