"""log I_v(x) and log K_v(x): accuracy against mpmath (precomputed by
tests/gen_log_bessel_data.py), identities, the extreme domain, gradients, and the op contract."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastloss
from conftest import CUDA

DATA = os.path.join(os.path.dirname(__file__), "data", "log_bessel_mpmath.csv")
HESS_DATA = os.path.join(os.path.dirname(__file__), "data", "log_bessel_hess_mpmath.csv")
FUNCS = {"iv": fastloss.log_bessel_iv, "kv": fastloss.log_bessel_kv}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def load_reference(path=DATA):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in rows[0]}


REF = load_reference()
HESS_REF = load_reference(HESS_DATA)
HESS_OPS = {"iv": torch.ops.fastloss.log_bessel_iv_hess, "kv": torch.ops.fastloss.log_bessel_kv_hess}


def rel_error(got, ref):
    """Relative error, absolute where |ref| < 1 (the issue's metric); inf-vs-inf counts as 0."""
    got, ref = got.double().cpu(), ref.double().cpu()
    err = (got - ref).abs() / ref.abs().clamp(min=1.0)
    return torch.where(got == ref, torch.zeros_like(err), err)


def test_reference_data_covers_the_domain():
    assert len(REF["v"]) >= 300
    assert REF["v"].min() == 0 and REF["v"].max() > 5e3
    assert REF["x"].min() < 1e-9 and REF["x"].max() > 5e4


@pytest.mark.parametrize("name,column", [("iv", "log_i"), ("kv", "log_k")])
def test_float64_matches_mpmath(name, column, device):
    v, x = REF["v"].to(device), REF["x"].to(device)
    err = rel_error(FUNCS[name](v, x), REF[column])
    assert err.max().item() <= 1e-13, f"max error {err.max().item():.2e} at v={v[err.argmax()].item()}, x={x[err.argmax()].item()}"
    if name == "kv":  # K_(-v) = K_v
        assert rel_error(FUNCS[name](-v, x), REF[column]).max().item() <= 1e-13


@pytest.mark.parametrize("name", ["iv", "kv"])
def test_float32_matches_float64(name, device):
    # The float64 op is checked against mpmath above; float32 is compared with it at the
    # float32-rounded inputs (the rounding of the inputs is not the op's error).
    v32, x32 = REF["v"].float().to(device), REF["x"].float().to(device)
    ref = FUNCS[name](v32.double(), x32.double())
    got = FUNCS[name](v32, x32)
    assert got.dtype == torch.float32
    finite = torch.isfinite(ref)  # x < ~1e-38 rounds to 0 in float32
    assert torch.equal(torch.isfinite(got), finite)
    assert rel_error(got[finite], ref[finite]).max().item() <= 5e-6


@pytest.mark.parametrize(
    "name,column,tol",
    [("iv", "dlog_i_dx", 1e-12), ("iv", "dlog_i_dv", 1e-10), ("kv", "dlog_k_dx", 1e-12), ("kv", "dlog_k_dv", 1e-10)],
)
def test_gradients_match_mpmath(name, column, tol, device):
    v = REF["v"].clone().to(device).requires_grad_()
    x = REF["x"].clone().to(device).requires_grad_()
    FUNCS[name](v, x).sum().backward()
    got = (v.grad if column.endswith("dv") else x.grad).cpu()
    err = (got - REF[column]).abs() / REF[column].abs().clamp(min=1.0)
    assert err.max().item() <= tol, f"max error {err.max().item():.2e} at index {err.argmax().item()}"


@pytest.mark.parametrize(
    "name,v_range,x_range",
    [
        ("kv", (0.0, 16.0), (2.0, 29.0)),  # K_u by the trapezoidal rule (CPU) / CF2, then the recurrence
        ("kv", (0.0, 16.0), (1e-3, 2.0)),  # Temme's series, then the recurrence
        ("iv", (0.0, 16.0), (1e-3, 29.0)),  # the power series (lgamma in product form on the CPU)
    ],
)
def test_small_argument_methods_dense(name, v_range, x_range, device):
    # The committed data has few points per small-argument method; 200 more, against mpmath.
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    g = torch.Generator().manual_seed(4)
    v = torch.empty(400, dtype=torch.float64).uniform_(*v_range, generator=g)
    x = torch.empty(400, dtype=torch.float64).uniform_(*x_range, generator=g)
    keep = v.square() + x.square() < 29.0**2  # below the Debye region
    v, x = v[keep][:200], x[keep][:200]
    bessel = mp.besselk if name == "kv" else mp.besseli
    ref = torch.tensor([float(mp.log(bessel(a, b))) for a, b in zip(v.tolist(), x.tolist())], dtype=torch.float64)
    # CUDA's lgamma (4 ulps documented) and log round differently from the CPU's: the power
    # series' v log(x/2) - lgamma(v + 1) cancels terms up to ~43 to ~1, so allow a few more ulps.
    tol = 1e-14 if device == "cpu" else 5e-14
    assert rel_error(FUNCS[name](v.to(device), x.to(device)), ref).max().item() <= tol


def test_mixed_regions_match_one_region_at_a_time():
    # The CPU kernel groups the elements of a block by method and evaluates them in SIMD
    # packs; interleaved regions (partial packs, gathered lanes) give the same values as
    # inputs that each hold one region.
    g = torch.Generator().manual_seed(5)
    regions = [((0.0, 15.0), (0.05, 20.0)), ((0.0, 15.0), (1e-10, 1e-2)), ((16.0, 1e4), (1e-2, 1e4)),
               ((0.0, 15.0), (30.0, 1000.0)), ((0.0, 10.0), (1e3, 1e5)), ((0.0, 3.0), (1.5, 2.5))]
    vs, xs = [], []
    for (v_lo, v_hi), (x_lo, x_hi) in regions:
        vs.append(torch.empty(300, dtype=torch.float64).uniform_(v_lo, v_hi, generator=g))
        xs.append(torch.exp(torch.empty(300, dtype=torch.float64).uniform_(math.log(x_lo), math.log(x_hi), generator=g)))
    perm = torch.randperm(len(regions) * 300, generator=g)
    v_mixed, x_mixed = torch.cat(vs)[perm], torch.cat(xs)[perm]
    for name, fn in FUNCS.items():
        separate = torch.cat([fn(v, x) for v, x in zip(vs, xs)])[perm]
        assert rel_error(fn(v_mixed, x_mixed), separate).max().item() <= 2e-15


@pytest.mark.parametrize("lanes", [4, 8])
def test_reordered_packs_write_every_element(lanes):
    # K's list at 2 < x < 29 is reordered by expected length before it runs in packs. Here its
    # first pack takes elements whose first and last index differ by lanes - 1 but which are
    # not a consecutive run (indices [0, 1, 4, 3] for 4 lanes, [0 .. 5, 8, 7] for 8): element
    # 2 or 6 is in a later pack, and every element must get its own value.
    x = torch.full((256,), 5.0, dtype=torch.float64)  # length key floor(96 / x) = 19
    first, second, later = ([0, 1, 4], [3], [2]) if lanes == 4 else ([0, 1, 2, 3, 4, 5, 8], [7], [6])
    x[first], x[second], x[later] = 25.0, 15.0, 10.0  # keys 3, 6 and 9: ordered first
    v = torch.linspace(0.1, 0.4, 256, dtype=torch.float64)
    one_at_a_time = torch.cat([fastloss.log_bessel_kv(v[i : i + 1], x[i : i + 1]) for i in range(256)])
    assert torch.equal(fastloss.log_bessel_kv(v, x), one_at_a_time)


def test_pack_straddling_methods():
    # Packs of 4 (AVX2) run K_u by the trapezoidal rule up to x = 6 and by CF2 above; a block
    # whose CF2 elements do not fill their last pack shares it with trapezoid elements, and
    # that pack runs both methods, each lane keeping its own. Here 253 elements at x = 6.2 and
    # 3 at x = 5.9, at random positions; each must equal its value computed alone.
    g = torch.Generator().manual_seed(6)
    x = torch.full((256,), 6.2, dtype=torch.float64)
    x[torch.randperm(256, generator=g)[:3]] = 5.9
    v = torch.empty(256, dtype=torch.float64).uniform_(0.0, 3.0, generator=g)
    one_at_a_time = torch.cat([fastloss.log_bessel_kv(v[i : i + 1], x[i : i + 1]) for i in range(256)])
    assert rel_error(fastloss.log_bessel_kv(v, x), one_at_a_time).max().item() <= 1e-15


PATH_TESTS = (
    "float64_matches_mpmath or small_argument_methods or gradients_match or mixed_regions or reordered or straddling"
    " or subnormal or extreme_domain or gradcheck_every_region or gradients_broadcast or order_derivative"
)


@pytest.mark.parametrize("lanes", ["1", "4", "8", "8-avx2"])
def test_every_cpu_path_matches_mpmath(lanes):
    # The CPU runs the widest SIMD packs it has; FASTLOSS_LOG_BESSEL_LANES selects the others
    # in a fresh process: 1 = the scalar methods (the code the CUDA kernels compile), 4 = AVX2
    # packs, 8 = the AVX-512 unit's packs of 8 (compiled for AVX2 where AVX-512 is absent),
    # 8-avx2 = that AVX2 build on any AVX2 CPU (built at -O1: its rounding differs).
    # Each is checked against mpmath by the same tests.
    env = dict(os.environ, FASTLOSS_LOG_BESSEL_LANES=lanes)
    info = subprocess.run([sys.executable, "-m", "fastloss", "info"], env=env, capture_output=True, text=True, check=True)
    path = {"1": "scalar", "4": "packs of 4", "8": "packs of 8", "8-avx2": "packs of 8 (AVX2)"}[lanes]
    if path not in info.stdout:
        pytest.skip(f"this CPU or build has no {path}")
    if fastloss.build_info()["log_bessel_cpu"].startswith(path):
        pytest.skip(f"this process already runs the {path}")
    if lanes == "8" and "packs of 8 (AVX2)" in info.stdout:
        pytest.skip("the 8-avx2 case runs the packs of 8 on this CPU")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", f"({PATH_TESTS}) and not cuda"],
        env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_wronskian():
    # I_v K_(v+1) + I_(v+1) K_v = 1/x, checked in log space at random points of every region.
    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e4), generator=g))
    x = torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(math.log(1e-10), math.log(1e5), generator=g))
    iv, iv1 = fastloss.log_bessel_iv(v, x), fastloss.log_bessel_iv(v + 1, x)
    kv, kv1 = fastloss.log_bessel_kv(v, x), fastloss.log_bessel_kv(v + 1, x)
    log_w = torch.logaddexp(iv + kv1, iv1 + kv) + x.log()
    # Within 1e-12, plus the rounding of the logs themselves (|log I| reaches 1e5 here).
    rounding = 2 * torch.finfo(torch.float64).eps * (iv.abs() + kv1.abs() + iv1.abs() + kv.abs() + x.log().abs())
    assert (log_w.abs() - rounding).max().item() <= 1e-12


