"""The CUDA kernels (csrc/kernels) run on the CPU emulator (tests/cuda_emu): results against
float64 references or the CPU kernels (themselves tested against float64 and mpmath), every
launch path, both thread orders (a missing barrier changes the results; kernels with atomic
sums are compared across orders within rounding), shared memory and cp.async reads of
unwritten data (0xff fill: NaN), out-of-bounds accesses (guard pages), deadlocks and launch
limits (launch errors).

It checks what the kernels compute, not how fast; it needs g++ and the CUDA headers, not a GPU.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastloss  # noqa: F401  (registers the CPU ops the emulated kernels are compared with)
from cuda_emu import build
from cuda_emu.device import Emulator, schedule

pytestmark = pytest.mark.skipif(
    build.cuda_include_dir() is None or shutil.which("g++") is None,
    reason="the CUDA emulator needs g++ and the CUDA toolkit's headers",
)

ROOT = Path(__file__).resolve().parent.parent


def load_emulator(**variant) -> Emulator:
    out = Path(os.environ.get("FASTLOSS_EMU_BUILD_DIR", ROOT / "build" / "cuda_emu"))
    out.mkdir(parents=True, exist_ok=True)
    return Emulator(build.load(out, **variant))


@pytest.fixture(scope="session")
def emu() -> Emulator:
    return load_emulator()


@pytest.fixture(scope="session")
def emu_fma() -> Emulator:
    """The kernels built to fuse multiplies and adds where the compiler likes, as nvcc does by
    default (the CPU kernels never do): results may round differently from the CPU's."""
    return load_emulator(contract=True)


@pytest.fixture(scope="session")
def emu_sm80() -> Emulator:
    """The kernels built for sm_80 (A100: 163 KB of shared memory per block, scalar float
    atomics, one LCE backward block per SM)."""
    return load_emulator(arch=800)


# Emulated devices: the launch plans (row splits, vocabulary splits, cooperative grids) depend on
# the SM count. Device 0 has 4 SMs (few blocks, many splits per block); others as named.
SMS = {0: 4, 1: 1, 2: 7, 3: 132}


@pytest.fixture(params=[1, 2, 3], ids=lambda d: f"{SMS[d]}sms")
def other_device(emu, request):
    emu.set_device(request.param, SMS[request.param])
    yield request.param
    emu.set_device(0, SMS[0])


def both_orders(fn, rtol: float = 0.0):
    """fn() under both thread orders; the results must be bitwise equal (no races), or with
    ``rtol`` (atomic float sums, whose order follows the threads') equal within rtol times the
    largest entry."""
    with schedule("forward"):
        a = fn()
    with schedule("reverse"):
        b = fn()
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        if x is None:
            continue
        if rtol:
            scale = x.double().abs().max().item()
            assert (x.double() - y.double()).abs().max().item() <= rtol * scale, \
                "results depend on the order threads run between barriers"
            continue
        assert torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                           y.view(torch.uint8) if y.dtype.is_floating_point else y), \
            "results depend on the order threads run between barriers"
    return a


# Tolerances against float64: a few ulps of the output type (accumulation in float32 or float64).
TOL = {torch.float32: 2e-6, torch.float64: 1e-14, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, absolute: bool = False) -> None:
    """Relative error (floored at 1e-3) within TOL[dtype]; absolute: error within TOL[dtype] times
    the largest |ref| (at least 1), for values like log-probabilities near 0."""
    got, ref = got.double(), ref.double()
    assert (got.isnan() == ref.isnan()).all(), f"{what}: NaN where the reference has none (or the reverse)"
    assert (got.isinf() == ref.isinf()).all() and (got[ref.isinf()] == ref[ref.isinf()]).all(), f"{what}: infinities"
    finite = ref.isfinite()
    got, ref = got[finite], ref[finite]
    if ref.numel() == 0:
        return
    if absolute:
        err = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    else:
        err = ((got - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
    assert err <= TOL[dtype], f"{what}: max error {err:.3g}"


# -------------------------------------------------------------------------------------------
# softmax: warp rows (<= 1024), block rows with the row cached in shared memory (<= 48 KB and
# above, with the opt-in), uncached long rows, rows split across blocks, strided columns.

SOFTMAX_SHAPES = [
    ((37, 1), -1), ((9, 5), -1), ((33, 32), -1), ((17, 100), -1), ((5, 1000), -1), ((8, 1024), -1),
    ((3, 3000), -1), ((2, 20000), -1), ((1, 70000), -1), ((2, 151936), -1), ((40, 4000), -1),
    ((24, 10000), -1), ((16, 70000), -1), ((300, 3001), -1), ((150, 5003), -1),
    ((6, 33, 5), 1), ((3, 7, 40), 1), ((2, 600, 3), 1), ((300, 2), 0),
]


@pytest.mark.parametrize("shape,dim", SOFTMAX_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_forward_and_backward(emu, shape, dim, log):
    g = torch.Generator().manual_seed(hash((shape, dim, log)) % 2**31)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 5
    ref = torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
    y = both_orders(lambda: emu.softmax(x.float(), dim, log))
    close(y, ref, torch.float32, "forward", absolute=log)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    y32, g32 = ref.float(), grad.float()
    dx = both_orders(lambda: emu.softmax_backward(g32, y32, dim, log))
    backward_close(dx, g32, y32, dim, log, torch.float32)


def backward_close(dx, grad, y, dim, log, dtype):
    """dx against the float64 backward of the same (rounded) y and grad, entry by entry, within
    a few rounding units of the terms it is made of (so small entries of long rows count), or
    of the dtype's smallest normal number (subnormal outputs)."""
    yd, gd = y.double(), grad.double()
    if log:
        p = yd.exp()
        ref = gd - p * gd.sum(dim, keepdim=True)
        scale = gd.abs() + p * gd.abs().sum(dim, keepdim=True)
    else:
        s = (gd * yd).sum(dim, keepdim=True)
        ref = yd * (gd - s)
        scale = yd * (gd.abs() + (gd * yd).abs().sum(dim, keepdim=True))
    err = (dx.double() - ref).abs() / (scale + torch.finfo(dtype).tiny)
    assert err.max().item() <= 4 * TOL[dtype], f"backward max error {err.max().item():.3g} of its terms"


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, None), (torch.float16, None), (torch.bfloat16, None),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["f64", "f16", "bf16", "f16-f32", "bf16-f32"])
@pytest.mark.parametrize("shape,dim", [((9, 100), -1), ((3, 3000), -1), ((2, 70000), -1), ((4, 9, 6), 1)],
                         ids=lambda v: str(v))
def test_softmax_dtypes(emu, dtype, out_dtype, shape, dim):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 5).to(dtype)
    y = both_orders(lambda: emu.softmax(x, dim, out_dtype=out_dtype))
    assert y.dtype == (out_dtype or dtype)
    close(y, torch.softmax(x.double(), dim), out_dtype or dtype, "forward")
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(y.dtype)
    dx = both_orders(lambda: emu.softmax_backward(grad, y, dim, in_dtype=dtype))
    assert dx.dtype == dtype
    backward_close(dx, grad, y, dim, False, dtype)


