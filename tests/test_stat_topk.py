"""fastloss.stat_topk and stat_topk_gelu_mul against a float64 eager reference (Gemma 3n's
formula), the normal quantile against mpmath, gradients, opcheck, torch.compile, errors."""

import math
import statistics

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastloss
from conftest import ran_in_place

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Output rounding of the compared dtype (the statistics are float32 or float64 in both).
EPS = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def quantile(p: float) -> float:
    """PhiInv(p) by mpmath at 60 digits (root of log Phi, so tiny p keep their digits)."""
    with mpmath.workdps(60):
        p = mpmath.mpf(p)
        tail = min(p, 1 - p)
        if tail > 1e-40:
            return float(mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1))
        z0 = -mpmath.sqrt(-2 * mpmath.log(tail))
        z = mpmath.findroot(lambda t: mpmath.log(mpmath.ncdf(t)) - mpmath.log(tail), z0)
        return float(-z if p > 0.5 else z)


def reference(x, sparsity, dim=-1, hard=False, threshold_grad=True):
    """Gemma 3n's _gaussian_topk in float64 (hard: the mask variant)."""
    z = quantile(sparsity)
    mean = x.mean(dim, keepdim=True)
    std = x.std(dim, keepdim=True, unbiased=False)
    theta = mean + std * z
    if not threshold_grad:
        theta = theta.detach()
    y = x * (x > theta) if hard else torch.relu(x - theta)
    return y, theta


def gelu_mul_reference(gate, up, sparsity):
    return F.gelu(reference(gate, sparsity)[0], approximate="tanh") * up


def random_rows(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows with their own offset and scale, so mean and std matter.
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * (0.5 + torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64)) + 3 * torch.randn(
        shape[:-1] + (1,), generator=g, dtype=torch.float64)
    return x.to(dtype).to(device)


# --------------------------------------------------------------------------------------------
# The normal quantile


@pytest.mark.parametrize("p", [0.5, 0.5 + 2**-40, 0.3, 0.6401411997932241, 0.9, 0.95, 0.99, 1 - 1e-10,
                               1 - 2**-53, 0.1, 0.0999999, 1e-5, 1e-20, 1e-100, 1e-300, 1e-310, 5e-324])
def test_normal_quantile_to_double_precision(p):
    # A row [-1, 1] has mean 0 and std 1: theta is PhiInv(p) itself.
    x = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    _, theta, _, _ = torch.ops.fastloss.stat_topk(x, -1, p)
    ref = quantile(p)
    assert theta.item() == pytest.approx(ref, rel=5e-16, abs=1e-300)


def test_normal_quantile_random():
    g = torch.Generator().manual_seed(1)
    ps = torch.cat([torch.rand(40, generator=g, dtype=torch.float64),
                    10 ** (-300 * torch.rand(20, generator=g, dtype=torch.float64))]).tolist()
    x = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    for p in ps:
        _, theta, _, _ = torch.ops.fastloss.stat_topk(x, -1, p)
        assert theta.item() == pytest.approx(quantile(p), rel=5e-16), p


# --------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("shape,dim", [((16, 1000), -1), ((3, 7), -1), ((5, 4100), 1), ((300, 6), 0),
                                       ((4, 50, 6), 1), ((2, 3, 40), 0), ((1, 1), -1)])