# Large orders near x = p0 v (p0 = 0.66274..., where Debye's eta vanishes and v eta = h - v asinh(v/x)
# cancels): (v, x, log I, log K) from Debye's expansion to 40 terms in mpmath at 60 digits (eta
# from sqrt and asinh at that precision; the same expansion agreed with the power series and
# with K's integral to 1e-40 at such points). Beyond the committed mpmath data's v <= 1e4.
NEAR_ETA_ROOT = [
    (900542.1824087743, 596833.5887445671, "1.517660326022259649123", "-16.10361616409579690256"),
    (595468.0672672777, 394639.4664464592, "-13.22764282342722638265", "-0.9446587420640959104222"),
    (20000.0, 13254.869712470472, "-5.959310651465564846075", "-4.819377833456766427614"),
    (20000.0, 13241.613518596649, "-29.96347221612057376228", "19.18508888566848278879"),
    (100000.0, 66274.34856235236, "-6.754431520180536711912", "-5.633694877018508744669"),
    (100000.0, 66208.06759298325, "-126.7758496334891208927", "114.3880283907603277036"),
    (300000.0, 198823.04568705708, "-7.279743982741474287843", "-6.206994703119851742224"),
    (300000.0, 198624.20277894972, "-367.3443034750912581226", "353.8578699437001848496"),
    (300000.0, 150000.0, "-97687.72642209672701293", "97674.31016538687095796"),
    (1000000.0, 662743.4856235236, "-7.797752844486130286827", "-6.892958645700468673701"),
    (1000000.0, 662080.6759298324, "-1208.013307165106669432", "1193.322900829390323288"),
    (1000000.0, 900000.0, "387553.9804811826975468", "-387568.7858023438606879"),
]


def test_extreme_domain_near_eta_root_matches_mpmath():
    # The SIMD packs once carried v eta in double-double here, 1.6e-13 off at v = 9e5.
    v = torch.tensor([p[0] for p in NEAR_ETA_ROOT], dtype=torch.float64)
    x = torch.tensor([p[1] for p in NEAR_ETA_ROOT], dtype=torch.float64)
    for name, column in (("iv", 2), ("kv", 3)):
        ref = torch.tensor([float(p[column]) for p in NEAR_ETA_ROOT], dtype=torch.float64)
        # one at a time too: a lane's neighbours must not matter
        for got in (FUNCS[name](v, x), torch.cat([FUNCS[name](v[i : i + 1], x[i : i + 1]) for i in range(len(v))])):
            assert (rel_error(got, ref)).max().item() <= 1e-15, name