def test_softmax_special_rows(emu):
    x = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1))
    x[0] = float("-inf")
    x[1, 17] = float("inf")
    x[2, 5] = float("nan")
    x[3, :100] = float("-inf")
    x[4] *= 1e6
    for xs in (x, x[:, :500], x[:, :20]):  # block, warp and small-warp paths
        close(emu.softmax(xs), torch.softmax(xs.double(), -1), torch.float32, "special rows")


# -------------------------------------------------------------------------------------------
# stat_topk and the fused gelu-mul: on-chip rows, rows split into chunks across blocks, strided
# columns; against the CPU kernels (tested against float64 references in test_stat_topk.py).

OPS = torch.ops.fastloss
STAT_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def z_of(sparsity: float) -> float:
    return torch.special.ndtri(torch.tensor(sparsity, dtype=torch.float64)).item()


def near(got, ref, tol, what):
    """Elementwise |got - ref| <= tol max(1, |ref|), infinities and NaNs where the reference has them."""
    got, ref = got.double(), ref.double().expand_as(got)
    assert (got.isnan() == ref.isnan()).all(), f"{what}: NaN pattern differs"
    inf = ref.isinf()
    assert (got[inf] == ref[inf]).all() and not got[~inf].isinf().any(), f"{what}: infinities differ"
    ok = ref.isfinite()
    if ok.any():
        err = ((got[ok] - ref[ok]).abs() / ref[ok].abs().clamp_min(1.0)).max().item()
        assert err <= tol, f"{what}: max error {err:.3g}"


STAT_SHAPES = [((8, 1000), -1), ((64, 4096), -1), ((3, 16384), -1), ((2, 100000), -1), ((4, 50, 6), 1),
               ((300, 3), 0), ((5, 7), -1)]