def test_forward_matches_reference(device, dtype, mode, shape, dim):
    x = random_rows(shape, dtype, device)
    y, theta = fastloss.stat_topk(x, sparsity=0.8, dim=dim, mode=mode, return_threshold=True)
    assert y.dtype == dtype and y.shape == x.shape
    assert theta.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x64 = x.double().cpu()
    y_ref, theta_ref = reference(x64, 0.8, dim, mode == "hard")
    scale = x64.std(dim, keepdim=True, unbiased=False) + x64.abs().mean(dim, keepdim=True)
    stat_tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert torch.all((theta.cpu().double() - theta_ref).abs() <= stat_tol * scale + 1e-300)
    # Entries within the statistics' error of theta may fall on either side.
    decided = (x64 - theta_ref).abs() > 2 * stat_tol * scale
    err = (y.cpu().double() - y_ref).abs()
    assert torch.all(err[decided.expand_as(err)] <= EPS[dtype] * (y_ref.abs() + scale.expand_as(err))[decided.expand_as(err)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_equals_sparsity(device, dtype):
    x = random_rows((8, 512), dtype, device)
    a = fastloss.stat_topk(x, k=26)
    b = fastloss.stat_topk(x, sparsity=1 - 26 / 512)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_k_under_transforms_and_autograd(device):
    # k reaches the ops as k (they resolve 1 - k/d): every rule that needs the quantile
    # (backward, forward-mode, batching) must resolve it the same way.
    x = random_rows((3, 40), torch.float64, device)
    t = torch.randn_like(x)
    up = random_rows((3, 40), torch.float64, device, seed=3)
    by_k = {"stat_topk": lambda v, u=up: fastloss.stat_topk(v, k=7),
            "gelu_mul": lambda v, u=up: fastloss.stat_topk_gelu_mul(v, u, k=7)}
    by_s = {"stat_topk": lambda v, u=up: fastloss.stat_topk(v, sparsity=1 - 7 / 40),
            "gelu_mul": lambda v, u=up: fastloss.stat_topk_gelu_mul(v, u, 1 - 7 / 40)}
    for name in by_k:
        f, g = by_k[name], by_s[name]
        torch.testing.assert_close(torch.func.jvp(f, (x,), (t,)), torch.func.jvp(g, (x,), (t,)), rtol=0, atol=0)
        rows = (x[:, None], up[:, None])
        torch.testing.assert_close(torch.func.vmap(f)(*rows), torch.func.vmap(g)(*rows), rtol=0, atol=0)
        torch.testing.assert_close(torch.func.grad(lambda v: (f(v) * t).sum())(x),
                                   torch.func.grad(lambda v: (g(v) * t).sum())(x), rtol=0, atol=0)
        hvp = [torch.func.jvp(torch.func.grad(lambda v: f_(v).square().sum()), (x,), (t,))[1] for f_ in (f, g)]
        torch.testing.assert_close(hvp[0], hvp[1], rtol=0, atol=0)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        (f(xa) * t).sum().backward()
        (g(xb) * t).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


def test_non_contiguous(device):
    base = random_rows((64, 300), torch.float32, device)
    x = base.t()  # rows along dim 1 are strided
    y = fastloss.stat_topk(x, sparsity=0.9, dim=1)
    torch.testing.assert_close(y, fastloss.stat_topk(x.contiguous(), sparsity=0.9, dim=1))
    y_ref, _ = reference(x.double().cpu(), 0.9, 1)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_do_not_cancel(device, dtype):
    # Mean 1e4, std 1: a float32 sum of squares would lose every digit of the variance.
    g = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(4, 20000, generator=g, dtype=torch.float64)).to(dtype).to(device)
    _, theta = fastloss.stat_topk(x, sparsity=0.9, return_threshold=True)
    _, theta_ref = reference(x.double().cpu(), 0.9)
    std = x.double().cpu().std(-1, keepdim=True, unbiased=False)
    assert torch.all((theta.double().cpu() - theta_ref).abs() <= 1e-3 * std)


@pytest.mark.parametrize("n", [127, 1000, 5000])
@pytest.mark.parametrize("dim", [-1, 0])
def test_statistics_large_common_offset(device, n, dim):
    # Rows of 3e7 + N(0, 1) in float32: a plain sum of the values rounds at the offset's scale
    # (the mean was off by tens of units, and the std by as much), the shifted sums do not.
    g = torch.Generator().manual_seed(n)
    x = (3e7 + torch.randn(4, n, generator=g, dtype=torch.float64)).float()
    if dim == 0:
        x = x.t().contiguous()
    x = x.to(device)
    _, theta = fastloss.stat_topk(x, sparsity=0.95, dim=dim, return_threshold=True)
    _, theta_ref = reference(x.double().cpu().movedim(dim, -1), 0.95)
    theta = theta.double().cpu().reshape(theta_ref.shape)
    std = x.double().cpu().movedim(dim, -1).std(-1, keepdim=True, unbiased=False)
    ulp = 2.0  # float32 spacing at 3e7: the mean itself is rounded to it
    assert torch.all((theta - theta_ref).abs() <= 2 * ulp + 0.05 * std), (theta - theta_ref).abs().max()
    if dim == -1:  # the fused activation shares the threshold
        y = fastloss.stat_topk_gelu_mul(x, torch.ones_like(x), 0.95)
        assert torch.equal(y > 0, x > theta.to(device).float().reshape(4, 1))


@pytest.mark.parametrize("shape,dim", [((4, 5000), -1), ((20000, 3), 0), ((3, 5000, 2), 1)], ids=str)
def test_std_with_a_large_common_offset_over_merged_parts(device, shape, dim):
    # 1e7 + N(0, 1) in float32: each part's mean is rounded to 1 (the float32 spacing there), and
    # Chan's merge squares the difference of two parts' means. Without the means' rounding
    # errors the std came out 2e-4 to 4e-3 off on the CPU (parts of 2048 or 256 entries), 2-7%
    # in the CUDA kernels (parts of 8).
    g = torch.Generator().manual_seed(sum(shape))
    x = (1e7 + torch.randn(shape, generator=g, dtype=torch.float64)).float().to(device)
    _, theta, mean, sd = torch.ops.fastloss.stat_topk(x, dim, 0.9, False, True, 0)
    xd = x.double().cpu()
    ref_sd, ref_mean = xd.std(dim, correction=0).flatten(), xd.mean(dim).flatten()
    assert ((sd.double().cpu().flatten() - ref_sd).abs() / ref_sd).max().item() <= 1e-5
    assert ((mean.double().cpu().flatten() - ref_mean).abs() / ref_mean).max().item() <= 1e-7


@pytest.mark.parametrize("position", [0, 2048, 5000])
@pytest.mark.parametrize("dim", [-1, 0])
def test_statistics_with_an_outlier(device, position, dim):
    # A far outlier where a chunk's sums take their shift (its first value: positions 0 and
    # 2048 on the last-dim path, 0 on the strided one) made the mean's terms round at the
    # outlier's scale: theta 1.7e-3 off relative. The deviations from that first mean correct it.
    g = torch.Generator().manual_seed(position)
    x = torch.empty(2, 16384, dtype=torch.float64).uniform_(-50, 50, generator=g)
    x[:, position] = 1e8
    x = x.float()
    xd = x.double()
    mean, std = xd.mean(-1, keepdim=True), xd.std(-1, unbiased=False, keepdim=True)
    sparsity = float(torch.special.ndtr(-(mean / std))[0, 0])  # theta near 0, inside the bulk
    xs = (x if dim == -1 else x.t().contiguous()).to(device)
    y, theta = fastloss.stat_topk(xs, sparsity=sparsity, mode="hard", dim=dim, return_threshold=True)
    _, theta_ref = reference(xd, sparsity)
    theta = theta.double().cpu().reshape(theta_ref.shape)
    # float32 rounding of the mean (~6e3: ulp 5e-4) and of the std's product (~1e6: ulp 0.06)
    assert torch.all((theta - theta_ref).abs() <= 0.25), (theta - theta_ref).abs().max()
    kept = (y != 0).sum(dim).cpu()
    kept_ref = (xd > theta_ref).sum(-1)
    assert torch.all((kept - kept_ref).abs() <= 50), (kept, kept_ref)  # 164 entries per unit near theta


@pytest.mark.parametrize("dim", [-1, 0])
def test_statistics_of_long_rows(device, dim):
    # 2e6 entries: chunks merge in groups, then groups into the row (one running merge over
    # thousands of chunks put ~70 ulp into theta along dim 0).
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 2_000_000, generator=g)
    xs = (x if dim == -1 else x.t().contiguous()).to(device)
    _, theta = fastloss.stat_topk(xs, sparsity=0.9, dim=dim, return_threshold=True)
    _, theta_ref = reference(x.double(), 0.9)
    ulp = theta_ref.abs() * 2.0**-23
    assert torch.all((theta.double().cpu().reshape(theta_ref.shape) - theta_ref).abs() <= 4 * ulp)