def test_extreme_domain_is_finite():
    v = torch.tensor([0.0, 1e-300, 0.3, 1.0, 7.5, 15.99, 16.0, 100.0, 1e4, 1e6], dtype=torch.float64)
    x = torch.tensor([1e-300, 1e-200, 1e-30, 1e-5, 1.0, 30.0, 1e5, 1e30, 1e200, 1e300], dtype=torch.float64)
    vv, xx = torch.meshgrid(v, x, indexing="ij")
    for name in ("iv", "kv"):
        out = FUNCS[name](vv, xx)
        assert torch.isfinite(out).all(), f"{name}: non-finite at {(vv[~torch.isfinite(out)], xx[~torch.isfinite(out)])}"
        dv, dx = getattr(torch.ops.fastloss, f"log_bessel_{name}_grad")(vv, xx)
        assert torch.isfinite(dv).all() and torch.isfinite(dx).all()
    # Leading asymptotics: log I_v(x) ~ x - log(2 pi x)/2, log K_v(x) ~ -x + log(pi/(2x))/2.
    big = torch.tensor([1e300], dtype=torch.float64)
    assert fastloss.log_bessel_iv(2.0, big).item() == pytest.approx(1e300, rel=1e-15)
    assert fastloss.log_bessel_kv(2.0, big).item() == pytest.approx(-1e300, rel=1e-15)
    # log I_v(x) ~ v log(x/2) - lgamma(v+1) and log K_v(x) ~ lgamma(v) + v log(2/x) - log 2 at tiny x.
    tiny = torch.tensor([1e-300], dtype=torch.float64)
    expected_i = 1e6 * math.log(0.5e-300) - math.lgamma(1e6 + 1)
    assert fastloss.log_bessel_iv(1e6, tiny).item() == pytest.approx(expected_i, rel=1e-14)
    expected_k = math.lgamma(1e6) + 1e6 * math.log(2e300) - math.log(2)
    assert fastloss.log_bessel_kv(1e6, tiny).item() == pytest.approx(expected_k, rel=1e-14)


def test_extreme_domain_largest_arguments():
    # Where v and x both near DBL_MAX, hypot(v, x) overflows though log I and log K are finite
    # (they used to come out inf); and for v > 1e150 near x / v = 0.66, where v eta cancels,
    # the accurate forms must still serve (their squares overflow unscaled). At such h Debye's
    # series is 1 + O(1/h): log I = v eta - log(2 pi h) / 2, log K = log pi - that - v eta
    # exactly in double, with v eta = h - v asinh(v / x), d/dx = +-h / x, d/dv = -+asinh(v / x).
    mpmath = pytest.importorskip("mpmath")
    points = [(1.5e308, 1e308), (1.79e308, 1.2e308), (1.7e308, 1.7e308), (1e308, 1e308), (2e307, 1.3e308),
              (1e200, 0.66e200), (3e152, 2e152), (1e160, 0.6e160), (1e306, 0.7e306)]
    with mpmath.workdps(40):
        ref = []
        for v, x in points:
            v, x = mpmath.mpf(v), mpmath.mpf(x)
            h = mpmath.sqrt(v * v + x * x)
            v_eta = h - v * mpmath.asinh(v / x)
            half_log = mpmath.log(2 * mpmath.pi * h) / 2
            ref.append([float(v_eta - half_log), float(mpmath.log(mpmath.pi) - half_log - v_eta),
                        float(h / x), float(mpmath.asinh(v / x))])
    ref = torch.tensor(ref, dtype=torch.float64)
    v = torch.tensor([p[0] for p in points], dtype=torch.float64)
    x = torch.tensor([p[1] for p in points], dtype=torch.float64)
    for name, sign, col in (("iv", 1.0, 0), ("kv", -1.0, 1)):
        got = FUNCS[name](v, x)
        assert torch.isfinite(got).all(), f"{name}: {got}"
        assert rel_error(got, ref[:, col]).max().item() <= 2e-15, name
        dv, dx = getattr(torch.ops.fastloss, f"log_bessel_{name}_grad")(v, x)
        assert rel_error(dx, sign * ref[:, 2]).max().item() <= 2e-15, name
        assert rel_error(dv, -sign * ref[:, 3]).max().item() <= 2e-15, name


def test_order_derivative_at_huge_x_with_small_order():
    # Hankel's region (4 v^2 <= x) beyond x ~ 1e205: d/dv log I = -(v / x)(1 + O(1 / x)) came
    # out 0 there (its series' d/dv, ~ v / x, was divided by sqrt(x) before the log and
    # underflowed). Leading orders: d/dv log I = -asinh(v / x) - v / (2 h^2) = -d/dv log K.
    mpmath = pytest.importorskip("mpmath")
    points = [(0.5, 1e206), (3.0, 1e211), (5.0, 1e250), (0.5, 1e300), (1e3, 1e307), (1e150, 1e307), (1e60, 1e220)]
    with mpmath.workdps(40):
        ref = [float(-mpmath.asinh(mpmath.mpf(v) / x) - mpmath.mpf(v) / (2 * (mpmath.mpf(v) ** 2 + mpmath.mpf(x) ** 2)))
               for v, x in points]
    ref = torch.tensor(ref, dtype=torch.float64)
    v = torch.tensor([p[0] for p in points], dtype=torch.float64)
    x = torch.tensor([p[1] for p in points], dtype=torch.float64)
    for name, sign in (("iv", 1.0), ("kv", -1.0)):
        dv, dx = getattr(torch.ops.fastloss, f"log_bessel_{name}_grad")(v, x)
        assert rel_error(dv, sign * ref).max().item() <= 4e-16, (name, dv)
        assert (dx == sign).all(), name
        vr = v.clone().requires_grad_()
        (dv_autograd,) = torch.autograd.grad(FUNCS[name](vr, x).sum(), vr)
        assert torch.equal(dv_autograd, dv), name


def test_order_derivative_of_k_at_tiny_order():
    # d/dv log K_v(x) is odd in v, ~ v d^2/dv^2 log K_0(x): Temme's series and the trapezoidal
    # rule (CPU packs, 2 < x < 29) carried p, q and e^(+-u t) apart, whose O(1) derivatives
    # cancel, so the result had an absolute error ~1e-16 (relative 2e-4 at v = 1e-12, x = 3).
    mpmath = pytest.importorskip("mpmath")
    vs = [1e-12, -3e-10, 1e-8, 1e-4]
    xs = [1e-5, 0.3, 1.0, 2.0, 2.5, 3.0, 5.0, 10.0, 28.0]
    with mpmath.workdps(50):
        ref = torch.tensor([[float(mpmath.diff(lambda t: mpmath.log(mpmath.besselk(t, x)), mpmath.mpf(v))) for x in xs]
                            for v in vs], dtype=torch.float64)
    v = torch.tensor(vs, dtype=torch.float64)[:, None].expand(len(vs), len(xs)).contiguous()
    x = torch.tensor(xs, dtype=torch.float64).expand(len(vs), len(xs)).contiguous()
    dv, _ = torch.ops.fastloss.log_bessel_kv_grad(v, x)
    assert rel_error(dv, ref).max().item() <= 2e-14, (dv / ref - 1)
    # The second derivative in v and x is odd in v too (Temme's second-derivative form).
    pts = [(1e-12, 1.0), (1e-12, 0.3), (-1e-9, 1.9), (1e-10, 2.5)]
    with mpmath.workdps(50):
        ref_vx = torch.tensor([float(mpmath.diff(lambda a, b: mpmath.log(mpmath.besselk(a, b)), (mpmath.mpf(a), mpmath.mpf(b)),
                                                 (1, 1))) for a, b in pts], dtype=torch.float64)
    _, d_vx, _ = torch.ops.fastloss.log_bessel_kv_hess(torch.tensor([p[0] for p in pts], dtype=torch.float64),
                                                       torch.tensor([p[1] for p in pts], dtype=torch.float64))
    assert rel_error(d_vx, ref_vx).max().item() <= 2e-14, (d_vx / ref_vx - 1)