@pytest.mark.parametrize("shape,dim", STAT_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16],
                         ids=["f32", "bf16", "f64", "f16"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_stat_topk_forward_and_backward(emu, shape, dim, dtype, hard):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    sparsity = 0.9
    y, theta, mean, sd = both_orders(lambda: emu.stat_topk(x, dim, z_of(sparsity), hard))
    ry, rtheta, rmean, rsd = OPS.stat_topk(x, dim, sparsity, hard, True, 0)
    tol = STAT_TOL[dtype]
    near(theta.flatten(), rtheta.flatten(), tol, "theta")
    near(mean.flatten(), rmean.flatten(), tol, "mean")
    near(sd.flatten(), rsd.flatten(), tol, "std")
    near(y, ry, tol, "y")
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad_theta = torch.randn(rtheta.shape, generator=g, dtype=torch.float64).to(rtheta.dtype)
    for gt, threshold_grad in ((grad_theta, True), (None, True), (None, False)):
        dx = both_orders(lambda: emu.stat_topk_backward(grad, x, rtheta, rmean, rsd, gt, dim, z_of(sparsity), hard,
                                                        threshold_grad))
        ref = OPS.stat_topk_backward(grad, gt, x, rtheta, rmean, rsd, dim, sparsity, hard, threshold_grad, 0)
        near(dx, ref, 4 * tol, f"dx (grad_theta {gt is not None}, threshold_grad {threshold_grad})")


@pytest.mark.parametrize("shape", [(6, 256), (16, 2048), (2, 40000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
def test_gelu_mul_forward_and_backward(emu, shape, dtype):
    g = torch.Generator().manual_seed(5)
    gate = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    up = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    out, theta, mean, sd = both_orders(lambda: emu.gelu_mul(gate, up, z_of(0.95)))
    rout, rtheta, rmean, rsd = OPS.stat_topk_gelu_mul(gate, up, 0.95, True, 0)
    tol = STAT_TOL[dtype]
    near(theta.flatten(), rtheta.flatten(), tol, "theta")
    near(out, rout, tol, "out")
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    for threshold_grad in (True, False):
        dgate, dup = both_orders(lambda: emu.gelu_mul_backward(grad, gate, up, rtheta, rmean, rsd, z_of(0.95),
                                                               threshold_grad))
        rgate, rup = OPS.stat_topk_gelu_mul_backward(grad, gate, up, rtheta, rmean, rsd, 0.95, threshold_grad, 0)
        near(dgate, rgate, 4 * tol, "d gate")
        near(dup, rup, 4 * tol, "d up")


@pytest.mark.parametrize("shape,dim", [((8, 1000), -1), ((2, 100000), -1), ((300, 3), 0)], ids=str)
def test_stat_topk_gradient_through_theta_with_a_large_offset(emu, shape, dim):
    # 1e4 + N(0, 1) in float32: the saved mean's rounding (up to 5e-4) is taken out of the
    # deviations in the backward (on-chip, chunked with partial sums, strided), as on the CPU,
    # whose gradients were 1e-4 off without it. Compared where x <= theta, where dx is the path
    # through theta alone, relative to its largest entry. An output gradient of ones makes the
    # direct terms' row sum exact (a count), whatever order the kernels add it in.
    g = torch.Generator().manual_seed(8)
    x = (1e4 + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    grad = torch.ones(shape)
    _, theta, mean, sd = OPS.stat_topk(x, dim, 0.9, False, True, 0)
    grad_theta = torch.randn(theta.shape, generator=g)
    for hard, gt in ((False, None), (False, grad_theta), (True, grad_theta)):
        dx = emu.stat_topk_backward(grad, x, theta, mean, sd, gt, dim, z_of(0.9), hard, True)
        ref = OPS.stat_topk_backward(grad, gt, x, theta, mean, sd, dim, 0.9, hard, True, 0)
        below = x <= theta
        err = ((dx - ref)[below].double().abs().max() / ref[below].double().abs().max()).item()
        assert err <= 1e-6, (hard, gt is not None, err)
    if dim == -1:
        up = torch.randn(shape, generator=g)
        _, theta, mean, sd = OPS.stat_topk_gelu_mul(x, up, 0.9, True, 0)
        dgate, _ = emu.gelu_mul_backward(grad, x, up, theta, mean, sd, z_of(0.9), True)
        ref, _ = OPS.stat_topk_gelu_mul_backward(grad, x, up, theta, mean, sd, 0.9, True, 0)
        below = x <= theta
        err = ((dgate - ref)[below].double().abs().max() / ref[below].double().abs().max()).item()
        assert err <= 1e-5, ("gelu_mul", err)  # (the sum of d h, in another order)


def test_stat_topk_long_columns_theta_within_a_few_ulps(emu):
    # A thread per column merges ~250000 parts of 8 values: with two merge levels the rounding
    # of ~3900 group merges reached 5-7 ulps of theta (float32, 2e6 entries per column).
    x = torch.randn(2, 2_000_000, generator=torch.Generator().manual_seed(21))
    xd = x.double()
    ref = xd.mean(1) + xd.std(1, correction=0) * z_of(0.9)
    _, theta, _, _ = emu.stat_topk(x.t().contiguous(), 0, z_of(0.9), False)
    ulps = (theta.double().flatten() - ref).abs() / (ref.abs() * 2.0**-23)
    assert ulps.max().item() <= 2, f"theta off by {ulps.tolist()} ulps"


@pytest.mark.parametrize("shape,dim", [((2, 40000), -1), ((2, 100000), -1), ((3000, 4), 0), ((4, 5000, 3), 1)],
                         ids=str)
def test_stat_topk_std_with_a_large_common_offset(emu, shape, dim):
    # 1e7 + N(0, 1) in float32: the parts' means are rounded to 1, as large as the spread; merged
    # without their rounding errors the std was 1.2-7% off (chunked, split and strided paths).
    x = (1e7 + torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).float()
    _, _, mean, sd = emu.stat_topk(x, dim, z_of(0.9), False)
    ref_sd = x.double().std(dim, correction=0).flatten()
    assert ((sd.double().flatten() - ref_sd).abs() / ref_sd).max().item() <= 1e-5
    near(mean.flatten(), x.double().mean(dim).flatten(), 1e-7, "mean")


def test_stat_topk_special_rows(emu):
    x = torch.randn(5, 3000, generator=torch.Generator().manual_seed(2))
    x[0] = 2.5  # constant row
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    x[3] = x[3] * 1e-30
    for xs in (x, x[:, :300]):
        y, theta, _, _ = emu.stat_topk(xs, -1, z_of(0.8), False)
        ry, rtheta, _, _ = OPS.stat_topk(xs, -1, 0.8, False, True, 0)
        near(theta.flatten(), rtheta.flatten(), 2e-5, "theta")
        near(y, ry, 2e-5, "y")
        # The tiny row on its own scale (near() compares values below 1 absolutely).
        near(theta[3] * 1e30, rtheta[3] * 1e30, 2e-5, "theta of a row of 1e-30")
        near(y[3] * 1e30, ry[3] * 1e30, 2e-5, "y of a row of 1e-30")


# -------------------------------------------------------------------------------------------
# log-Bessel functions and the vMF helpers: one host + device implementation (csrc/common), so
# the emulated device code must give the CPU's values to a few ulps.


def test_log_bessel(emu):
    g = torch.Generator().manual_seed(3)
    n = 4000
    v = torch.cat([torch.rand(n // 2, generator=g, dtype=torch.float64) * 3,
                   10 ** (torch.rand(n // 2, generator=g, dtype=torch.float64) * 8 - 2)])
    x = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 12 - 6)
    v[:5] = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e6], dtype=torch.float64)
    x[:5] = torch.tensor([0.0, float("inf"), 1e-300, 1e300, 3.0], dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        vd, xd = v.to(dtype), x.to(dtype)
        for fn, op in ((0, OPS.log_bessel_iv), (1, OPS.log_bessel_kv)):
            near(emu.log_bessel(fn, vd, xd), op(vd, xd), tol, f"fn {fn} {dtype}")
        for fn, op in ((2, OPS.log_bessel_iv_grad), (3, OPS.log_bessel_kv_grad)):
            dv, dx = emu.log_bessel(fn, vd, xd)
            rdv, rdx = op(vd, xd)
            near(dv[5:], rdv[5:], 100 * tol, f"fn {fn} d/dv {dtype}")
            near(dx[5:], rdx[5:], 100 * tol, f"fn {fn} d/dx {dtype}")
        # Second derivatives: the same scalar code on both sides (relative: many are tiny).
        for fn, op in ((4, OPS.log_bessel_iv_hess), (5, OPS.log_bessel_kv_hess)):
            for part, got, ref in zip(("vv", "vx", "xx"), emu.log_bessel(fn, vd, xd), op(vd, xd)):
                assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf()), f"fn {fn} {part}"
                ok = ref.isfinite()
                err = ((got - ref).abs()[ok] / ref.abs()[ok].clamp_min(torch.finfo(dtype).tiny)).max().item()
                assert err <= 100 * tol, f"fn {fn} d2/d{part} {dtype}: max relative error {err:.3g}"


@pytest.mark.parametrize("p", [3, 64, 32768])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["f64", "f32"])
def test_vmf(emu, p, dtype, tol):
    g = torch.Generator().manual_seed(p)
    kappa = (10 ** (torch.rand(500, generator=g, dtype=torch.float64) * 8 - 3)).to(dtype)
    for fn, op in ((0, lambda k: OPS.vmf_mean_resultant(k, p, 0)), (1, lambda k: OPS.vmf_mean_resultant(k, p, 1)),
                   (2, lambda k: OPS.vmf_mean_resultant(k, p, 2)),
                   (3, lambda k: OPS.vmf_mean_resultant_complement(k, p)), (4, lambda k: OPS.vmf_entropy(k, p)),
                   (6, lambda k: OPS.vmf_log_normalizer(k, p))):
        got, ref = emu.vmf(fn, kappa, p), op(kappa)
        near(got / ref.abs().clamp_min(1e-300), ref / ref.abs().clamp_min(1e-300), tol, f"vmf fn {fn}")
    rbar = OPS.vmf_mean_resultant(kappa, p, 0)
    near(emu.vmf(5, rbar, p, 100) / OPS.vmf_kappa_mle(rbar, p, 100), torch.ones(1), 1000 * tol, "kappa_mle")
    w = (torch.rand(500, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    near(emu.vmf_sample_w_derivative(w, kappa, p), OPS.vmf_sample_w_derivative(w, kappa, p), 1000 * tol,
         "sample_w_derivative")


# -------------------------------------------------------------------------------------------
# Sinkhorn: one block per problem (cost in shared memory) and the cooperative grid path.


def mass_tolerance(dtype):
    """The glue's tolerance on |sum a - sum b| for marginals of this dtype as given (before their
    conversion to the cost's accumulation dtype; sinkhorn_mass_tolerance): sqrt(eps), >= 1e-6."""
    return max(torch.finfo(dtype).eps ** 0.5, 1e-6)


@pytest.mark.parametrize("batch,n,m", [(5, 20, 30), (3, 64, 64), (1, 7, 200), (1, 300, 260), (12, 150, 200)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sinkhorn(emu, batch, n, m, dtype):
    g = torch.Generator().manual_seed(n * m)
    cost = torch.rand(batch, n, m, generator=g, dtype=torch.float64).to(dtype)
    a = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    a, b = (a / a.sum(-1, keepdim=True)).to(dtype), (b / b.sum(-1, keepdim=True)).to(dtype)
    a[0, 1] = 0  # a zero-mass row
    a[0] /= a[0].sum()
    eps, tol = 0.05, 1e-5 if dtype == torch.float32 else 1e-9
    mass_tol = mass_tolerance(dtype)
    got = both_orders(lambda: emu.sinkhorn(cost, a, b, eps, 2000, tol, mass_tol))
    ref = OPS.sinkhorn(cost, a, b, eps, 2000, tol, 1.0)
    check_sinkhorn(got, ref, tol, 1e-4 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("n,m", [(30000, 7), (7, 30000), (1000, 60)], ids=lambda v: str(v))
def test_sinkhorn_float64_marginals_of_a_float32_cost(emu, n, m):
    """float64 marginals reach a float32 kernel rounded to float32 and keep their 1e-6 mass
    tolerance, plus the glue's 2^-23 for the rounding: the kernel sums them in double (in
    float32, 30000 entries of 1/30000 add up 1.2e-6 off), so the problems the CPU solves are
    solved (a gap of 0.99e-6 included) and a gap of 3e-6 is refused."""
    g = torch.Generator().manual_seed(n + m)
    cost = torch.rand(3, n, m, generator=g).to(torch.float32)
    a = torch.full((3, n), 1.0 / n, dtype=torch.float64)
    b = torch.rand(3, m, generator=g, dtype=torch.float64) + 0.5
    b /= b.sum(-1, keepdim=True)
    b[1] *= 1 + 0.99e-6
    b[2] *= 1 + 3e-6
    eps, max_iter = 0.1, 3
    got = both_orders(lambda: emu.sinkhorn(cost, a.float(), b.float(), eps, max_iter, 0.0,
                                           mass_tolerance(torch.float64) + 2**-23))
    ref = OPS.sinkhorn(cost[:2], a[:2], b[:2], eps, max_iter, 0.0, 1.0)
    for name, x, y in zip(("plan", "alpha", "beta", "value", "n_iter", "error"), got, ref):
        near(x[:2], y, 1e-5, name)
    assert all(x[2].isnan().all() for x in (got[0], got[1], got[2], got[3], got[5])), "unequal mass not refused"
    with pytest.raises(RuntimeError, match="same total mass"):
        OPS.sinkhorn(cost[2:], a[2:], b[2:], eps, max_iter, 0.0, 1.0)


def check_sinkhorn(got, ref, tol, ftol):
    """Emulated (plan, alpha, beta, value, n_iter, error) against the CPU's: about as many
    iterations, converged (the error written and within tol), the rest within ftol."""
    assert (got[4] - ref[4]).abs().max().item() <= max(2, 0.02 * ref[4].max().item()), "iterations"
    assert ((got[5] > 0) & (got[5] <= tol)).all(), "not converged (or the error never written)"
    for name, x, y in zip(("plan", "alpha", "beta", "value"), got, ref):
        near(x, y, ftol, name)


# -------------------------------------------------------------------------------------------
# Cut cross-entropy: the tensor-core kernels (cp.async, ldmatrix, mma.sync emulated from the PTX
# fragment layouts), against float64 on the same half-precision inputs.


def lce_inputs(seed, tokens, vocab, dim, scale=1.0):
    """bfloat16 hidden (tokens, dim) and classifier (vocab, dim), int64 targets."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(tokens, dim, generator=g) * scale).to(torch.bfloat16)
    classifier = (torch.randn(vocab, dim, generator=g) * scale).to(torch.bfloat16)
    return hidden, classifier, torch.randint(0, vocab, (tokens,), generator=g), g


def lce_reference(hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss):
    h, c = hidden.double().requires_grad_(), classifier.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    z = h @ c.T + (b if b is not None else 0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = z.logsumexp(-1)
    keep = targets != ignore_index
    safe = targets.where(keep, 0)
    nll = lse - z.gather(-1, safe[:, None])[:, 0]
    smooth = lse - z.mean(-1)
    loss = ((1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2) * keep
    return loss, lse * keep, (h, c, b)


@pytest.mark.parametrize("tokens,vocab,dim", [(37, 300, 64), (130, 257, 40), (5, 1000, 136), (2, 9, 8)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("options", [{}, {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-3, "bias": True}],
                         ids=["plain", "softcap-smoothing-zloss-bias"])
def test_linear_cross_entropy(emu, tokens, vocab, dim, dtype, options):
    g = torch.Generator().manual_seed(tokens * vocab + dim)
    hidden = (torch.randn(tokens, dim, generator=g) * 0.5).to(dtype)
    classifier = (torch.randn(vocab, dim, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(vocab, generator=g)).to(dtype) if options.get("bias") else None
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::3] = -100
    kw = {k: v for k, v in options.items() if k != "bias"}
    emu.ldmatrix_stats(reset=True)
    loss, lse = both_orders(lambda: emu.lce_forward(hidden, classifier, targets, bias, **kw))
    rloss, rlse, (h, c, b) = lce_reference(hidden, classifier, targets, bias, -100, kw.get("softcap"),
                                           kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0))
    near(lse, rlse.detach(), 2e-6, "lse")
    near(loss, rloss.detach(), 2e-6, "loss")
    grad_loss = torch.rand(tokens, generator=g)
    grad_lse = torch.rand(tokens, generator=g) if kw else None
    total = (grad_loss.double() * rloss).sum() + ((grad_lse.double() * rlse).sum() if grad_lse is not None else 0)
    refs = torch.autograd.grad(total, [t for t in (h, c, b) if t is not None])
    # The backward adds into its outputs with float atomics: across orders, equal up to rounding.
    got = both_orders(lambda: emu.lce_backward(grad_loss, grad_lse, lse, hidden, classifier, targets.int(), bias, **kw),
                      rtol=1e-6)
    ops, conflicts = emu.ldmatrix_stats()
    assert ops > 0 and conflicts == 0, f"{conflicts} of {ops} ldmatrix instructions have bank conflicts"
    # The backward rounds the logit gradients to the inputs' dtype for the second tensor-core
    # product (as cut cross-entropy does): about one unit of its rounding, relative to the largest.
    tol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    for name, x, r in zip(("d hidden", "d classifier", "d bias"), got, refs):
        err = (x.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err <= tol, f"{name}: max error {err:.3g} of the largest entry"


def test_linear_cross_entropy_shard(emu):
    hidden, classifier, targets, _ = lce_inputs(9, 40, 500, 32)
    loss, lse = emu.lce_forward(hidden, classifier, targets)
    parts = [emu.lce_forward(hidden, classifier[s:s + 200], targets, shard=True, vocab_start=s, vocab_total=500)
             for s in (0, 200, 400)]
    near(torch.stack([p[0] for p in parts]).logsumexp(0), lse, 2e-6, "lse from shards")
    near(lse + sum(p[1] for p in parts), loss, 2e-6, "loss from shards")


# -------------------------------------------------------------------------------------------
# The emulator itself: each kind of bug it is meant to expose (cuda_emu/selftest.cu) is exposed.


def _selftest(emu, which):
    """Runs self-test kernel ``which`` on inputs 1, 2, ..., 32; (status, output)."""
    inp = emu.put(torch.arange(1, 33, dtype=torch.float32))
    out = emu.empty((64,), torch.float32)
    status = emu.lib.emu_selftest(which, ctypes.c_void_p(inp.data_ptr()), ctypes.c_void_p(out.data_ptr()), 32)
    result = out.clone()
    del inp, out
    emu.release()
    return status, result


@pytest.mark.parametrize("which", [0, 8, 10], ids=["within-a-warp", "between-warps", "cp-async-overwrite"])
def test_emulator_exposes_a_missing_barrier(emu, which):
    with schedule("forward"):
        _, a = _selftest(emu, which)
    with schedule("reverse"):
        _, b = _selftest(emu, which)
    assert not torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))


def test_emulator_counts_ldmatrix_bank_conflicts(emu):
    emu.ldmatrix_stats(reset=True)
    status, _ = _selftest(emu, 14)
    assert status == 0 and emu.ldmatrix_stats() == (1, 1)


def test_emulator_scalar_shared_variable(emu):
    status, out = _selftest(emu, 12)
    assert status == 0 and (out[:32] == 7).all()


@pytest.mark.parametrize("which,reason", [
    (1, "deadlock"), (2, "exited lane"), (3, "dynamic shared memory above the kernel's limit"),
    (7, "__launch_bounds__"), (9, "grid sync after thread 0"), (11, "different warp collectives")],
    ids=["divergent-barrier", "exited-lane", "shared-memory-limit", "launch-bounds", "grid-sync-after-exit",
         "mixed-collectives"])
def test_emulator_reports_launch_failures(emu, which, reason, capfd):
    status, _ = _selftest(emu, which)
    assert status != 0 and reason in capfd.readouterr().err


def test_emulator_delays_cp_async_until_the_wait(emu):
    status, out = _selftest(emu, 4)
    assert status == 0 and out[0].isnan() and out[1].item() == 1.0


@pytest.mark.parametrize("which,report", [(5, "emu: memory fault in kernel past_the_end"),
                                          (6, "emu: memory fault in kernel past_the_shared_end"),
                                          (13, "misaligned address")], ids=["global", "shared", "misaligned"])
def test_emulator_faults(emu, which, report):
    code = (
        "import sys, ctypes, torch; sys.path.insert(0, %r)\n"
        "from cuda_emu.device import Emulator\n"
        "e = Emulator(ctypes.CDLL(%r))\n"
        "inp = e.put(torch.arange(32, dtype=torch.float32)); out = e.empty((64,), torch.float32)\n"
        "e.lib.emu_selftest(%d, ctypes.c_void_p(inp.data_ptr()), ctypes.c_void_p(out.data_ptr()), 32)\n"
        % (str(Path(__file__).parent), emu.lib._name, which)
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and report in proc.stderr, proc.stderr[-2000:]


# -------------------------------------------------------------------------------------------
# Other SM counts (plans change with them), and more cut cross-entropy cases.


def test_plans_for_other_sm_counts(emu, other_device):
    g = torch.Generator().manual_seed(other_device)
    for shape in ((2, 151936), (24, 10000), (6, 33, 5)):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        close(emu.softmax(x.float(), 1 if len(shape) == 3 else -1),
              torch.softmax(x, 1 if len(shape) == 3 else -1), torch.float32, f"softmax {shape}")
    x = torch.randn(3, 50000, generator=g)
    y, theta, _, _ = emu.stat_topk(x, -1, z_of(0.9), False)
    ry, rtheta, _, _ = OPS.stat_topk(x, -1, 0.9, False, True, 0)
    near(theta.flatten(), rtheta.flatten(), 2e-5, "theta")
    if SMS[other_device] <= 8:  # (a cooperative grid of 132 SMs is too many threads to emulate)
        cost = torch.rand(1, 300, 260, generator=g)
        a, b = torch.full((1, 300), 1 / 300), torch.full((1, 260), 1 / 260)
        got = emu.sinkhorn(cost, a, b, 0.05, 2000, 1e-5, mass_tolerance(torch.float32))
        near(got[3], OPS.sinkhorn(cost, a, b, 0.05, 2000, 1e-5, 1.0)[3], 1e-4, "sinkhorn value")
    hidden, classifier, targets, _ = lce_inputs(other_device, 300, 700, 64)
    loss, lse = emu.lce_forward(hidden, classifier, targets)
    rloss, rlse, _ = lce_reference(hidden, classifier, targets, None, -100, None, 0.0, 0.0)
    near(lse, rlse.detach(), 2e-6, "lce lse")


def test_linear_cross_entropy_targets(emu):
    tokens, vocab = 50, 300
    hidden, classifier, targets, _ = lce_inputs(21, tokens, vocab, 32)
    targets[3], targets[4], targets[5] = vocab, -1, -100  # out of range (twice), ignored
    loss, lse = emu.lce_forward(hidden, classifier, targets)
    assert loss[3:5].isnan().all() and lse[3:5].isnan().all(), "out-of-range targets give NaN"
    assert loss[5] == 0 and lse[5] == 0, "ignored tokens give 0"
    keep = torch.ones(tokens, dtype=torch.bool)
    keep[3:6] = False
    rloss, rlse, _ = lce_reference(hidden[keep], classifier, targets[keep], None, -100, None, 0.0, 0.0)
    near(loss[keep], rloss.detach(), 2e-6, "loss")
    # Every token ignored: zero gradients, no NaN.
    ignored = torch.full((tokens,), -100)
    loss, lse = emu.lce_forward(hidden, classifier, ignored)
    assert (loss == 0).all() and (lse == 0).all()
    dh, dc, _ = emu.lce_backward(torch.ones(tokens), None, lse, hidden, classifier, ignored)
    assert (dh == 0).all() and (dc == 0).all()


def test_linear_cross_entropy_gradient_filtering(emu):
    # Peaked softmaxes whose mass stays in the first 512 classes (targets there too): the
    # vocabulary tiles past 512 are all below filter_eps and get skipped.
    tokens = 200
    hidden, classifier, targets, _ = lce_inputs(22, tokens, 900, 64, scale=2.0)
    classifier[512:] *= 0.01
    targets %= 512
    loss, lse = emu.lce_forward(hidden, classifier, targets)
    grad = torch.ones(tokens)
    exact = emu.lce_backward(grad, None, lse, hidden, classifier, targets)
    filtered = emu.lce_backward(grad, None, lse, hidden, classifier, targets, filter_eps=2.0**-12)
    for x, y in zip(exact[:2], filtered[:2]):
        assert (x - y).abs().max().item() <= 2e-3 * x.abs().max().item()
    assert exact[1][512:].abs().max() > 0 and (filtered[1][512:] == 0).all(), "the tiles past 512 were not skipped"


def test_linear_cross_entropy_gradient_filtering_interleaved(emu):
    # D = 256: 8 k-steps per tile, so a filtered tile's loads past the pipeline's prologue are
    # skipped too; filtered and kept vocabulary tiles alternate.
    tokens, vocab, dim, tile = 200, 1024, 256, 128
    hidden, classifier, targets, _ = lce_inputs(5, tokens, vocab, dim, scale=0.6)
    skipped, kept = [1, 3, 4, 6], [0, 2, 5, 7]
    rows = lambda tiles: torch.cat([torch.arange(t * tile, (t + 1) * tile) for t in tiles])  # noqa: E731
    classifier[rows(skipped)] *= 0.001
    targets = torch.tensor(kept)[targets % len(kept)] * tile + targets % tile
    _, lse = emu.lce_forward(hidden, classifier, targets)
    grad = torch.ones(tokens)
    exact = emu.lce_backward(grad, None, lse, hidden, classifier, targets)
    filtered = both_orders(lambda: emu.lce_backward(grad, None, lse, hidden, classifier, targets, filter_eps=2.0**-8),
                           rtol=1e-6)
    assert exact[1][rows(skipped)].abs().max() > 0 and (filtered[1][rows(skipped)] == 0).all(), "not skipped"
    kept_dc, exact_dc = filtered[1][rows(kept)], exact[1][rows(kept)]
    assert (kept_dc - exact_dc).abs().max().item() <= 1e-6 * exact_dc.abs().max().item(), "kept tiles changed"
    assert (filtered[0] - exact[0]).abs().max().item() <= 2e-3 * exact[0].abs().max().item()
    # The op accepts filter_eps < 1; in float, values above 1 - 2^-25 are 1: still accepted.
    nearly_one = emu.lce_backward(grad, None, lse, hidden, classifier, targets, filter_eps=1 - 1e-8)
    assert all(x.isfinite().all() for x in nearly_one[:2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_linear_cross_entropy_strided_inputs(emu, dtype):
    # Row strides longer than D (hidden also starting 16 elements in), strided bias and int32
    # targets: the same bits as dense inputs, and nothing read from the gaps (NaN there).
    tokens, vocab, dim = 150, 300, 72
    hidden, classifier, targets, g = lce_inputs(24, tokens, vocab, dim, scale=0.5)
    hidden, classifier = hidden.to(dtype), classifier.to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype)
    targets = targets.int()
    targets[::4] = -100
    kw = {"softcap": 20.0, "label_smoothing": 0.1, "z_loss": 1e-3}
    grad_loss, grad_lse = torch.rand(tokens, generator=g), torch.rand(tokens, generator=g)
    for strided in (False, True):
        with schedule("forward"):
            loss, lse = emu.lce_forward(hidden, classifier, targets, bias, strided=strided, **kw)
            grads = emu.lce_backward(grad_loss, grad_lse, lse, hidden, classifier, targets, bias, strided=strided,
                                     **kw)
        if not strided:
            dense = (loss, lse, *grads)
    for name, x, y in zip(("loss", "lse", "d hidden", "d classifier", "d bias"), (loss, lse, *grads), dense):
        assert torch.equal(x, y), f"{name}: strided inputs change the result"
    assert all(x.isfinite().all() for x in dense[2:])


def test_linear_cross_entropy_backward_by_vocabulary_chunks(emu):
    # What the CUDA glue does for d classifier: the vocabulary in chunks (each a shard with its
    # vocab_start, the whole vocabulary's lse), d hidden summed over them.
    tokens, vocab, dim = 70, 600, 48
    hidden, classifier, targets, g = lce_inputs(23, tokens, vocab, dim)
    bias = torch.randn(vocab, generator=g).to(torch.bfloat16)
    targets[::5] = -100
    kw = {"softcap": 20.0, "label_smoothing": 0.1, "z_loss": 1e-3}
    _, lse = emu.lce_forward(hidden, classifier, targets, bias, **kw)
    grad_loss, grad_lse = torch.rand(tokens, generator=g), torch.rand(tokens, generator=g)
    whole = emu.lce_backward(grad_loss, grad_lse, lse, hidden, classifier, targets, bias, **kw)
    dh, dc, db = torch.zeros(tokens, dim), [], []
    for start in range(0, vocab, 256):
        rows = slice(start, min(vocab, start + 256))
        part = emu.lce_backward(grad_loss, grad_lse, lse, hidden, classifier[rows], targets, bias[rows],
                                vocab_start=start, vocab_total=vocab, **kw)
        dh += part[0]
        dc.append(part[1])
        db.append(part[2])
    for name, x, r in (("d hidden", dh, whole[0]), ("d classifier", torch.cat(dc), whole[1]),
                       ("d bias", torch.cat(db), whole[2])):
        err = (x - r).abs().max().item() / r.abs().max().item()
        assert err <= 1e-5, f"{name}: chunks differ from the whole vocabulary by {err:.3g}"


@pytest.mark.parametrize("batch,n,m", [(4, 30, 40), (1, 300, 260)], ids=["block", "grid"])
@pytest.mark.parametrize("norm", [2, 0], ids=["l2", "inf"])
def test_sinkhorn_edge_cases(emu, batch, n, m, norm):
    # Zero-mass rows (one padded with +inf costs) and columns, a small eps, the other error norms.
    g = torch.Generator().manual_seed(n + norm)
    cost = torch.rand(batch, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(batch, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(batch, m, generator=g, dtype=torch.float64) + 0.1
    a[:, 2] = 0
    b[:, 5] = 0
    cost[:, 2, :] = float("inf")
    cost[:, 7, 3] = float("inf")
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    eps, tol = 0.01, 1e-9
    got = both_orders(lambda: emu.sinkhorn(cost, a, b, eps, 3000, tol, mass_tolerance(torch.float64), norm))
    ref = OPS.sinkhorn(cost, a, b, eps, 3000, tol, {2: 2.0, 0: float("inf")}[norm])
    check_sinkhorn(got, ref, tol, 1e-8)


# -------------------------------------------------------------------------------------------
# The contracting build (FMAs, as nvcc makes them): the kernels stay within the same bounds,
# against float64 and against the CPU kernels, which never fuse.


def test_fma_build_softmax_and_stat_topk(emu_fma):
    for shape, dim in (((17, 100), -1), ((3, 3000), -1), ((2, 151936), -1), ((6, 33, 5), 1)):
        for log in (False, True):
            test_softmax_forward_and_backward(emu_fma, shape, dim, log)
    # Every thread of a row must end with the same normalizer, also where nvcc contracts
    # a * b + c * d into an fma: a row made of two equal halves gives two equal halves.
    for rows, half in ((17, 50), (3, 1500), (2, 75968)):
        r = torch.randn(rows, half, generator=torch.Generator().manual_seed(half)) * 5
        for log in (False, True):
            y = emu_fma.softmax(torch.cat([r, r], -1), -1, log)
            assert torch.equal(y[:, :half], y[:, half:]), f"rows of {2 * half}: threads disagree on the normalizer"
    for shape, dim in (((8, 1000), -1), ((2, 100000), -1), ((4, 50, 6), 1)):
        test_stat_topk_forward_and_backward(emu_fma, shape, dim, torch.float32, False)
    test_gelu_mul_forward_and_backward(emu_fma, (16, 2048), torch.bfloat16)


def test_fma_build_log_bessel_and_vmf(emu_fma):
    test_log_bessel(emu_fma)
    for p in (3, 64, 32768):
        test_vmf(emu_fma, p, torch.float64, 1e-12)


def test_fma_build_sinkhorn_and_linear_cross_entropy(emu_fma):
    test_sinkhorn(emu_fma, 5, 20, 30, torch.float32)
    test_sinkhorn(emu_fma, 1, 300, 260, torch.float64)
    options = {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-3, "bias": True}
    test_linear_cross_entropy(emu_fma, 130, 257, 40, torch.bfloat16, options)
    test_linear_cross_entropy(emu_fma, 37, 300, 64, torch.float16, {})


# -------------------------------------------------------------------------------------------
# sm_80: less shared memory per block changes the softmax cache, Sinkhorn and LCE plans.


def test_sm80_build(emu_sm80):
    for shape, dim in (((24, 10000), -1), ((16, 70000), -1), ((2, 151936), -1)):
        test_softmax_forward_and_backward(emu_sm80, shape, dim, False)
    test_sinkhorn(emu_sm80, 12, 150, 200, torch.float64)
    test_sinkhorn(emu_sm80, 3, 64, 64, torch.float32)
    test_linear_cross_entropy(emu_sm80, 130, 257, 40, torch.bfloat16,
                              {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-3, "bias": True})
    test_linear_cross_entropy_backward_by_vocabulary_chunks(emu_sm80)