@pytest.mark.parametrize("fused", [False, True], ids=["stat_topk", "gelu_mul"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_gradient_of_long_rows(device, dim, fused):
    """The backward's row sums of g [x > theta] run in levels: a constant cotangent (a mean's)
    over 2e6 entries put 7e-5 relative error into the gradient on the last dim and 9e-3 along
    dim 0 with one running sum per lane or column."""
    if fused and dim == 0:
        pytest.skip("stat_topk_gelu_mul works on the last dim")
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 1_000_000, generator=g)
    up = torch.rand(2, 1_000_000, generator=g)
    if dim == 0:
        x = x.t().contiguous()
    xs = x.to(device).requires_grad_()
    out = fastloss.stat_topk_gelu_mul(xs, up.to(device), 0.5) if fused else fastloss.stat_topk(xs, sparsity=0.5, dim=dim)
    (grad,) = torch.autograd.grad(out.mean(), xs)
    x64 = x.double().requires_grad_()
    z = torch.special.ndtri(torch.tensor(0.5, dtype=torch.float64))
    gate = torch.relu(x64 - (x64.mean(dim, keepdim=True) + x64.std(dim, unbiased=False, keepdim=True) * z))
    ref_out = torch.nn.functional.gelu(gate, approximate="tanh") * up.double() if fused else gate
    (ref,) = torch.autograd.grad(ref_out.mean(), x64)
    err = (grad.double().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 2e-6, err


def test_nan_row_forward_mode_is_nan(device):
    """Forward mode through theta on a row holding NaN is NaN, as the eager formula's (the
    row's std is NaN, not 0: a constant row's rule must not take it)."""
    x = torch.tensor([[0.3, float("nan"), -1.2, 2.0], [0.3, 0.5, -1.2, 2.0]], dtype=torch.float64, device=device)
    theta = lambda t: fastloss.stat_topk(t, sparsity=0.7, return_threshold=True)[1]  # noqa: E731
    z = torch.special.ndtri(torch.tensor(0.7, dtype=torch.float64))
    eager = lambda t: t.mean(-1, keepdim=True) + t.std(-1, unbiased=False, keepdim=True) * z  # noqa: E731
    fwd = torch.func.jacfwd(theta)(x)
    assert torch.isnan(fwd[0]).all()
    torch.testing.assert_close(fwd, torch.func.jacfwd(eager)(x), equal_nan=True)
    soft = torch.func.jacfwd(lambda t: fastloss.stat_topk(t, sparsity=0.7))(x)
    torch.testing.assert_close(soft, torch.func.jacfwd(lambda t: torch.relu(t - eager(t)))(x), equal_nan=True)
    up = torch.randn(2, 4, dtype=torch.float64, device=device)
    fused = torch.func.jacfwd(lambda t: fastloss.stat_topk_gelu_mul(t, up, 0.7))(x)
    eager_fused = lambda t: torch.nn.functional.gelu(torch.relu(t - eager(t)), approximate="tanh") * up  # noqa: E731
    torch.testing.assert_close(fused, torch.func.jacfwd(eager_fused)(x), equal_nan=True)
    # With theta a constant, the gate's derivatives on that row are 0 both ways.
    fixed = lambda t: fastloss.stat_topk_gelu_mul(t, up, 0.7, threshold_grad=False)  # noqa: E731
    fwd, rev = (jac(fixed)(x) for jac in (torch.func.jacfwd, torch.func.jacrev))
    torch.testing.assert_close(fwd, rev, equal_nan=True)
    assert (fwd[0, :, 0] == 0).all()
    # The op's std of a NaN row is NaN on both paths: one chunk, and chunks merged.
    for n in (4, 5000):
        row = torch.randn(1, n, dtype=torch.float64, device=device)
        row[0, 1] = math.nan
        std = torch.ops.fastloss.stat_topk.default(row, 1, 0.7, 0, False)[3]
        assert torch.isnan(std).all()


def test_nan_row_gradient_is_nan_where_theta_is_live(device):
    # Soft mode (and the gelu-mul) with threshold_grad: the outputs reach theta, and the eager
    # formula's gradient of a row holding NaN is NaN (it was 0: nothing kept, so the theta term
    # was dropped). Other rows are unaffected.
    x = torch.tensor([[0.3, -1.2, float("nan"), 2.0, 0.7], [0.3, -1.2, 1.0, 2.0, 0.7]], dtype=torch.float64,
                     device=device, requires_grad=True)
    up = torch.randn(2, 5, dtype=torch.float64, device=device)
    for fn in (lambda t: fastloss.stat_topk(t, sparsity=0.8), lambda t: fastloss.stat_topk_gelu_mul(t, up, 0.8)):
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        assert torch.isnan(grad[0]).all()
        assert torch.isfinite(grad[1]).all()
    xr = x.detach().clone().requires_grad_()
    z = torch.special.ndtri(torch.tensor(0.8, dtype=torch.float64))
    theta = xr.mean(-1, keepdim=True) + xr.std(-1, unbiased=False, keepdim=True) * z
    (eager,) = torch.autograd.grad(torch.relu(xr - theta).sum(), xr)
    assert torch.isnan(eager[0]).all()
    (grad,) = torch.autograd.grad(fastloss.stat_topk(x, sparsity=0.8).sum(), x)
    torch.testing.assert_close(grad[1], eager[1])


def test_gradient_finite_where_true_gradient_is(device):
    # No gradient reaching theta (hard mode, threshold_grad=False): a NaN row's direct
    # gradients stay 0 instead of 0 * NaN; a tiny std (1 / std overflows) and deviations beyond
    # the largest float give the finite gradient of the float64 formula.
    x = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], device=device, requires_grad=True)
    for tg in (True, False):
        y = fastloss.stat_topk(x, sparsity=0.6, mode="hard", threshold_grad=tg)
        assert torch.equal(torch.autograd.grad(y.sum(), x)[0][0].cpu(), torch.zeros(4))
    z = torch.special.ndtri(torch.tensor(0.7, dtype=torch.float64))
    for row in ([0.0, 0.0, 0.0, 1e-44], [0.0, 0.0, 1e-39, 2e-39], [3e38, 3e38, 3e38, -3e38]):
        x = torch.tensor([row], device=device, requires_grad=True)
        y, theta = fastloss.stat_topk(x, sparsity=0.7, return_threshold=True)
        got = torch.autograd.grad(y.sum() + theta.sum(), x)[0].double().cpu()
        xd = x.detach().double().cpu().requires_grad_()
        t = xd.mean(-1, keepdim=True) + xd.std(-1, keepdim=True, unbiased=False) * z
        expected = torch.autograd.grad(torch.relu(xd - t).sum() + t.sum(), xd)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        (dgate,) = torch.autograd.grad(fastloss.stat_topk_gelu_mul(x, torch.ones_like(x), 0.7).sum(), x)
        assert torch.isfinite(dgate).all()


def test_kept_fraction_on_gaussian_rows(device):
    x = torch.randn(32, 16384, generator=torch.Generator().manual_seed(4)).to(device)
    for sparsity in (0.5, 0.9, 0.95, 0.99):
        kept = (fastloss.stat_topk(x, sparsity=sparsity) > 0).float().mean().item()
        assert abs(kept - (1 - sparsity)) <= 0.1 * (1 - sparsity), (sparsity, kept)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_constant_and_nan_rows(device, mode):
    x = random_rows((4, 64), torch.float32, device)
    x[1] = 2.5  # constant row
    x[2, 10] = float("nan")
    x = x.requires_grad_()
    y, theta = fastloss.stat_topk(x, sparsity=0.9, mode=mode, return_threshold=True)
    assert torch.all(y[1] == 0) and theta[1].item() == 2.5
    if mode == "soft":
        assert torch.all(torch.isnan(y[2]))
    else:
        assert torch.isnan(y[2, 10]) and torch.all(y[2, torch.arange(64, device=device) != 10] == 0)
    y_ref, _ = reference(x.detach().double().cpu(), 0.9, hard=mode == "hard")
    for r in (0, 3):
        torch.testing.assert_close(y[r].double().cpu(), y_ref[r], rtol=1e-5, atol=1e-5)
    (y[[0, 1, 3]].sum() + theta[[0, 1, 3]].sum()).backward()
    assert torch.all(torch.isfinite(x.grad[[0, 1, 3]]))
    # Constant row: nothing kept, so only theta's gradient reaches it: d theta / dx = 1/d.
    torch.testing.assert_close(x.grad[1], torch.full_like(x.grad[1], 1 / 64))