def test_subnormal_x():
    # Below the 1e-300: values and d/dv stay finite; d/dx is +-inf where v/x overflows, never NaN.
    # Orders just above a half-integer (u near -1/2) make Temme's exp(u log(2/x)) ~ 1e-159 for K.
    v = torch.tensor([0.0, 0.3, 0.5, 0.51, 7.51, 20.0, 1e6], dtype=torch.float64)[:, None]
    x = torch.tensor([5e-324, 1e-310], dtype=torch.float64)
    for name in ("iv", "kv"):
        assert torch.isfinite(FUNCS[name](v, x)).all()
        dv, dx = getattr(torch.ops.fastloss, f"log_bessel_{name}_grad")(v, x)
        assert torch.isfinite(dv).all() and not dx.isnan().any()
    # d/dx log I_v(x) = v/x + x/(2(v+1)) + ...: finite where v/x is, though 1/x is not.
    _, dx = torch.ops.fastloss.log_bessel_iv_grad(torch.tensor([1e-300], dtype=torch.float64), torch.tensor([1e-310], dtype=torch.float64))
    assert dx.item() == pytest.approx(1e10, rel=1e-14)


def test_subnormal_x_values():
    # At subnormal x the leading terms are exact to double precision for v >= 0.05:
    # log I_v(x) = v log(x/2) - lgamma(v + 1), log K_v(x) = lgamma(v) + v log(2/x) - log 2.
    # Half-integer orders are the hard case for K: there the recurrence starts from u = -1/2,
    # whose ratio (x/2) K_(1/2) / K_(-1/2) = x/2 is itself subnormal.
    v = torch.cat([torch.linspace(0.05, 15.95, 160, dtype=torch.float64), torch.arange(0.5, 16.0, 1.0, dtype=torch.float64)])
    for x_value in (1e-310, 1e-320, 5e-324):
        x = torch.full_like(v, x_value)
        log_half_x = math.log(x_value) - math.log(2.0)
        expected_i = torch.tensor([a * log_half_x - math.lgamma(a + 1) for a in v.tolist()], dtype=torch.float64)
        expected_k = torch.tensor([math.lgamma(a) - a * log_half_x - math.log(2.0) for a in v.tolist()], dtype=torch.float64)
        assert rel_error(fastloss.log_bessel_iv(v, x), expected_i).max().item() <= 1e-15
        assert rel_error(fastloss.log_bessel_kv(v, x), expected_k).max().item() <= 1e-15


def test_special_values():
    inf, nan = math.inf, math.nan
    x = torch.tensor([0.0, inf, -1.0, nan, 1.0], dtype=torch.float64)
    def check(out, expected):
        for o, e in zip(out.tolist(), expected):
            assert (math.isnan(o) and math.isnan(e)) or o == e or (not math.isinf(e) and abs(o - e) < 1e-15), (out, expected)
    check(fastloss.log_bessel_iv(0.0, x), [0.0, inf, nan, nan, math.log(1.2660658777520082)])
    check(fastloss.log_bessel_iv(2.5, x)[:4], [-inf, inf, nan, nan])
    check(fastloss.log_bessel_iv(-0.5, x), [nan] * 5)
    check(fastloss.log_bessel_iv(nan, x), [nan] * 5)
    check(fastloss.log_bessel_kv(-2.5, x)[:4], [inf, -inf, nan, nan])
    check(fastloss.log_bessel_kv(nan, x), [nan] * 5)
    check(fastloss.log_bessel_kv(inf, torch.tensor([1.0], dtype=torch.float64)), [inf])
    check(fastloss.log_bessel_iv(inf, torch.tensor([1.0], dtype=torch.float64)), [-inf])


# One point per method (see csrc/common/log_bessel.h), and the region edges.
REGION_POINTS = {
    "series": (2.3, 5.0),
    "series-v0": (0.0, 3.0),
    "temme": (0.7, 0.5),
    "temme-tiny-x": (3.2, 1e-8),
    "cf2-recurrence": (3.7, 5.0),
    "debye-large-v": (50.0, 20.0),
    "debye-large-hypot": (5.0, 100.0),
    "debye-tiny-x": (40.0, 1e-6),
    "hankel": (3.0, 2000.0),
    "edge-v16": (16.0, 3.0),
    "edge-x2": (1.4, 2.0),
}


@pytest.mark.parametrize("name", ["iv", "kv"])
@pytest.mark.parametrize("region", list(REGION_POINTS))
def test_gradcheck_every_region(name, region, device):
    v0, x0 = REGION_POINTS[region]
    if name == "iv" and v0 == 0:
        v0 = 1e-3  # I is defined for v >= 0 only: no two-sided difference at 0
    # Small perturbations keep the points inside their region. x enters through log x, so the
    # finite differences stay positive at tiny x (and check x * d/dx).
    v = torch.tensor([v0, v0 * 1.01 + 1e-3, v0 * 0.99 + 2e-3], dtype=torch.float64, device=device).requires_grad_()
    log_x = torch.tensor([x0, x0 * 1.001, x0 * 0.999], dtype=torch.float64, device=device).log().requires_grad_()
    fn = FUNCS[name]
    assert torch.autograd.gradcheck(lambda v, log_x: fn(v, log_x.exp()), (v, log_x))
    if name == "kv":
        assert torch.autograd.gradcheck(lambda v, log_x: fn(-v, log_x.exp()), (v, log_x))


def test_gradients_match_mpmath_at_small_orders():
    # d/dv log K_v(x) is odd in v and ~ v near 0, where Temme's u pi / sin(u pi) and
    # sinh(s) / s must not be differentiated as quotients (their derivatives cancel: 4e-13
    # absolute at v ~ 0.004 when they were). K's d/dv at small |v| against mpmath, absolute.
    mpmath = pytest.importorskip("mpmath")
    g = torch.Generator().manual_seed(7)
    n = 12
    v = torch.empty(n, dtype=torch.float64).uniform_(1e-3, 1e-2, generator=g) * torch.tensor([1.0, -1.0]).repeat(n // 2)
    x = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-20), math.log(2.0), generator=g))
    dv, _ = torch.ops.fastloss.log_bessel_kv_grad(v, x)
    with mpmath.workdps(40):
        ref = [float(mpmath.diff(lambda t: mpmath.log(mpmath.besselk(t, mpmath.mpf(b))), mpmath.mpf(a))) for a, b in zip(v.tolist(), x.tolist())]
    err = (dv - torch.tensor(ref, dtype=torch.float64)).abs().max().item()
    assert err <= 1e-14, f"max absolute error {err:.2e}"


def test_k_gradients_match_mpmath_where_temme_meets_cf2():
    # Temme's series loses digits in its derivatives as x nears 2 (its K_(u+1) sum cancels):
    # d/dv and d/dx of log K were up to 1e-14 off there; from x = 1 the gradients take CF2
    # (the CPU's packs: the trapezoidal rule) instead.
    mpmath = pytest.importorskip("mpmath")
    g = torch.Generator().manual_seed(11)
    v = torch.empty(60, dtype=torch.float64).uniform_(0.0, 16.0, generator=g)
    x = torch.empty(60, dtype=torch.float64).uniform_(0.8, 2.2, generator=g)
    dv, dx = torch.ops.fastloss.log_bessel_kv_grad(v, x)
    with mpmath.workdps(40):
        def log_k(a, b):
            return mpmath.log(mpmath.besselk(a, b))

        ref_dv = [float(mpmath.diff(lambda t: log_k(t, mpmath.mpf(b)), mpmath.mpf(a))) for a, b in zip(v.tolist(), x.tolist())]
        ref_dx = [float(mpmath.diff(lambda t: log_k(mpmath.mpf(a), t), mpmath.mpf(b))) for a, b in zip(v.tolist(), x.tolist())]
    for got, ref in ((dv, ref_dv), (dx, ref_dx)):
        ref = torch.tensor(ref, dtype=torch.float64)
        err = (got - ref).abs() / ref.abs().clamp(min=1.0)
        assert err.max().item() <= 1.5e-15, f"max error {err.max().item():.2e} at v={v[err.argmax()].item()}, x={x[err.argmax()].item()}"
    # The second derivatives too (Temme's were up to 2.4e-14 off in [1.5, 2)).
    v, x = v[:30], 1.5 + (x[:30] - 0.8) * (0.5 / 1.4)  # [1.5, 2)
    hess = torch.ops.fastloss.log_bessel_kv_hess(v, x)
    with mpmath.workdps(40):
        ref = [[float(mpmath.diff(log_k, (mpmath.mpf(a), mpmath.mpf(b)), order)) for a, b in zip(v.tolist(), x.tolist())]
               for order in ((2, 0), (1, 1), (0, 2))]
    for got, want, tol in zip(hess, ref, (1.6e-14, 5e-15, 2e-15)):
        want = torch.tensor(want, dtype=torch.float64)
        err = (got - want).abs() / want.abs().clamp(min=1.0)
        assert err.max().item() <= tol, f"max error {err.max().item():.2e} at v={v[err.argmax()].item()}, x={x[err.argmax()].item()}"


def test_gradients_broadcast():
    v = torch.tensor([[0.5], [3.0], [30.0]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastloss.log_bessel_iv, (v, x))
    assert torch.autograd.gradcheck(fastloss.log_bessel_kv, (v, x))
    assert torch.autograd.gradcheck(lambda x: fastloss.log_bessel_kv(2.5, x), (x,))


def test_x_gradient_is_the_bessel_ratio_at_large_x():
    # d/dx log I_v(x) = v/x + I_(v+1)/I_v -> 1 - 1/(2x) + ...; a difference of logs ~1e6 could not resolve it.
    x = torch.tensor([1e6], dtype=torch.float64, requires_grad=True)
    fastloss.log_bessel_iv(0.0, x).backward()
    expected = 1 - 1 / (2e6) - 1 / (8e12)  # Hankel: I_1/I_0 = 1 - 1/(2x) - 1/(8x^2) - ...
    assert x.grad.item() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_noncontiguous(dtype, device):
    g = torch.Generator().manual_seed(1)
    v = (torch.rand(6, 8, generator=g, dtype=torch.float64) * 20).to(device=device, dtype=dtype)
    x = (torch.rand(8, 6, generator=g, dtype=torch.float64) * 50 + 0.1).to(device=device, dtype=dtype).t()
    assert not x.is_contiguous()
    for name, fn in FUNCS.items():
        out = fn(v, x)
        assert out.dtype == dtype and out.shape == (6, 8) and out.device.type == device
        ref = fn(v.double(), x.double())
        tol = {torch.float32: 5e-6, torch.float64: 1e-15}.get(dtype, 2 * torch.finfo(dtype).eps)
        assert rel_error(out, ref).max().item() <= tol


def test_broadcasting_and_numbers():
    x = torch.linspace(0.1, 10, 7, dtype=torch.float64)
    v = torch.tensor([[0.0], [1.5]], dtype=torch.float64)
    out = fastloss.log_bessel_iv(v, x)
    assert out.shape == (2, 7)
    assert torch.equal(out[1], fastloss.log_bessel_iv(1.5, x))
    assert torch.equal(fastloss.log_bessel_kv(x, 2.0), fastloss.log_bessel_kv(x, torch.full_like(x, 2.0)))
    assert fastloss.log_bessel_iv(1, 2).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_one_element_operands_are_read_in_place(dtype):
    # A one-element v or x is read for every entry rather than copied out to the full shape
    # (on CPU): the same bits as the full tensor, over several blocks and threads.
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(3, 2000, generator=g, dtype=torch.float64) * 60).to(dtype)
    ops = torch.ops.fastloss
    for op in (ops.log_bessel_iv, ops.log_bessel_kv, ops.log_bessel_iv_grad, ops.log_bessel_kv_grad,
               ops.log_bessel_iv_hess, ops.log_bessel_kv_hess):
        for one in (torch.tensor(2.5, dtype=dtype), torch.full((1, 1), 17.0, dtype=dtype)):
            for args, full in (((one, x), (one.expand_as(x).contiguous(), x)),
                               ((x, one), (x, one.expand_as(x).contiguous()))):
                got, expected = op(*args), op(*full)
                for a, b in zip(got if isinstance(got, tuple) else (got,),
                                expected if isinstance(expected, tuple) else (expected,)):
                    assert a.shape == b.shape and torch.equal(a, b), op


def test_integer_inputs_promote_like_torch_special():
    xi = torch.arange(1, 6)
    out = fastloss.log_bessel_iv(0, xi)
    assert out.dtype == torch.special.i0e(xi).dtype == torch.get_default_dtype()
    torch.testing.assert_close(out.double(), torch.special.i0e(xi.double()).log() + xi, rtol=1e-6, atol=1e-6)
    assert fastloss.log_bessel_kv(torch.tensor([1, 2]), torch.tensor([1.0], dtype=torch.float64)).dtype == torch.float64
    # numpy scalars are numbers, as in torch.special (they were refused).
    x = torch.rand(4, dtype=torch.float32) + 0.5
    for v in (np.int64(2), np.float32(2.5), np.float64(2.5)):
        out = fastloss.log_bessel_iv(v, x)
        assert out.dtype == torch.special.xlog1py(v, x).dtype == torch.float32
        assert torch.equal(out, fastloss.log_bessel_iv(float(v), x))
    assert torch.equal(fastloss.log_bessel_kv(x, np.float64(3.0)), fastloss.log_bessel_kv(x, 3.0))