@pytest.mark.parametrize("n", [2, 12, 13, 1000, 5000, 40000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_rows_are_exact(device, n, dtype):
    # 1.7 is not a power of two: a rounded sum would give mean != 1.7 and std > 0, and with
    # z < 0 every entry would be "kept". The min/max of the row pin std to exactly 0.
    x = torch.full((3, n), 1.7, dtype=dtype, device=device).requires_grad_()
    for dim in (-1, 0):
        y, theta = fastloss.stat_topk(x, sparsity=0.05, dim=dim, return_threshold=True)
        assert torch.all(y == 0)
        assert torch.all(theta == torch.tensor(1.7, dtype=dtype).to(theta.dtype))
        (dx,) = torch.autograd.grad(y.sum() + theta.sum(), x)
        size = x.shape[dim]
        torch.testing.assert_close(dx, torch.full_like(x, 1 / size))


@pytest.mark.parametrize("scale", [1e-35, 1e-20, 1e15, 1e18, 1e30, 1e33])
@pytest.mark.parametrize("shape,dim", [((3, 20000), -1), ((5, 300), -1), ((20000, 3), 0), ((300, 5), 0)])
def test_extreme_magnitudes(device, scale, shape, dim):
    # Squared deviations are kept in units of the row's spread, so float32 statistics neither
    # overflow (unscaled, a row of 1e18 sums to ~1e40) nor underflow (1e-35 squares to 0).
    x = (random_rows(shape, torch.float64, "cpu", seed=3) * scale).float()
    y, theta = fastloss.stat_topk(x.to(device), sparsity=0.9, dim=dim, return_threshold=True)
    y_ref, theta_ref = reference(x.double(), 0.9, dim=dim)
    torch.testing.assert_close(theta.double().cpu(), theta_ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("scale", [2e36, 1e37, 1e38])
@pytest.mark.parametrize("shape,dim", [((4, 8000), -1), ((3, 50000), -1), ((8000, 4), 0), ((300, 5), 0)])
def test_rows_whose_sum_overflows(device, scale, shape, dim):
    # Finite values whose plain float32 sum overflows (an offset far above the spread): the
    # mean comes from the values scaled by a power of two instead of inf (NaN statistics).
    g = torch.Generator().manual_seed(11)
    x = (scale * (1 + 0.02 * torch.randn(shape, generator=g, dtype=torch.float64))).float()
    assert torch.isfinite(x).all() and not torch.isfinite(x.sum(dim)).all()
    y, theta = fastloss.stat_topk(x.to(device), sparsity=0.9, dim=dim, return_threshold=True)
    y_ref, theta_ref = reference(x.double(), 0.9, dim=dim)
    torch.testing.assert_close(theta.double().cpu(), theta_ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_near_the_largest_float(device, dtype):
    # The rescaled mean's power of two stays normal for values up to the largest float.
    big = torch.finfo(dtype).max
    rows = [[0.6 * big, 0.6 * big, -0.3 * big, -0.3 * big], [0.9 * big, 0.9 * big, 0.9 * big, 0.85 * big],
            [0.9 * big] * 7 + [0.5 * big]]
    for row in rows:
        x = torch.tensor(row, dtype=dtype)
        y, theta = fastloss.stat_topk(x.to(device), sparsity=0.7, return_threshold=True)
        y_ref, theta_ref = reference(x.to(torch.float64) if dtype == torch.float32 else x, 0.7)
        if dtype == torch.float64:  # the float64 reference's own sum overflows: use exact fractions
            from fractions import Fraction
            vals = [Fraction(v) for v in x.tolist()]
            mu = sum(vals) / len(vals)
            var = sum((v - mu) ** 2 for v in vals) / len(vals)
            std = big * math.sqrt(float(var / Fraction(big) ** 2))
            theta_ref = torch.tensor([float(mu) + std * quantile(0.7)], dtype=torch.float64)
            y_ref = torch.relu(x - theta_ref)
        torch.testing.assert_close(theta.double().cpu().flatten(), theta_ref.double().flatten(), rtol=1e-6, atol=0)
        torch.testing.assert_close(y.double().cpu(), y_ref.double(), rtol=1e-6, atol=1e-6 * big)


@pytest.mark.parametrize("shape,dim", [((4, 8), -1), ((3, 50000), -1), ((8, 4), 0), ((50000, 3), 0)])
def test_spread_beyond_the_largest_float(device, shape, dim):
    # Finite float32 rows whose max - min overflows (+-2e38, +-3e38): deviations from the mean
    # are scaled before they are formed. theta was inf (every entry dropped) where the
    # statistics are finite.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1e37
    ends = torch.tensor([3e38, -3e38, 2e38, -2e38], dtype=torch.float64)
    if dim == -1:
        x[:, : len(ends)] = ends[: x.shape[1]]
    else:
        x[: len(ends), :] = ends[: x.shape[0], None]
    x = x.float()
    assert torch.isfinite(x).all()
    y, theta = fastloss.stat_topk(x.to(device), sparsity=0.8, dim=dim, return_threshold=True)
    y_ref, theta_ref = reference(x.double(), 0.8, dim=dim)
    assert torch.isfinite(theta).all()
    torch.testing.assert_close(theta.double().cpu(), theta_ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=0, atol=1e-5 * 3e38)


def test_nan_in_an_otherwise_constant_row(device):
    # min/max may skip the NaN, so the row looks constant to them: the NaN mean must still win.
    for size in (3, 3000):
        for pos in (0, 1, size - 1):
            x = torch.ones(2, size, device=device)
            x[0, pos] = math.nan
            y, theta = fastloss.stat_topk(x, sparsity=0.5, return_threshold=True)
            assert torch.isnan(theta[0]).all() and torch.isnan(y[0]).all(), (size, pos)
            assert theta[1].item() == 1.0


def test_rows_of_infinities_have_nan_threshold(device):
    # std of [inf] (or [inf, inf]) is NaN in torch, so theta is NaN, not inf.
    for row in ([math.inf], [math.inf, math.inf], [-math.inf], [-math.inf] * 3):
        x = torch.tensor([row], device=device)
        y, theta = fastloss.stat_topk(x, sparsity=0.5, return_threshold=True)
        assert torch.isnan(theta).all() and torch.isnan(y).all(), row


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_long_strided_columns_keep_float32_accuracy(device, mode):
    # Statistics over a non-last dimension of 200001 entries: chunked and merged, as accurate
    # as along the last dimension (one float accumulator per column lost 4e-5 relative).
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(200001, 3, generator=g, dtype=torch.float64) * 0.1 + 100).float()
    y, theta = fastloss.stat_topk(x.to(device), sparsity=0.5, dim=0, mode=mode, return_threshold=True)
    _, theta_ref = reference(x.double(), 0.5, dim=0)
    torch.testing.assert_close(theta.double().cpu(), theta_ref, rtol=1e-6, atol=0)
    _, theta_last = fastloss.stat_topk(x.t().contiguous().to(device), sparsity=0.5, mode=mode, return_threshold=True)
    torch.testing.assert_close(theta.double().cpu().flatten(), theta_last.double().cpu().flatten(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("pattern", ["constant half", "period 256"])
def test_constant_chunks_of_huge_values(device, pattern):
    # Parts of a row that are constant (a CPU chunk, or CUDA groups of values 256 apart) take
    # their exact value as mean: the rounded mean's squared deviations would overflow at 3e30.
    g = torch.Generator().manual_seed(5)
    if pattern == "constant half":
        x = torch.cat([torch.full((2, 8192), 3e30, dtype=torch.float64), torch.randn(2, 8192, generator=g, dtype=torch.float64) * 1e30], 1)
    else:
        x = (torch.randn(2, 256, generator=g, dtype=torch.float64) * 3e30).repeat(1, 64)
    x = x.float()
    y, theta = fastloss.stat_topk(x.to(device), sparsity=0.9, return_threshold=True)
    _, theta_ref = reference(x.double(), 0.9)
    torch.testing.assert_close(theta.double().cpu(), theta_ref, rtol=2e-5, atol=0)


def test_empty_and_scalar(device):
    for shape in [(0, 5), (5, 0), (0,)]:
        x = torch.randn(shape, device=device)
        y = fastloss.stat_topk(x, sparsity=0.5)
        assert y.shape == x.shape
    x = torch.tensor(1.5, device=device)
    y, theta = fastloss.stat_topk(x, sparsity=0.5, return_threshold=True)
    assert y.shape == () and y.item() == 0 and theta.shape == ()


# --------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_gradcheck(device, mode, dim):
    # threshold_grad=False is not the derivative of the function, so it is checked against
    # the reference with a detached theta instead (below).
    x = random_rows((3, 17, 5), torch.float64, device).requires_grad_()

    def f(t):
        return fastloss.stat_topk(t, sparsity=0.7, dim=dim, mode=mode, return_threshold=True)

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold_grad", [True, False])
def test_backward_matches_autograd_of_reference(device, dtype, threshold_grad):
    x = random_rows((6, 3000), dtype, device).requires_grad_()
    g = torch.randn(6, 3000, generator=torch.Generator().manual_seed(5), dtype=dtype).to(device)
    gt = torch.randn(6, 1, generator=torch.Generator().manual_seed(6), dtype=dtype).to(device)
    y, theta = fastloss.stat_topk(x, sparsity=0.9, return_threshold=True, threshold_grad=threshold_grad)
    grads = [g, gt.to(theta.dtype)] if threshold_grad else [g]
    (dx,) = torch.autograd.grad([y, theta] if threshold_grad else [y], x, grads)
    x64 = x.detach().double().cpu().requires_grad_()
    y_ref, theta_ref = reference(x64, 0.9, threshold_grad=threshold_grad)
    outs = [y_ref, theta_ref] if threshold_grad else [y_ref]
    (dx_ref,) = torch.autograd.grad(outs, x64, [t.double().cpu() for t in grads])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(dx.double().cpu(), dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())


@pytest.mark.parametrize("case", ["theta", "soft", "gelu_mul"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_float32_gradient_through_theta_with_a_large_offset(device, case, dim):
    # Rows 1e4 + O(1): the saved float32 mean is up to half an ulp of 1e4 (5e-4) off the true
    # one, and every x - mean by as much; the backward takes the deviations' row mean out
    # (the chain rule through the mean inside the std), as eager float32 autograd does. The
    # rows have two clusters with theta in the gap between, so that no entry is near theta.
    if case == "gelu_mul" and dim == 0:
        pytest.skip("the gelu-mul runs along the last dimension")
    g = torch.Generator().manual_seed(31)
    n, rows = 256, 3
    low = -0.3 + 0.1 * torch.randn(rows, n, generator=g, dtype=torch.float64)
    high = 2.7 + 0.1 * torch.randn(rows, n, generator=g, dtype=torch.float64)
    x64 = 1e4 + torch.where(torch.arange(n) < 26, high, low)
    if dim == 0:
        x64 = x64.t().contiguous()
    x64 = x64.float().double()  # float32 values
    w = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    z = statistics.NormalDist().inv_cdf(0.9)

    def fused(x):
        if case == "theta":
            return fastloss.stat_topk(x, sparsity=0.9, dim=dim, mode="hard", return_threshold=True)[1].sum()
        if case == "soft":
            return (fastloss.stat_topk(x, sparsity=0.9, dim=dim) * w.to(x)).sum()
        return (fastloss.stat_topk_gelu_mul(x, w.to(x), 0.9) * w.to(x)).sum()

    def eager(x):
        mean = x.mean(dim, keepdim=True)
        theta = mean + z * (x - mean).square().mean(dim, keepdim=True).sqrt()
        if case == "theta":
            return theta.sum()
        if case == "soft":
            return (torch.relu(x - theta) * w.to(x)).sum()
        return (torch.nn.functional.gelu(torch.relu(x - theta), approximate="tanh") * w.to(x) ** 2).sum()

    def grad_of(loss, x):
        x = x.to(device).requires_grad_()
        return torch.autograd.grad(loss(x), x)[0].double().cpu()

    ref = grad_of(fused, x64)
    err, eager_err = (((grad_of(f, x64.float()) - ref).abs().max() / ref.abs().max()).item() for f in (fused, eager))
    # theta: 1.3e-4 before (eager 2.0e-7); soft: 4e-6; the gelu-mul 1.7e-5, twice eager's
    # (whose own error there is float32 theta's rounding inside relu(x - theta)).
    assert err <= 1.5 * eager_err + 1e-6, (err, eager_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["stat_topk", "gelu_mul"])
def test_backward_over_an_owned_gradient(dtype, fused):
    # A gradient that only autograd holds (from the loss's multiply) is written over (dx, or
    # the gelu-mul's d up): the same bits as the backward into fresh tensors, whose gradient
    # the caller holds.
    for shape, dim, mode, threshold_grad in [((37, 1000), -1, "soft", True), ((37, 1000), -1, "hard", True),
                                             ((6, 7), -1, "soft", False), ((300, 6), 0, "soft", True)]:
        if fused and dim != -1:
            continue
        xs = [random_rows(shape, dtype, "cpu", seed=s) for s in (21, 22)]
        w = random_rows(shape, dtype, "cpu", seed=23)

        def loss(ins, grad_outputs=None):
            if fused:
                out = fastloss.stat_topk_gelu_mul(*ins, 0.9, threshold_grad=threshold_grad)
                return torch.autograd.grad(out, ins, grad_outputs) if grad_outputs is not None else (out * w).sum()
            y, theta = fastloss.stat_topk(ins[0], sparsity=0.9, dim=dim, mode=mode, return_threshold=True,
                                          threshold_grad=threshold_grad)
            if not threshold_grad:  # theta is a constant
                return torch.autograd.grad(y, ins, grad_outputs) if grad_outputs is not None else (y * w).sum()
            if grad_outputs is not None:
                return torch.autograd.grad([y, theta], ins, [grad_outputs, torch.ones_like(theta)])
            return (y * w).sum() + theta.sum()

        ins = [t.clone().requires_grad_() for t in xs[: 2 if fused else 1]]
        assert ran_in_place(lambda: loss(ins).backward()), (shape, dim, mode)
        held = [t.clone().requires_grad_() for t in xs[: 2 if fused else 1]]
        expected = loss(held, w.clone())
        for got, want in zip(ins, expected):
            assert torch.equal(got.grad, want), (shape, dim, mode)


@pytest.mark.parametrize("fused", [False, True], ids=["stat_topk", "gelu_mul"])
def test_backward_leaves_gradients_held_elsewhere(fused):
    def inputs(seed):
        return [random_rows((4, 300), torch.float32, "cpu", seed=seed + i).requires_grad_() for i in range(1 + fused)]

    def f(ins):
        return fastloss.stat_topk_gelu_mul(*ins, 0.9) if fused else fastloss.stat_topk(ins[0], sparsity=0.9)

    w = torch.randn(4, 300)

    def check_grads(ins, grad_output):
        expected = torch.autograd.grad(f(ins), ins, grad_output)
        for t, want in zip(ins, expected):
            assert torch.equal(t.grad, want)
            t.grad = None

    ins, ins2 = inputs(24), inputs(26)
    # Passed by the caller.
    g = w.clone()
    assert not ran_in_place(lambda: torch.autograd.grad(f(ins), ins, g))
    assert torch.equal(g, w)
    # Owned but not contiguous (the multiply's gradient takes the transposed weight's strides).
    w_t = w.t().contiguous().t()
    assert not ran_in_place(lambda: (f(ins) * w_t).sum().backward())
    check_grads(ins, w_t)
    # One gradient handed to two nodes: the first leaves it intact for the second.
    ((f(ins) + f(ins2)) * w).sum().backward()
    check_grads(ins, w)
    check_grads(ins2, w)


# --------------------------------------------------------------------------------------------
# Fused Gemma 3n activation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 2048), (2, 3, 257), (1, 5)])
def test_gelu_mul_matches_reference(device, dtype, shape):
    gate = random_rows(shape, dtype, device, seed=7)
    up = random_rows(shape, dtype, device, seed=8)
    out = fastloss.stat_topk_gelu_mul(gate, up, 0.95)
    ref = gelu_mul_reference(gate.double().cpu(), up.double().cpu(), 0.95)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_gelu_mul_gradcheck(device):
    gate = random_rows((3, 40), torch.float64, device, seed=9).requires_grad_()
    up = random_rows((3, 40), torch.float64, device, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fastloss.stat_topk_gelu_mul(a, b, 0.6), (gate, up))


@pytest.mark.parametrize("threshold_grad", [True, False])
def test_gelu_mul_backward_matches_reference_fp32(device, threshold_grad):
    gate = random_rows((4, 4096), torch.float32, device, seed=11).requires_grad_()
    up = random_rows((4, 4096), torch.float32, device, seed=12).requires_grad_()
    g = torch.randn(4, 4096, generator=torch.Generator().manual_seed(13)).to(device)
    out = fastloss.stat_topk_gelu_mul(gate, up, k=200, threshold_grad=threshold_grad)
    dgate, dup = torch.autograd.grad(out, (gate, up), g)
    gate64 = gate.detach().double().cpu().requires_grad_()
    up64 = up.detach().double().cpu().requires_grad_()
    sparse = reference(gate64, 1 - 200 / 4096, threshold_grad=threshold_grad)[0]
    ref = F.gelu(sparse, approximate="tanh") * up64
    dgate_ref, dup_ref = torch.autograd.grad(ref, (gate64, up64), g.double().cpu())
    for a, b in ((dgate, dgate_ref), (dup, dup_ref)):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_gelu_mul_float32_gelu_derivative_where_the_sigmoid_nears_1(device):
    """gelu'(h) = s + 2 h s (1 - s) du/dh, s = sigmoid(2u): 1 - s formed by subtraction cancels
    once s nears 1 (h >~ 1); the float32 derivative was up to 2e-6 off at h in [1, 6), torch's
    up to 1e-6. Nearly every entry kept, up = 1, the threshold held constant: d gate = gelu'(h)."""
    gen = torch.Generator().manual_seed(21)
    n = 4096
    gate = (torch.randn(64, n, generator=gen) * 2).to(device)
    theta = fastloss.stat_topk(gate, k=n - 1, return_threshold=True)[1]
    g = gate.clone().requires_grad_()
    out = fastloss.stat_topk_gelu_mul(g, torch.ones_like(gate), k=n - 1, threshold_grad=False)
    got = torch.autograd.grad(out, g, torch.ones_like(gate))[0].double().cpu()
    h = torch.relu(gate - theta).double().cpu().requires_grad_()  # the h the kernels form
    ref = torch.autograd.grad(F.gelu(h, approximate="tanh").sum(), h)[0]
    band = (gate > theta).cpu() & (h.detach() >= 1) & (h.detach() < 6)
    assert band.sum() > 10000
    assert (got - ref)[band].abs().max().item() < 6e-7


@pytest.mark.parametrize("rows,cols", [(37, 5), (9, 1000), (3, 32768), (2, 40000), (2, 2**20 + 5)])
def test_float16_is_the_float_kernel_rounded_once(rows, cols):
    # On the CPU, float16 rows go through float in blocks (hardware conversions, the float
    # kernel, one rounding back): the thread's kept buffers for rows of up to 32768, buffers
    # for the call alone beyond; rows of more than 2^20 entries convert entry by entry in the
    # kernels instead. Either way the result is the float kernel's rounded once, to the bit.
    ops = torch.ops.fastloss
    gen = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=gen) * 3).half()
    up = torch.randn(rows, cols, generator=gen).half()
    g = torch.randn(rows, cols, generator=gen).half()
    gt = torch.randn(rows, 1, generator=gen)
    x[-1, 1] = math.nan  # poisons its own row only

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    for hard in (False, True):
        y, theta, mean, std = ops.stat_topk(x, -1, 0.9, hard)
        y32, theta32, mean32, std32 = ops.stat_topk(x.float(), -1, 0.9, hard)
        same(y, y32.half())
        for a, b in ((theta, theta32), (mean, mean32), (std, std32)):
            same(a, b)
        for grad_theta, threshold_grad in ((gt, True), (None, False)):
            dx = ops.stat_topk_backward(g, grad_theta, x, theta, mean, std, -1, 0.9, hard, threshold_grad)
            dx32 = ops.stat_topk_backward(g.float(), grad_theta, x.float(), theta, mean, std, -1, 0.9, hard,
                                          threshold_grad)
            same(dx, dx32.half())
    out, theta, mean, std = ops.stat_topk_gelu_mul(x, up, 0.8)
    out32, theta32, _, _ = ops.stat_topk_gelu_mul(x.float(), up.float(), 0.8)
    same(out, out32.half())
    same(theta, theta32)
    for threshold_grad in (True, False):
        dgate, dup = ops.stat_topk_gelu_mul_backward(g, x, up, theta, mean, std, 0.8, threshold_grad)
        dgate32, dup32 = ops.stat_topk_gelu_mul_backward(g.float(), x.float(), up.float(), theta, mean, std, 0.8,
                                                         threshold_grad)
        same(dgate, dgate32.half())
        same(dup, dup32.half())


@pytest.mark.parametrize("shape,dim", [((1000, 5), 0), ((4, 3000, 3), 1)])
def test_float16_along_other_dims_is_the_float_kernel_rounded_once(shape, dim):
    # Along a non-last dim the CPU converts float16 entry by entry in the kernels: still the
    # float kernel's result rounded once, to the bit.
    ops = torch.ops.fastloss
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen) * 3).half()
    g = torch.randn(shape, generator=gen).half()
    for hard in (False, True):
        y, theta, mean, std = ops.stat_topk(x, dim, 0.9, hard)
        y32, theta32, _, _ = ops.stat_topk(x.float(), dim, 0.9, hard)
        torch.testing.assert_close(y, y32.half(), rtol=0, atol=0)
        torch.testing.assert_close(theta, theta32, rtol=0, atol=0)
        dx = ops.stat_topk_backward(g, None, x, theta, mean, std, dim, 0.9, hard, True)
        dx32 = ops.stat_topk_backward(g.float(), None, x.float(), theta, mean, std, dim, 0.9, hard, True)
        torch.testing.assert_close(dx, dx32.half(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, nn module


def test_opcheck(device):
    x = random_rows((4, 33), torch.float32, device)
    for args in [(x, -1, 0.9), (x, 0, 0.3, True), (x.double(), 1, 0.5, False, False)]:
        torch.library.opcheck(torch.ops.fastloss.stat_topk.default, args)
    y, theta, mean, std = torch.ops.fastloss.stat_topk(x, -1, 0.9)
    torch.library.opcheck(torch.ops.fastloss.stat_topk_backward.default,
                          (torch.randn_like(x), torch.randn_like(theta), x, theta, mean, std, -1, 0.9, False, True))
    torch.library.opcheck(torch.ops.fastloss.stat_topk_backward.default,
                          (torch.randn_like(x), None, x, theta, mean, std, -1, 0.9, True, False))
    up = random_rows((4, 33), torch.float32, device, seed=2)
    torch.library.opcheck(torch.ops.fastloss.stat_topk_gelu_mul.default, (x, up, 0.8))
    out, theta, mean, std = torch.ops.fastloss.stat_topk_gelu_mul(x, up, 0.8)
    torch.library.opcheck(torch.ops.fastloss.stat_topk_gelu_mul_backward.default,
                          (torch.randn_like(x), x, up, theta, mean, std, 0.8, True))
    # k instead of the sparsity (the float is then unused)
    torch.library.opcheck(torch.ops.fastloss.stat_topk.default, (x, -1, 0.0, False, True, 5))
    y, theta, mean, std = torch.ops.fastloss.stat_topk(x, -1, 0.0, False, True, 5)
    torch.library.opcheck(torch.ops.fastloss.stat_topk_backward.default,
                          (torch.randn_like(x), torch.randn_like(theta), x, theta, mean, std, -1, 0.0, False, True, 5))
    torch.library.opcheck(torch.ops.fastloss.stat_topk_gelu_mul.default, (x, up, 0.0, True, 5))
    out, theta, mean, std = torch.ops.fastloss.stat_topk_gelu_mul(x, up, 0.0, True, 5)
    torch.library.opcheck(torch.ops.fastloss.stat_topk_gelu_mul_backward.default,
                          (torch.randn_like(x), x, up, theta, mean, std, 0.0, True, 5))


def test_torch_compile_fullgraph(device):
    def f(x, up):
        y, theta = fastloss.stat_topk(x, sparsity=0.9, return_threshold=True)
        return (y * 2).sum() + theta.sum() + fastloss.stat_topk_gelu_mul(x, up, k=4).sum()

    x = random_rows((8, 40), torch.float32, device).requires_grad_()
    up = random_rows((8, 40), torch.float32, device, seed=1)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, up)
    (dx,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_()
    (dx_eager,) = torch.autograd.grad(f(x2, up), x2)
    torch.testing.assert_close(dx, dx_eager)


@pytest.mark.parametrize("dim", [np.int64(0), torch.tensor(0)], ids=["numpy", "tensor"])
def test_torch_compile_dim_given_as_another_integer(dim):
    """The op takes a Python int: a NumPy integer (or a 0-d integer tensor) passed on as given
    reached it as a tensor under torch.compile."""
    x = random_rows((40, 8), torch.float32, "cpu")
    compiled = torch.compile(lambda t: fastloss.stat_topk(t, k=4, dim=dim), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), fastloss.stat_topk(x, k=4, dim=0))


def test_nn_module(device):
    m = fastloss.nn.StatTopK(k=10, mode="hard")
    x = random_rows((3, 100), torch.float32, device)
    torch.testing.assert_close(m(x), fastloss.stat_topk(x, k=10, mode="hard"))
    assert "k=10" in repr(m)


# --------------------------------------------------------------------------------------------
# Bad input


def test_errors():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="exactly one of 'sparsity' and 'k'"):
        fastloss.stat_topk(x)
    with pytest.raises(ValueError, match="exactly one of 'sparsity' and 'k'"):
        fastloss.stat_topk(x, sparsity=0.5, k=3)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="'sparsity' must be in \\(0, 1\\)"):
            fastloss.stat_topk(x, sparsity=bad)
    for bad in (0, 10, -1):
        with pytest.raises(ValueError, match="'k' must be in \\(0, 10\\)"):
            fastloss.stat_topk(x, k=bad)
    with pytest.raises(TypeError, match="'k' must be an int"):
        fastloss.stat_topk(x, k=2.5)
    with pytest.raises(ValueError, match="'mode'"):
        fastloss.stat_topk(x, sparsity=0.5, mode="top")
    with pytest.raises(IndexError, match="'dim' out of range"):
        fastloss.stat_topk(x, sparsity=0.5, dim=2)
    with pytest.raises(TypeError, match="'dim' must be an int, got float"):
        fastloss.stat_topk(x, sparsity=0.5, dim=1.0)
    # The module checks its arguments when built.
    with pytest.raises(ValueError, match="'sparsity' must be in \\(0, 1\\)"):
        fastloss.nn.StatTopK(sparsity=1.5)
    with pytest.raises(ValueError, match="'k' must be a positive int"):
        fastloss.nn.StatTopK(k=0)
    for bad_k in (3.0, True):  # the functional API's error type
        with pytest.raises(TypeError, match="'k' must be an int"):
            fastloss.nn.StatTopK(k=bad_k)
        with pytest.raises(TypeError, match="'k' must be an int"):
            fastloss.stat_topk(x, k=bad_k)
    with pytest.raises(RuntimeError, match="'x' to be a float32"):
        fastloss.stat_topk(torch.arange(10), sparsity=0.5)
    with pytest.raises(RuntimeError, match="'sparsity' must be in \\(0, 1\\)"):
        torch.ops.fastloss.stat_topk(x, -1, 1.0)
    for bad_k in (x.shape[-1], -2):
        with pytest.raises(RuntimeError, match=f"'k' must be in \\(0, {x.shape[-1]}\\) .* got {bad_k}"):
            torch.ops.fastloss.stat_topk(x, -1, 0.5, False, True, bad_k)
    with pytest.raises(RuntimeError, match="'up' must have the shape of 'gate'"):
        fastloss.stat_topk_gelu_mul(x, torch.randn(4, 9), 0.5)
    with pytest.raises(RuntimeError, match="'up' must have the dtype of 'gate'"):
        fastloss.stat_topk_gelu_mul(x, x.double(), 0.5)
    with pytest.raises(TypeError, match="'gate' to be a torch.Tensor"):
        fastloss.stat_topk_gelu_mul([1.0], x, 0.5)


def test_memcheck_subset(device):
    # Small cases of every kernel path, for compute-sanitizer on a GPU machine.
    for shape, dim in [((3, 5000), -1), ((2, 100, 3), 1), ((4, 40000), -1)]:
        x = random_rows(shape, torch.float32, device).requires_grad_()
        y, theta = fastloss.stat_topk(x, sparsity=0.9, dim=dim, return_threshold=True)
        (y.sum() + theta.sum()).backward()
        assert torch.isfinite(x.grad).all()
    gate = random_rows((3, 1000), torch.bfloat16, device).requires_grad_()
    up = random_rows((3, 1000), torch.bfloat16, device, seed=1).requires_grad_()
    fastloss.stat_topk_gelu_mul(gate, up, 0.9).float().sum().backward()
    assert torch.isfinite(gate.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_mul_gradient_at_huge_gate_values(device, dtype):
    # gelu_tanh'(h) -> 1: its small second term once formed inf * 0 = NaN where h^2 overflows
    # (h ~ 5e19 in float32), and the threshold gradient spread the NaN over the whole row.
    gate = random_rows((3, 257), torch.float64, "cpu", seed=30)
    gate[0, 5], gate[1, 100], gate[2, 0] = 1e20, 3e30, 2e38
    up = random_rows((3, 257), torch.float64, "cpu", seed=31)
    g = torch.randn(3, 257, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    gate_d = gate.to(device, dtype).requires_grad_()
    up_d = up.to(device, dtype).requires_grad_()
    dgate, dup = torch.autograd.grad(fastloss.stat_topk_gelu_mul(gate_d, up_d, 0.9), (gate_d, up_d), g.to(device, dtype))
    gate64 = gate_d.detach().cpu().double().requires_grad_()
    up64 = up_d.detach().cpu().double().requires_grad_()
    out_ref = F.gelu(reference(gate64, 0.9)[0], approximate="tanh") * up64
    dgate_ref, dup_ref = torch.autograd.grad(out_ref, (gate64, up64), g)
    assert torch.isfinite(dgate.float()).all() and torch.isfinite(dup.float()).all()
    for got, ref in ((dgate, dgate_ref), (dup, dup_ref)):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("fn", ["stat_topk", "stat_topk_gelu_mul"])
def test_double_backward_matches_the_formula(device, fn):
    # Hessian-vector products by eager double backward (create_graph=True, then the gradient's
    # gradient), against the eager Gemma 3n formula's.
    import statistics

    z = statistics.NormalDist().inv_cdf(0.7)
    theta_ref = lambda a: a.mean(-1, keepdim=True) + a.std(-1, correction=0, keepdim=True) * z  # noqa: E731
    x = torch.randn(5, 33, dtype=torch.float64, device=device)
    up = torch.randn(5, 33, dtype=torch.float64, device=device)
    direction = torch.randn_like(x)
    if fn == "stat_topk":
        ours, ref = (lambda a: fastloss.stat_topk(a, sparsity=0.7)), (lambda a: torch.relu(a - theta_ref(a)))
    else:
        ours = lambda a: fastloss.stat_topk_gelu_mul(a, up, 0.7)  # noqa: E731
        ref = lambda a: torch.nn.functional.gelu(torch.relu(a - theta_ref(a)), approximate="tanh") * up  # noqa: E731

    def hvp(f):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(leaf).pow(3).sum(), leaf, create_graph=True)
        return torch.autograd.grad(g, leaf, grad_outputs=direction)[0]

    torch.testing.assert_close(hvp(ours), hvp(ref), rtol=1e-11, atol=1e-12)


def test_large_outputs_written_chunk_by_chunk():
    # Outputs above 32 MiB are fresh pages, faulted in 256 KiB chunks of rows just before the
    # rows are written (two outputs at once in the gelu-mul backward); 3001 columns make the
    # chunks end mid-way through the threads' row ranges.
    shape = (2801, 3001)
    gate = random_rows(shape, torch.float32, "cpu", seed=20).requires_grad_()
    up = random_rows(shape, torch.float32, "cpu", seed=21).requires_grad_()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(22))
    y = fastloss.stat_topk(gate, sparsity=0.9)
    (dx,) = torch.autograd.grad(y, gate, g)
    out = fastloss.stat_topk_gelu_mul(gate, up, 0.9)
    dgate, dup = torch.autograd.grad(out, (gate, up), g)
    gate64 = gate.detach().double().requires_grad_()
    up64 = up.detach().double().requires_grad_()
    y_ref, theta_ref = reference(gate64, 0.9)
    (dx_ref,) = torch.autograd.grad(y_ref, gate64, g.double())
    out_ref = F.gelu(reference(gate64, 0.9)[0], approximate="tanh") * up64
    dgate_ref, dup_ref = torch.autograd.grad(out_ref, (gate64, up64), g.double())
    # Gradients jump at the threshold: rows with an entry within float32 rounding of it may
    # keep a different set (a handful of rows).
    margin = 1e-6 * (theta_ref.abs() + gate64.std(-1, keepdim=True))
    near = ((gate64 - theta_ref).abs() < margin).any(-1).detach()
    assert near.sum() <= 0.01 * shape[0]
    for got, ref in ((y, y_ref), (dx, dx_ref), (out, out_ref), (dgate, dgate_ref), (dup, dup_ref)):
        torch.testing.assert_close(got.double()[~near], ref.detach()[~near], rtol=1e-4,
                                   atol=1e-5 * ref.abs().max().item())