def test_matches_torch_special_orders_0_and_1():
    x = torch.exp(torch.linspace(math.log(1e-5), math.log(700), 200, dtype=torch.float64))
    torch.testing.assert_close(fastloss.log_bessel_iv(0, x), torch.special.i0e(x).log() + x, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(fastloss.log_bessel_iv(1, x), torch.special.i1e(x).log() + x, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(fastloss.log_bessel_kv(0, x), torch.special.scaled_modified_bessel_k0(x).log() - x, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(fastloss.log_bessel_kv(1, x), torch.special.scaled_modified_bessel_k1(x).log() - x, rtol=1e-13, atol=1e-14)


def test_errors():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="same device"):
        fastloss.log_bessel_iv(torch.ones(3), torch.ones(3, device="meta"))
    with pytest.raises(TypeError, match="'v'"):
        fastloss.log_bessel_iv("1", x)
    with pytest.raises(TypeError, match="real"):
        fastloss.log_bessel_kv(torch.ones(3, dtype=torch.complex64), x)
    with pytest.raises(RuntimeError, match="broadcast"):
        fastloss.log_bessel_iv(torch.ones(2), torch.ones(3))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.fastloss.log_bessel_iv(torch.ones(3, dtype=torch.float64), x)
    with pytest.raises(RuntimeError, match="float32, float64"):
        torch.ops.fastloss.log_bessel_kv(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))


def test_empty(device):
    e = torch.empty(0, 3, dtype=torch.float64, device=device)
    for fn in FUNCS.values():
        assert fn(e, 1.0).shape == (0, 3)
    v = e.clone().requires_grad_()
    fastloss.log_bessel_kv(v, 2.0).sum().backward()
    assert v.grad.shape == (0, 3)


@pytest.mark.parametrize("name", ["log_bessel_iv", "log_bessel_kv"])
def test_opcheck(name, device):
    op = getattr(torch.ops.fastloss, name).default
    v = (torch.rand(4, 1, dtype=torch.float64, device=device) * 5).requires_grad_()
    x = (torch.rand(5, dtype=torch.float64, device=device) * 10 + 0.1).requires_grad_()
    torch.library.opcheck(op, (v, x))
    torch.library.opcheck(getattr(torch.ops.fastloss, f"{name}_grad").default, (v.detach(), x.detach()))


def test_torch_compile_fullgraph(device):
    def f(v, x):
        return fastloss.log_bessel_iv(v, x) - fastloss.log_bessel_kv(v, x)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    v = torch.rand(8, dtype=torch.float64, device=device) * 10
    x = (torch.rand(8, dtype=torch.float64, device=device) * 10 + 0.1).requires_grad_()
    out = compiled(v, x)
    torch.testing.assert_close(out, f(v, x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_matches_cpu_memcheck():
    g = torch.Generator().manual_seed(3)
    v = torch.exp(torch.empty(5000, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e6), generator=g))
    x = torch.exp(torch.empty(5000, dtype=torch.float64).uniform_(math.log(1e-300), math.log(1e300), generator=g))
    for name in ("iv", "kv"):
        cpu = FUNCS[name](v, x)
        cuda = FUNCS[name](v.cuda(), x.cuda()).cpu()
        # Both are held to 1e-13 of mpmath above; CUDA's libm (lgamma within 4 ulp, glibc's ~1)
        # rounds differently, ~1e-14 absolute where the series' terms of ~30 cancel to ~1.
        assert rel_error(cuda, cpu).max().item() <= 1e-13
        gc = getattr(torch.ops.fastloss, f"log_bessel_{name}_grad")(v.cuda(), x.cuda())
        gh = getattr(torch.ops.fastloss, f"log_bessel_{name}_grad")(v, x)
        for a, b in zip(gc, gh):
            assert rel_error(a, b).max().item() <= 1e-12
        # Second derivatives: the same scalar code; each entry against the point's largest.
        hc = [t.cpu() for t in HESS_OPS[name](v.cuda(), x.cuda())]
        hh = HESS_OPS[name](v, x)
        ok = torch.stack([torch.isfinite(t) for t in hh]).all(0)
        scale = torch.stack([t[ok].abs() for t in hh]).amax(0).clamp_min(torch.finfo(torch.float64).tiny)
        for a, b in zip(hc, hh):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            assert ((a[ok] - b[ok]).abs() / scale).max().item() <= 1e-11


# ---- second derivatives -------------------------------------------------------------------


def hessian_entries(name, v, x):
    """(d^2/dv^2, d^2/dv dx, d^2/dx^2) of log I or log K."""
    return HESS_OPS[name](v, x)


@pytest.mark.parametrize("name,column", [("iv", "d2log_i"), ("kv", "d2log_k")])
def test_second_derivatives_match_mpmath(name, column, device):
    # Against 40-digit mpmath values at random log-uniform points and the region boundaries.
    # Each entry within 5e-13 of the Hessian's largest entry at its point (the v-x entry can
    # be ~0 next to diagonal entries of ~0.03); the diagonal entries relative to themselves.
    v, x = HESS_REF["v"].to(device), HESS_REF["x"].to(device)
    refs = [HESS_REF[f"{column}_{part}"] for part in ("dv2", "dvdx", "dx2")]
    scale = torch.stack(refs).abs().amax(0)
    for part, got, ref in zip(("vv", "vx", "xx"), hessian_entries(name, v, x), refs):
        err = (got.cpu() - ref).abs()
        assert (err / scale).max().item() <= 5e-13, f"{part}: {(err / scale).max().item():.2e} at {err.argmax().item()}"
        if part != "vx":
            assert (err / ref.abs()).max().item() <= 5e-12, f"{part}: relative {(err / ref.abs()).max().item():.2e}"


@pytest.mark.parametrize("name", ["iv", "kv"])
@pytest.mark.parametrize("region", list(REGION_POINTS))
def test_second_derivatives_gradgradcheck_per_method(name, region, device):
    v0, x0 = REGION_POINTS[region]
    if name == "iv" and v0 == 0:
        v0 = 1e-3
    v = torch.tensor([v0, v0 * 1.01 + 1e-3], dtype=torch.float64, device=device).requires_grad_()
    log_x = torch.tensor([x0, x0 * 1.001], dtype=torch.float64, device=device).log().requires_grad_()
    fn = FUNCS[name]
    assert torch.autograd.gradgradcheck(lambda v, log_x: fn(v, log_x.exp()), (v, log_x))
    if name == "kv":
        assert torch.autograd.gradgradcheck(lambda v, log_x: fn(-v, log_x.exp()), (v, log_x))


def test_second_derivatives_broadcast_and_numbers():
    v = torch.tensor([[0.5], [3.0], [30.0]], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=torch.float64, requires_grad=True)
    for fn in FUNCS.values():
        assert torch.autograd.gradgradcheck(fn, (v, x))
        assert torch.autograd.gradgradcheck(lambda x: fn(2.5, x), (x,))


@pytest.mark.parametrize("name", ["iv", "kv"])
def test_hessian_by_every_route(name, device):
    # Eager double backward, torch.func.hessian (forward over reverse), jacrev of jacrev, and
    # forward-AD tangents of the gradient: all give the second-derivative op's entries.
    from torch.func import hessian, jacfwd, jacrev

    g = torch.Generator().manual_seed(12)
    v = (torch.rand(6, generator=g, dtype=torch.float64) * 40).to(device)
    x = (torch.rand(6, generator=g, dtype=torch.float64) * 60 + 0.05).to(device)
    d_vv, d_vx, d_xx = hessian_entries(name, v, x)
    fn = FUNCS[name]

    vr, xr = v.clone().requires_grad_(), x.clone().requires_grad_()
    gv, gx = torch.autograd.grad(fn(vr, xr).sum(), (vr, xr), create_graph=True)
    assert torch.equal(torch.autograd.grad(gv.sum(), vr, retain_graph=True)[0], d_vv)
    assert torch.equal(torch.autograd.grad(gv.sum(), xr, retain_graph=True)[0], d_vx)
    assert torch.equal(torch.autograd.grad(gx.sum(), vr, retain_graph=True)[0], d_vx)
    assert torch.equal(torch.autograd.grad(gx.sum(), xr)[0], d_xx)

    expected = torch.stack([torch.stack([d_vv, d_vx], -1), torch.stack([d_vx, d_xx], -1)], -2)
    point = lambda p: fn(p[0], p[1])  # noqa: E731
    for route in (hessian(point), jacrev(jacrev(point)), jacfwd(jacrev(point)), jacrev(jacfwd(point))):
        got = torch.stack([route(torch.stack([a, b])) for a, b in zip(v, x)])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got = torch.func.vmap(hessian(point))(torch.stack([v, x], -1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["iv", "kv"])
def test_third_derivative_is_refused(name, device):
    v = torch.tensor([0.3, 2.5], dtype=torch.float64, device=device, requires_grad=True)
    x = torch.tensor([1.7, 40.0], dtype=torch.float64, device=device, requires_grad=True)
    fn = FUNCS[name]
    (gx,) = torch.autograd.grad(fn(v, x).sum(), x, create_graph=True)
    (hxx,) = torch.autograd.grad(gx.sum(), x, create_graph=True)
    torch.testing.assert_close(hxx, hessian_entries(name, v.detach(), x.detach())[2], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="third derivative"):
        torch.autograd.grad(hxx.sum(), x)
    point = lambda p: fn(p[0], p[1])  # noqa: E731
    with pytest.raises(NotImplementedError, match="third derivative"):
        torch.func.jacrev(torch.func.hessian(point))(torch.tensor([2.5, 40.0], dtype=torch.float64, device=device))


def test_second_derivatives_float32_and_half(device):
    # Computed in double and rounded: float32 within its rounding of the float64 result at the
    # same (float32-rounded) inputs; float16 / bfloat16 go through float32.
    v32, x32 = HESS_REF["v"].float().to(device), HESS_REF["x"].float().to(device)
    keep = x32 > 1e-30  # d^2/dx^2 ~ v / x^2 overflows float32 below
    for name in ("iv", "kv"):
        ref = hessian_entries(name, v32.double(), x32.double())
        for got, r in zip(hessian_entries(name, v32, x32), ref):
            assert got.dtype == torch.float32
            finite = keep & torch.isfinite(r.float())
            assert ((got[finite].double() - r[finite]).abs() / r[finite].abs().clamp_min(1e-30)).max().item() <= 2 ** -23
        half = hessian_entries(name, v32[:20].half(), x32[:20].clamp(0.1, 100).half())
        assert all(t.dtype == torch.float16 for t in half)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transform", [False, True, "jvp"])
def test_half_gradient_is_rounded_once(device, dtype, transform):
    # d/dx log I_10 at x = 1e-4 is ~v / x = 1e5, beyond float16's range; times an output
    # gradient of 0.01 it is 1e3. The derivative was rounded to float16 first: inf.
    v = torch.tensor([10.0, 0.0, 3.5], dtype=dtype, device=device, requires_grad=True)
    x = torch.tensor([1e-4, 3.0, 2e-4], dtype=dtype, device=device, requires_grad=True)
    upstream = torch.full((3,), 0.01, dtype=dtype, device=device)
    for fn in (fastloss.log_bessel_iv, fastloss.log_bessel_kv):
        if transform == "jvp":  # forward mode: the tangents of v and x one at a time
            zero = torch.zeros_like(upstream)
            grads = (torch.func.jvp(fn, (v, x), (upstream, zero))[1], torch.func.jvp(fn, (v, x), (zero, upstream))[1])
        elif transform:
            grads = torch.func.vjp(fn, v, x)[1](upstream)
        else:
            grads = torch.autograd.grad(fn(v, x), (v, x), upstream)
        v64, x64 = (t.detach().double().requires_grad_() for t in (v, x))
        refs = torch.autograd.grad(fn(v64, x64), (v64, x64), upstream.double())
        for got, ref in zip(grads, refs):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), ref, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_second_derivative_limits_and_special_values():
    inf, nan = math.inf, math.nan
    x = torch.tensor([0.0, inf, -1.0, nan], dtype=torch.float64)

    def entries(name, v):
        return [t.tolist() for t in hessian_entries(name, torch.full_like(x, v), x)]
    # x -> 0: log I_v = v log(x/2) - lgamma(v + 1) + O(x^2) (d_vv = -psi'(v + 1); log I_0 = x^2/4 + ...),
    # log K_v = lgamma(v) + v log(2/x) - log 2 + o(1) (d_vv = psi'(v)); x -> inf: all vanish.
    trigamma_3_5 = 0.3303577561002349  # psi'(3.5)
    got = entries("iv", 2.5)
    assert got[0][0] == pytest.approx(-trigamma_3_5, rel=1e-15) and got[1][0] == inf and got[2][0] == -inf
    assert [row[1] for row in got] == [0.0, 0.0, 0.0] and all(math.isnan(row[k]) for row in got for k in (2, 3))
    got = entries("iv", 0.0)
    assert got[0][0] == pytest.approx(-math.pi**2 / 6, rel=1e-15) and got[2][0] == 0.5
    got = entries("kv", -2.5)
    assert got[0][0] == pytest.approx(0.4903577561002349, rel=1e-15)  # psi'(2.5)
    assert got[1][0] == inf and got[2][0] == inf  # d_vx odd in v: +inf at v < 0
    assert entries("kv", 0.0)[1][0] == 0.0 and entries("kv", 0.0)[0][0] == inf
    for name in ("iv", "kv"):
        assert all(math.isnan(t) for t in sum(entries(name, nan), []))
    assert all(math.isnan(t) for t in sum(entries("iv", -0.5), []))


def test_second_derivatives_never_nan_at_extremes():
    # Where the true entries exceed DBL_MAX (d^2/dx^2 ~ -+v / x^2, d^2/dv dx ~ +-1 / x at tiny x)
    # they are infinite; never NaN where log I and log K are finite, down to subnormal x and up
    # to v, x ~ DBL_MAX.
    v = torch.tensor([0.0, 1e-300, 0.3, 1.0, 7.5, 15.99, 16.0, 20.0, 100.0, 1e4, 1e6, 1e200, 1.5e308], dtype=torch.float64)
    x = torch.tensor([5e-324, 1e-310, 1e-300, 1e-200, 1e-30, 1e-5, 1.0, 30.0, 1e5, 1e30, 1e200, 1e300, 1.7e308],
                     dtype=torch.float64)
    vv, xx = torch.meshgrid(v, x, indexing="ij")
    for name in ("iv", "kv"):
        finite = torch.isfinite(FUNCS[name](vv, xx))
        assert finite.float().mean() > 0.9  # v = 1.5e308: log I, log K overflow but at x ~ v
        for part, t in zip(("vv", "vx", "xx"), hessian_entries(name, vv[finite], xx[finite])):
            vv_f, xx_f = vv[finite], xx[finite]
            assert not t.isnan().any(), f"{name} {part}: NaN at {(vv_f[t.isnan()], xx_f[t.isnan()])}"
        # Where 1/x and v/x^2 are finite, so is every entry.
        moderate = (xx >= 1e-150) & (vv <= 1e6)
        for t in hessian_entries(name, vv[moderate], xx[moderate]):
            assert torch.isfinite(t).all()


def test_k_second_derivatives_at_tiny_x():
    # log K_v(x) = lgamma(v) + v log(2/x) - log 2 + O(x^2 / (v - 1)) for v > 1: d_vv = psi'(v),
    # d_vx = -1/x, d_xx = v / x^2. Temme's series carries (2/x)^u = e^(u log(2/x)) in its
    # terms, and d^2/dv^2 of their log would cancel terms of size log(2/x)^2 (1e-9 at 1e-300).
    mpmath = pytest.importorskip("mpmath")
    g = torch.Generator().manual_seed(14)
    v = torch.empty(24, dtype=torch.float64).uniform_(1.2, 15.8, generator=g)
    # and orders at and near integers (u ~ 0) and half-integers, where the start's scale is smallest
    v = torch.cat([v, torch.tensor([2.0, 3.0001, 2.9995, 8.0003, 9.0, 4.5, 12.4999999], dtype=torch.float64)])
    for x_value in (1e-10, 1e-30, 1e-100, 1e-300):
        x = torch.full_like(v, x_value)
        d_vv, d_vx, d_xx = hessian_entries("kv", v, x)
        expected = torch.tensor([float(mpmath.psi(1, a)) for a in v.tolist()], dtype=torch.float64)
        tol = 2e-13 if x_value < 1e-20 else 1e-11  # at 1e-10 the limit itself is off by O(x^2 log(x)^2)
        assert ((d_vv - expected).abs() / expected).max().item() <= tol, x_value
        torch.testing.assert_close(d_vx, -1 / x, rtol=1e-14, atol=0)
        torch.testing.assert_close(d_xx, v / x / x, rtol=1e-14, atol=0)
        # and the same for negative v (d_vx odd)
        torch.testing.assert_close(hessian_entries("kv", -v, x)[1], 1 / x, rtol=1e-14, atol=0)
    # K is even in v: d_vx vanishes at v = 0, exactly (not a rounding of log(2/x) divided by x).
    x = torch.tensor([1e-300, 1e-100, 1e-10, 1e-3, 0.5, 1.9, 2.0], dtype=torch.float64)
    assert torch.equal(hessian_entries("kv", torch.zeros_like(x), x)[1], torch.zeros_like(x))


def test_second_derivatives_at_huge_arguments():
    # For hypot(v, x) = h >= 1e150 Debye's series is 1 + O(1/h) and log I = v eta - log(2 pi h)/2
    # (log K: minus v eta): d_vv = -1/h, d_vx = v / (x h), d_xx = -(v/x)^2 / h for I, negated for
    # K, up to O(1/h^2). Second-order parts such as -1/x^2 underflow there unless the tangents
    # are scaled (they were, for h > ~1e155, wrong in sign).
    g = torch.Generator().manual_seed(13)
    log_h = torch.empty(200, dtype=torch.float64).uniform_(math.log(1e150), math.log(1e307), generator=g)
    angle = torch.empty(200, dtype=torch.float64).uniform_(0.02, math.pi / 2 - 0.02, generator=g)
    v, x = log_h.exp() * angle.sin(), log_h.exp() * angle.cos()
    h = torch.hypot(v, x)
    expected = torch.stack([-1 / h, v / x / h, -(v / x).square() / h])
    for name, sign in (("iv", 1.0), ("kv", -1.0)):
        got = torch.stack(hessian_entries(name, v, x))
        err = (got - sign * expected).abs() / expected.abs().amax(0)
        assert err.max().item() <= 1e-13, f"{name}: {err.max().item():.2e}"


@pytest.mark.parametrize("name", ["log_bessel_iv_hess", "log_bessel_kv_hess"])
def test_second_derivative_op_contract(name, device):
    op = getattr(torch.ops.fastloss, name).default
    v = torch.rand(4, 1, dtype=torch.float64, device=device) * 5
    x = torch.rand(5, dtype=torch.float64, device=device) * 10 + 0.1
    torch.library.opcheck(op, (v, x))
    meta = op(v.to("meta"), x.to("meta"))
    assert [t.shape for t in meta] == [torch.Size([4, 5])] * 3
    with pytest.raises(RuntimeError, match="broadcast"):
        op(torch.ones(2, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device))
    e = torch.empty(0, 3, dtype=torch.float64, device=device)
    assert [t.shape for t in op(e, e)] == [torch.Size([0, 3])] * 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_a_python_number_takes_the_other_arguments_dtype(dtype, device):
    # (A fast path since: a number beside a floating tensor becomes a 0-d tensor of its dtype.)
    x = (torch.rand(5, dtype=torch.float64) * 10 + 0.1).to(dtype).to(device)
    for number in (2.5, 3, 0.0):
        as_tensor = torch.tensor(number, dtype=dtype, device=device)
        for f in (fastloss.log_bessel_iv, fastloss.log_bessel_kv):
            for got, expected in ((f(number, x), f(as_tensor, x)), (f(x, number), f(x, as_tensor))):
                assert got.dtype == dtype and got.device == x.device
                torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
