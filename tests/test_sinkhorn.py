"""Batched log-domain Sinkhorn and the SinKD loss, against POT (ot.bregman.sinkhorn_log,
ot.batch.solve_batch) in float64 and against an eager SinKD reference written here."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastloss
from conftest import CUDA



def pot():
    """POT, a test dependency: only the tests that compare with it need it (a GPU machine
    without it still runs the CUDA tests)."""
    return pytest.importorskip("ot")


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_problem(B, n, m, *, uniform=False, zeros=0, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, n, m, generator=g, dtype=torch.float64)
    if uniform:
        a = torch.full((B, n), 1.0 / n, dtype=torch.float64)
        b = torch.full((B, m), 1.0 / m, dtype=torch.float64)
    else:
        a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.05
        b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.05
        if zeros:
            a[:, :zeros] = 0
            b[:, -zeros:] = 0
        a /= a.sum(1, keepdim=True)
        b /= b.sum(1, keepdim=True)
    return cost.to(device=device, dtype=dtype), a.to(device), b.to(device)


def primal_value(plan, cost, a, b, eps):
    """<P, C> + eps KL(P || a b^T) in float64, 0 log 0 = 0."""
    plan, cost, a, b = (t.double().cpu() for t in (plan, cost, a, b))
    ab = a[..., :, None] * b[..., None, :]
    kl = torch.where(plan > 0, plan * torch.log(plan / ab), torch.zeros_like(plan)).sum((-2, -1))
    return (plan * cost).sum((-2, -1)) + eps * kl


def pot_sinkhorn(cost, a, b, eps):
    """POT's log-domain Sinkhorn, run to tight convergence, on the support of a and b."""
    P = torch.zeros_like(cost, dtype=torch.float64)
    sa, sb = a > 0, b > 0
    Pk = pot().bregman.sinkhorn_log(
        a[sa].numpy(), b[sb].numpy(), cost[sa][:, sb].double().numpy(), eps, numItermax=200000, stopThr=1e-14
    )
    P[torch.outer(sa, sb)] = torch.from_numpy(Pk).reshape(-1)
    return P


# ---------------------------------------------------------------------------------------------
# Sinkhorn against POT


@pytest.mark.parametrize("n,m", [(7, 13), (40, 25), (1, 5)])
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("uniform", [True, False])
def test_matches_pot_log_sinkhorn(n, m, eps, uniform):
    cost, a, b = random_problem(3, n, m, uniform=uniform, seed=n * 100 + m)
    r = fastloss.sinkhorn(cost, a, b, eps=eps, tol=1e-12, max_iter=100000)
    assert (r.marginal_error <= 1e-12).all() and (r.n_iter < 100000).all()
    for k in range(3):
        P = pot_sinkhorn(cost[k], a[k], b[k], eps)
        torch.testing.assert_close(r.plan[k], P, rtol=1e-7, atol=1e-10)
        # Potentials are unique up to f + c, g - c: compare f_i + g_j - C_ij = eps log(P_ij / ...)
        _, log = pot().bregman.sinkhorn_log(a[k].numpy(), b[k].numpy(), cost[k].numpy(), eps, numItermax=200000,
                                         stopThr=1e-14, log=True)
        f_pot, g_pot = eps * torch.from_numpy(log["log_u"]), eps * torch.from_numpy(log["log_v"])
        shift = (r.f[k] - f_pot).mean()
        torch.testing.assert_close(r.f[k] - shift, f_pot, rtol=1e-7, atol=1e-8 * max(1.0, eps))
        torch.testing.assert_close(r.g[k] + shift, g_pot, rtol=1e-7, atol=1e-8 * max(1.0, eps))
        torch.testing.assert_close(r.value[k], primal_value(P, cost[k], a[k], b[k], eps), rtol=1e-9, atol=1e-9)
    # The plan is the one the potentials define.
    expected = torch.exp((r.f[:, :, None] + r.g[:, None, :] - cost) / eps)
    torch.testing.assert_close(r.plan, expected)


@pytest.mark.parametrize("batch", [1, 1000])
def test_matches_pot_batch_solver(batch):
    cost, a, b = random_problem(batch, 6, 9, seed=batch)
    eps = 0.2
    res = pot().batch.solve_batch(cost, reg=eps, a=a, b=b, max_iter=100000, tol=1e-11, method="log_sinkhorn")
    r = fastloss.sinkhorn(cost, a, b, eps=eps, tol=1e-11, max_iter=100000)
    torch.testing.assert_close(r.plan, res.plan.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r.value, primal_value(res.plan, cost, a, b, eps), rtol=1e-8, atol=1e-9)


def test_rectangular_eps_small_no_nan():
    # eps = 1% of the cost scale, in float32 and float64: no NaN, converges.
    cost, a, b = random_problem(2, 30, 50, seed=3)
    cost = cost * 10
    P = pot_sinkhorn(cost[0], a[0], b[0], 0.1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-11)):
        r = fastloss.sinkhorn(cost.to(dtype), a, b, eps=0.1, tol=tol, max_iter=50000)
        assert all(torch.isfinite(t).all() for t in (r.plan, r.value, r.marginal_error))
        assert (r.marginal_error <= tol).all()
        torch.testing.assert_close(r.plan[0].double(), P, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_long_rows_with_kernel_rebuilds():
    # Rows too long for the transposed-kernel path, and eps small enough against the cost that
    # the potentials move far from the first kernel: in float32 (scaling factors limited to
    # 2^16) the kernel is rebuilt a few times while solving.
    cost, a, b = random_problem(2, 40, 300, seed=19)
    cost = cost * 30
    r = fastloss.sinkhorn(cost, a, b, eps=0.1, tol=1e-11, max_iter=100000)
    r32 = fastloss.sinkhorn(cost.float(), a, b, eps=0.1, tol=1e-7, max_iter=100000)
    assert (r.marginal_error <= 1e-11).all() and (r32.marginal_error <= 1e-7).all()
    for k in range(2):
        P = pot_sinkhorn(cost[k], a[k], b[k], 0.1)
        torch.testing.assert_close(r.plan[k], P, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(r.value[k], primal_value(r.plan[k], cost[k], a[k], b[k], 0.1), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r32.plan[k].double(), P, rtol=0, atol=1e-5 * P.max().item())


def test_large_problems_independent_of_thread_count():
    # n m >= 2^22: each pass splits the rows into fixed ranges (column sums added in a fixed
    # order). 1 and 2 threads solve the B = 2 problems one per thread, 3 threads split each
    # problem's rows across the threads: the same bits either way.
    g = torch.Generator().manual_seed(20)
    x, y = torch.rand(2, 2048, 2, generator=g), torch.rand(2, 2048, 2, generator=g)
    cost = torch.cdist(x, y) ** 2
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(fastloss.sinkhorn(cost, eps=0.05, tol=1e-5, max_iter=2000))
        single = fastloss.sinkhorn(cost[1], eps=0.05, tol=1e-5, max_iter=2000)
    finally:
        torch.set_num_threads(threads)
    r = results[0]
    assert (r.marginal_error <= 1e-5).all() and (r.n_iter < 2000).all()
    torch.testing.assert_close(r.plan.sum(1), torch.full((2, 2048), 1 / 2048), rtol=0, atol=1e-8)
    torch.testing.assert_close((r.plan.sum(2) - 1 / 2048).abs().sum(1), r.marginal_error, rtol=1e-2, atol=1e-7)
    for other in results[1:]:
        for a_, b_ in zip(r, other):
            assert torch.equal(a_, b_)
    for a_, b_ in zip(single, r):
        assert torch.equal(a_, b_[1])


def test_zero_mass_entries():
    cost, a, b = random_problem(2, 12, 10, zeros=3, seed=5)
    r = fastloss.sinkhorn(cost, a, b, eps=0.1, tol=1e-12, max_iter=100000)
    assert (r.plan[:, :3, :] == 0).all() and (r.plan[:, :, -3:] == 0).all()
    assert torch.isneginf(r.f[:, :3]).all() and torch.isfinite(r.f[:, 3:]).all()
    assert torch.isfinite(r.value).all()
    for k in range(2):
        torch.testing.assert_close(r.plan[k], pot_sinkhorn(cost[k], a[k], b[k], 0.1), rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(r.value[k], primal_value(r.plan[k], cost[k], a[k], b[k], 0.1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1500, 2100)])
@pytest.mark.parametrize("eps", [0.1, 1e-5])
@pytest.mark.parametrize("axis", ["row", "column"])
def test_zero_mass_entries_ignore_their_costs(device, shape, eps, axis):
    # A row with a = 0 or a column with b = 0 (padding) carries no mass: whatever its costs
    # (+inf, NaN, -inf), the result is that of the problem without it, and its plan entries are
    # 0. (A padded row's NaN once reached every column through the exact column pass, which
    # eps = 1e-5 exercises, and its plan row was NaN; a padded column's made every row NaN.)
    # On CUDA (1, 1500, 2100) runs the multi-block path.
    B, n, m = shape
    cost, a, b = random_problem(B, n, m, seed=18, device=device)
    col = axis == "column"
    pad, keep = (b, a) if col else (a, b)
    pad = pad.clone()
    pad[:, -1] = 0
    pad /= pad.sum(1, keepdim=True)
    a, b = (keep, pad) if col else (pad, keep)

    def padded(t):  # the padded row or column of a (B, n, m) tensor
        return t[:, :, -1] if col else t[:, -1, :]

    def unpadded(t):
        return t[:, :, :-1] if col else t[:, :-1, :]

    clean_a, clean_b = (a, b[:, :-1]) if col else (a[:, :-1], b)
    clean = fastloss.sinkhorn(unpadded(cost), clean_a, clean_b, eps=eps, tol=1e-9, max_iter=300)
    for kind in ("inf", "nan", "-inf"):
        c = cost.clone()
        if kind == "inf":
            padded(c).fill_(math.inf)
        else:
            padded(c)[:, 2] = math.nan if kind == "nan" else -math.inf
        r = fastloss.sinkhorn(c, a, b, eps=eps, tol=1e-9, max_iter=300)
        assert (padded(r.plan) == 0).all(), kind
        pot, other = (r.g, r.f) if col else (r.f, r.g)
        clean_pot, clean_other = (clean.g, clean.f) if col else (clean.f, clean.g)
        assert torch.isneginf(pot[:, -1]).all(), kind
        torch.testing.assert_close(pot[:, :-1], clean_pot, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other, clean_other, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(unpadded(r.plan), clean.plan, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r.value, clean.value, rtol=1e-10, atol=1e-12)
        assert torch.equal(r.n_iter, clean.n_iter)
        if shape[1] < 100:  # the unrolled value and its cost gradient (0 on the padded entries)
            cg = c.clone().requires_grad_()
            value = fastloss.sinkhorn_cost(cg, a, b, eps=eps, tol=1e-9, max_iter=300, grad="unrolled")
            (grad,) = torch.autograd.grad(value.sum(), cg)
            cc = unpadded(cost).clone().requires_grad_()
            clean_value = fastloss.sinkhorn_cost(cc, clean_a, clean_b, eps=eps, tol=1e-9, max_iter=300, grad="unrolled")
            (clean_grad,) = torch.autograd.grad(clean_value.sum(), cc)
            torch.testing.assert_close(value, clean_value, rtol=1e-10, atol=1e-12)
            assert (padded(grad) == 0).all()
            torch.testing.assert_close(unpadded(grad), clean_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_marginals_of_a_float32_cost(device, dtype):
    # Marginals in bfloat16/float16 may differ in mass by their rounding (5e-3 and 8e-3 here): the
    # mass check uses their dtype's tolerance on every device (CUDA once used float32's, 3e-4).
    cost = torch.rand(1, 16, 2, generator=torch.Generator().manual_seed(19)).to(device)
    a = torch.full((1, 16), 0.0628, device=device).to(dtype)
    b = torch.tensor([[0.5, 0.5]], device=device).to(dtype)
    assert (a.double().sum() - 1).abs() > 1e-3
    r = fastloss.sinkhorn(cost, a, b, eps=0.1)
    assert torch.isfinite(r.value).all() and torch.isfinite(r.plan).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_costs_stay_finite(device, dtype):
    # eps a millionth of the cost scale: slow to converge, but never inf or NaN.
    cost, a, b = random_problem(2, 20, 30, seed=4, device=device)
    r = fastloss.sinkhorn((cost * 1e6).to(dtype), a, b, eps=1.0, max_iter=200)
    assert all(torch.isfinite(t).all() for t in (r.plan, r.f, r.g, r.value, r.marginal_error))
    if dtype == torch.float64:  # (float32 holds potentials of ~1e6 to ~0.06: a few % in P)
        torch.testing.assert_close(r.plan.sum(1), b, rtol=1e-6, atol=1e-9)  # columns exact
    # A NaN cost entry makes its problem NaN (and stop); +inf forbids one transport.
    bad = cost.to(dtype).clone()
    bad[0, 1, 2] = math.nan
    bad[1, 0, 0] = math.inf
    r = fastloss.sinkhorn(bad, a, b, eps=0.1, tol=1e-6, max_iter=500)
    assert torch.isnan(r.marginal_error[0]) and r.n_iter[0] == 0
    assert r.plan[1, 0, 0] == 0 and r.marginal_error[1] <= 1e-6


def test_shared_and_default_marginals():
    cost, a, b = random_problem(4, 8, 5, seed=6)
    r1 = fastloss.sinkhorn(cost, a[0], b[0], eps=0.2)
    r2 = fastloss.sinkhorn(cost, a[0].expand(4, 8), b[0].expand(4, 5), eps=0.2)
    torch.testing.assert_close(r1.plan, r2.plan)
    ru = fastloss.sinkhorn(cost, eps=0.2)
    torch.testing.assert_close(ru.plan.sum(2), torch.full((4, 8), 1 / 8, dtype=torch.float64), atol=1e-6, rtol=0)
    single = fastloss.sinkhorn(cost[1], a[0], b[0], eps=0.2)
    assert single.plan.shape == (8, 5) and single.f.shape == (8,) and single.value.shape == ()
    torch.testing.assert_close(single.plan, r1.plan[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_against_float64(device, dtype):
    cost, a, b = random_problem(5, 33, 20, seed=7, device=device)
    ref = fastloss.sinkhorn(cost.to(dtype).double(), a, b, eps=0.1, tol=1e-12, max_iter=100000)
    r = fastloss.sinkhorn(cost.to(dtype), a, b, eps=0.1, tol=1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert r.plan.dtype == acc and r.f.dtype == acc and r.value.dtype == acc and r.n_iter.dtype == torch.int64
    # The same cost (rounded to dtype), solved in float64 to 1e-12: only tol and fp32 differ.
    scale = ref.plan.abs().max()
    assert ((r.plan.double() - ref.plan).abs().max() / scale) < 1e-3
    torch.testing.assert_close(r.value.double(), ref.value, rtol=1e-4, atol=1e-5)
    assert (r.marginal_error <= 1e-5).all()


@pytest.mark.parametrize("n,m,seed", [(500, 400, 0), (2000, 2000, 1)])
def test_float32_value_is_summed_accurately(n, m, seed):
    """CPU: the dual value <a, f> + <b, g> over n + m terms; a running float32 sum of them was
    6e-7 off (relative) here, now 2e-8."""
    cost, a, b = random_problem(1, n, m, seed=seed, dtype=torch.float32)
    a, b = a.float(), b.float()
    kw = dict(eps=0.1, max_iter=3, tol=0.0)
    got = fastloss.sinkhorn(cost, a, b, **kw).value.double()
    ref = fastloss.sinkhorn(cost.double(), a.double(), b.double(), **kw).value
    assert ((got - ref).abs() / ref.abs()).max().item() < 1.5e-7


def test_independent_stopping_and_max_iter(device):
    easy, a, b = random_problem(1, 20, 20, seed=8, device=device)
    hard = easy * 20
    cost = torch.cat([easy, hard, easy])
    a3, b3 = a.expand(3, 20), b.expand(3, 20)
    r = fastloss.sinkhorn(cost, a3, b3, eps=0.5, tol=1e-9, max_iter=100000)
    alone = [fastloss.sinkhorn(cost[k : k + 1], a, b, eps=0.5, tol=1e-9, max_iter=100000) for k in range(3)]
    for k in range(3):
        assert r.n_iter[k] == alone[k].n_iter[0]
        torch.testing.assert_close(r.plan[k], alone[k].plan[0])
    assert r.n_iter[1] > 2 * r.n_iter[0]
    assert (r.marginal_error <= 1e-9).all()
    capped = fastloss.sinkhorn(cost, a3, b3, eps=0.5, tol=1e-9, max_iter=7)
    assert (capped.n_iter == 7).all() and (capped.marginal_error > 1e-9).all()
    # The reported error is the error of the returned plan.
    err = (capped.plan.sum(2) - a3).abs().sum(1)
    torch.testing.assert_close(capped.marginal_error, err, rtol=1e-6, atol=1e-12)
    zero = fastloss.sinkhorn(cost, a3, b3, eps=0.5, max_iter=0)
    assert (zero.n_iter == 0).all()
    torch.testing.assert_close(zero.plan, torch.exp(-cost / 0.5) * a3[:, :, None] * b3[:, None, :])


@pytest.mark.parametrize("error_norm", [1, 2, math.inf])
@pytest.mark.parametrize("shape", [(3, 40, 30), (3, 200, 150), (1, 2048, 2100)])
def test_error_norm(device, error_norm, shape):
    # Shapes: the CPU's transposed-kernel, row-pass and row-split-across-threads passes.
    B, n, m = shape
    dtype = torch.float64 if n * m < 2**20 else torch.float32
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    cost, a, b = random_problem(B, n, m, seed=11, device=device, dtype=dtype)
    a, b = a.to(dtype), b.to(dtype)
    # Problems of a few to several hundred iterations.
    cost = cost * torch.tensor([8.0, 1.0, 20.0][:B], dtype=cost.dtype, device=device)[:, None, None]
    kw = dict(eps=0.5 if n < 100 else 0.02, tol=tol, error_norm=error_norm, max_iter=100000)
    r = fastloss.sinkhorn(cost, a, b, **kw)
    # The reported error is the norm of the returned plan's row-marginal error, within tol.
    err = torch.linalg.vector_norm(r.plan.double().sum(2) - a.double(), ord=error_norm, dim=1)
    if dtype == torch.float64:
        torch.testing.assert_close(r.marginal_error, err, rtol=1e-6, atol=1e-14)
    else:  # float32 rounding of n row sums
        torch.testing.assert_close(r.marginal_error.double(), err, rtol=0.05, atol=1e-6)
    assert (r.marginal_error <= tol).all()
    # Each problem stops at the first iterate that meets the rule.
    for k in range(B):
        before = fastloss.sinkhorn(cost[k], a[k], b[k], **{**kw, "max_iter": int(r.n_iter[k]) - 1})
        assert before.marginal_error > tol
    # A weaker norm never needs more iterations than the L1 rule.
    assert (r.n_iter <= fastloss.sinkhorn(cost, a, b, **{**kw, "error_norm": 1}).n_iter).all()
    if dtype == torch.float64:  # The unrolled value runs the same iterations.
        unrolled = fastloss.sinkhorn_cost(cost, a, b, grad="unrolled", **{**kw, "max_iter": int(r.n_iter.max()) + 2})
        torch.testing.assert_close(unrolled, r.value, rtol=1e-9, atol=1e-12)


def test_non_contiguous_and_empty(device):
    cost, a, b = random_problem(3, 9, 11, seed=9, device=device)
    base = torch.rand(3, 11, 9, dtype=torch.float64, device=device)
    ct = base.transpose(1, 2)
    assert not ct.is_contiguous()
    r = fastloss.sinkhorn(ct, a, b[:, :], eps=0.3)
    torch.testing.assert_close(r.plan, fastloss.sinkhorn(ct.contiguous(), a, b, eps=0.3).plan)
    e = fastloss.sinkhorn(torch.rand(0, 4, 5, device=device), eps=0.1)
    assert e.plan.shape == (0, 4, 5) and e.value.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Gradients of the value


def test_envelope_gradient_is_plan(device):
    cost, a, b = random_problem(4, 10, 7, seed=10, device=device)
    c = cost.clone().requires_grad_()
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = fastloss.sinkhorn_cost(c, aa, bb, eps=0.1, tol=1e-12, max_iter=100000)
    w = torch.randn(4, dtype=torch.float64, device=device)
    gc, ga, gb = torch.autograd.grad((v * w).sum(), (c, aa, bb))
    r = fastloss.sinkhorn(cost, a, b, eps=0.1, tol=1e-12, max_iter=100000)
    torch.testing.assert_close(gc, w[:, None, None] * r.plan)
    torch.testing.assert_close(ga, w[:, None] * (r.f - 0.1 * a.log()))
    torch.testing.assert_close(gb, w[:, None] * (r.g - 0.1 * b.log()))
    torch.testing.assert_close(v, r.value)


def test_envelope_gradient_does_not_read_the_inputs(device):
    # The envelope gradient needs the potentials only: an inference-mode cost, or one modified
    # in place after the call, must not stop the gradient in the marginals (both raised).
    with torch.inference_mode():
        fixed, a, _ = random_problem(2, 5, 6, seed=3, device=device)
    aa = a.clone().requires_grad_()
    v = fastloss.sinkhorn_cost(fixed, aa, eps=0.5, tol=1e-12, max_iter=10000)
    (ga,) = torch.autograd.grad(v.sum(), aa)
    r = fastloss.sinkhorn(fixed, a.clone(), eps=0.5, tol=1e-12, max_iter=10000)
    torch.testing.assert_close(ga, r.f - 0.5 * a.clone().log())
    cost = fixed.clone()
    v = fastloss.sinkhorn_cost(cost, aa, eps=0.5, tol=1e-12, max_iter=10000)
    cost.add_(1.0)
    (ga2,) = torch.autograd.grad(v.sum(), aa)
    torch.testing.assert_close(ga2, ga)


def test_gradcheck_envelope_cost():
    # At convergence the value's derivative w.r.t. the cost is the plan (envelope theorem).
    cost, a, b = random_problem(2, 5, 4, seed=11)
    c = cost.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastloss.sinkhorn_cost(t, a, b, eps=0.2, tol=1e-14, max_iter=100000), (c,))


def test_unrolled_gradient():
    cost, a, b = random_problem(3, 6, 5, seed=12)
    # Same value as the kernel; gradient exact for the iterations run (gradcheck), and equal
    # to the envelope gradient once converged.
    c = cost.clone().requires_grad_()
    fn = lambda t: fastloss.sinkhorn_cost(t, a, b, eps=0.3, tol=1e-4, max_iter=15, grad="unrolled")
    assert torch.autograd.gradcheck(fn, (c,))
    v_env = fastloss.sinkhorn_cost(cost, a, b, eps=0.3, tol=1e-4, max_iter=15)
    torch.testing.assert_close(fn(c), v_env)
    c2 = cost.clone().requires_grad_()
    (g_unrolled,) = torch.autograd.grad(
        fastloss.sinkhorn_cost(c2, a, b, eps=0.3, tol=1e-13, max_iter=400, grad="unrolled").sum(), c2
    )
    torch.testing.assert_close(g_unrolled, fastloss.sinkhorn(cost, a, b, eps=0.3, tol=1e-13, max_iter=400).plan)


def test_envelope_second_derivative_raises_unrolled_works():
    # The envelope gradient P carries no derivative of P itself: a graph through it would give
    # a wrong second derivative (it used to, silently). It raises; the unrolled value works.
    cost, a, b = random_problem(2, 5, 6, seed=14)
    c = cost.clone().requires_grad_()
    v = fastloss.sinkhorn_cost(c, a, b, eps=0.5, tol=1e-12, max_iter=1000)
    (g,) = torch.autograd.grad((v ** 2).sum(), c, create_graph=True)
    with pytest.raises(NotImplementedError, match="grad='unrolled'"):
        torch.autograd.grad(g.sum(), c)
    # Also when the output gradient is a constant (the gradient used to come back as a constant
    # then, and a penalty on it silently lost its second-order term).
    v = fastloss.sinkhorn_cost(c, a, b, eps=0.5, tol=1e-12, max_iter=1000)
    (g,) = torch.autograd.grad(v.sum(), c, create_graph=True)
    assert g.requires_grad
    with pytest.raises(NotImplementedError, match="grad='unrolled'"):
        (v.sum() + (g ** 2).sum()).backward()
    # ... and through autograd.grad with respect to the cost, also with allow_unused=True and as
    # a Hessian-vector product (the graph used to hang off a stand-alone tensor, so these saw
    # a cost "not used in the graph", or silently returned None).
    for kwargs in ({}, {"allow_unused": True}, {"grad_outputs": torch.ones_like(g)}):
        v = fastloss.sinkhorn_cost(c, a, b, eps=0.5, tol=1e-12, max_iter=1000)
        (g,) = torch.autograd.grad(v.sum(), c, create_graph=True)
        with pytest.raises(NotImplementedError, match="grad='unrolled'"):
            torch.autograd.grad(g if "grad_outputs" in kwargs else g.sum(), c, **kwargs)
    # First derivatives with create_graph=True are unchanged.
    v = fastloss.sinkhorn_cost(c, a, b, eps=0.5, tol=1e-12, max_iter=1000)
    (g1,) = torch.autograd.grad((v ** 2).sum(), c, create_graph=True)
    (g2,) = torch.autograd.grad((fastloss.sinkhorn_cost(c, a, b, eps=0.5, tol=1e-12, max_iter=1000) ** 2).sum(), c)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)

    fn = lambda t: fastloss.sinkhorn_cost(t, a, b, eps=0.5, tol=1e-4, max_iter=8, grad="unrolled")
    assert torch.autograd.gradgradcheck(fn, (c,))


def test_envelope_gradient_at_zero_mass_entries(device):
    # At a zero-mass entry of a or b the envelope gradient is that entry's potential (the
    # c-transform of the other side's), the one-sided derivative of the value in its mass:
    # checked by finite differences that move mass onto it. (Zero-mass columns once returned
    # potential 0, and a padded row of +inf costs NaN instead of +inf.)
    cost, a, b = random_problem(1, 7, 6, zeros=2, seed=3, device=device)
    eps, kw = 0.1, dict(tol=1e-13, max_iter=100000)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = fastloss.sinkhorn_cost(cost, ar, br, eps=eps, **kw)
    ga, gb = torch.autograd.grad(value.sum(), (ar, br))
    d = 1e-7
    moved_a, moved_b = a.clone(), b.clone()
    moved_a[0, 0] += d  # a zero-mass row
    moved_a[0, 3] -= d
    moved_b[0, -1] += d  # a zero-mass column
    moved_b[0, 0] -= d
    fd_a = ((fastloss.sinkhorn_cost(cost, moved_a, b, eps=eps, **kw) - value) / d)[0]
    fd_b = ((fastloss.sinkhorn_cost(cost, a, moved_b, eps=eps, **kw) - value) / d)[0]
    torch.testing.assert_close(fd_a, ga[0, 0] - ga[0, 3], rtol=0, atol=1e-6)
    torch.testing.assert_close(fd_b, gb[0, -1] - gb[0, 0], rtol=0, atol=1e-6)
    # Padding with +inf costs: adding mass there has nowhere to go (+inf); NaN costs give NaN.
    for bad, expected in ((math.inf, math.inf), (math.nan, math.nan)):
        c = cost.clone()
        c[0, 0, :] = bad
        c[0, :, -1] = bad
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = fastloss.sinkhorn_cost(c, ar, br, eps=eps, **kw)
        ga2, gb2 = torch.autograd.grad(value.sum(), (ar, br))
        torch.testing.assert_close(value, fastloss.sinkhorn_cost(cost, a, b, eps=eps, **kw), rtol=1e-12, atol=0)
        for g in (ga2[0, 0], gb2[0, -1]):
            assert torch.isnan(g) if math.isnan(expected) else g == expected
        torch.testing.assert_close(ga2[0, 1:], ga[0, 1:], rtol=1e-10, atol=1e-12)


def test_unrolled_gradient_with_zero_mass_entries():
    # log 0 = -inf enters the iteration; its gradient must be 0, not 0 * inf = NaN.
    cost, a, b = random_problem(2, 8, 7, zeros=2, seed=13)
    c, a2, b2 = (t.clone().requires_grad_() for t in (cost, a, b))
    value = fastloss.sinkhorn_cost(c, a2, b2, eps=0.2, tol=1e-10, max_iter=300, grad="unrolled")
    grads = torch.autograd.grad(value.sum(), (c, a2, b2))
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(grads[0], fastloss.sinkhorn(cost, a, b, eps=0.2, tol=1e-10, max_iter=300).plan)


def test_nan_cost_gives_nan_value(device):
    # A NaN (or -inf) cost entry stops that problem at once with a NaN error; its value is NaN
    # too (not that of the untouched zero potentials), and the other problems are unaffected.
    cost, a, b = random_problem(3, 5, 6, seed=14)
    cost, a, b = cost.to(device), a.to(device), b.to(device)
    expected = fastloss.sinkhorn_cost(cost, a, b, eps=0.1)
    for bad in (math.nan, -math.inf):
        c = cost.clone()
        c[1, 2, 3] = bad
        r = fastloss.sinkhorn(c, a, b, eps=0.1)
        assert torch.isnan(r.value[1]) and torch.isnan(r.marginal_error[1])
        torch.testing.assert_close(r.value[[0, 2]], expected[[0, 2]])
        assert torch.isnan(fastloss.sinkhorn_cost(c, a, b, eps=0.1)[1])


@pytest.mark.parametrize("max_iter", [0, 1, 7])
def test_unrolled_value_matches_the_kernel_at_few_iterations(max_iter):
    # max_iter = 0 measures the starting potentials: the value (0) has the exact gradient 0
    # (backward once failed: the value had no graph). A NaN cost gives a NaN value in both,
    # and its problem's NaN stays in its own gradient slice.
    cost, a, b = random_problem(3, 5, 6, seed=21)
    cost[1, 2, 3] = math.nan
    c, a2, b2 = (t.clone().requires_grad_() for t in (cost, a, b))
    value = fastloss.sinkhorn_cost(c, a2, b2, eps=0.1, max_iter=max_iter, grad="unrolled")
    expected = fastloss.sinkhorn_cost(cost, a, b, eps=0.1, max_iter=max_iter)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0, equal_nan=True)
    assert torch.isnan(value[1])
    grads = torch.autograd.grad(value.sum(), (c, a2, b2))
    for grad in grads:
        assert torch.isfinite(grad[[0, 2]]).all()
        if max_iter == 0:
            assert (grad[[0, 2]] == 0).all()


def test_opcheck_sinkhorn(device):
    cost, a, b = random_problem(2, 5, 4, seed=13, device=device)
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(
            torch.ops.fastloss.sinkhorn, (cost.to(dtype).requires_grad_(), a.to(dtype), b.to(dtype), 0.1, 50, 1e-6)
        )
    torch.library.opcheck(torch.ops.fastloss.sinkhorn, (cost.bfloat16(), a, b, 0.1, 50, 1e-6))


def test_torch_compile_fullgraph(device):
    def fn(cost, a, b, zs, zt):
        ot_value = fastloss.sinkhorn_cost(cost, a, b, eps=0.1, tol=1e-9).sum()
        return ot_value + fastloss.sinkhorn_kd_loss(zs, zt) + fastloss.sinkhorn(cost, eps=0.2).plan.sum()

    compiled = torch.compile(fn, fullgraph=True)
    cost, a, b = random_problem(3, 6, 5, seed=14, device=device, dtype=torch.float32)
    zs = torch.randn(8, 5, device=device)
    zt = torch.randn(8, 5, device=device)
    args = (cost.requires_grad_(), a.float(), b.float(), zs.requires_grad_(), zt)
    expected = fn(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, (cost, zs)), torch.autograd.grad(expected, (cost, zs)))


def test_bad_input(device):
    cost, a, b = random_problem(2, 4, 3, seed=15, device=device)
    for eps in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="'eps'"):
            fastloss.sinkhorn(cost, a, b, eps=eps)
    with pytest.raises(ValueError, match="'a' to have shape"):
        fastloss.sinkhorn(cost, a[:, :3], b, eps=0.1)
    with pytest.raises(ValueError, match="'b' to have shape"):
        fastloss.sinkhorn(cost, a, b[:1], eps=0.1)
    with pytest.raises(ValueError, match="'cost' to have shape"):
        fastloss.sinkhorn(cost[0, 0], eps=0.1)
    with pytest.raises(ValueError, match="'max_iter'"):
        fastloss.sinkhorn(cost, eps=0.1, max_iter=-1)
    with pytest.raises(ValueError, match="'tol'"):
        fastloss.sinkhorn(cost, eps=0.1, tol=-1e-3)
    for bad in (3, 0.5, "l2", True):
        with pytest.raises(ValueError, match="'error_norm' to be 1, 2 or math.inf"):
            fastloss.sinkhorn(cost, eps=0.1, error_norm=bad)
    with pytest.raises(RuntimeError, match="'error_norm' to be 1, 2 or inf"):
        torch.ops.fastloss.sinkhorn(cost, a, b, 0.1, 10, 1e-6, 3.0)
    with pytest.raises(ValueError, match="'grad'"):
        fastloss.sinkhorn_cost(cost, eps=0.1, grad="autodiff")
    with pytest.raises(TypeError, match="'cost'"):
        fastloss.sinkhorn([[1.0]], eps=0.1)
    # Tensors for scalar options are a type error, named as such (not "a finite number > 0").
    with pytest.raises(TypeError, match="'eps' to be a Python number, got a tensor"):
        fastloss.sinkhorn(cost, eps=torch.tensor(0.1))
    with pytest.raises(TypeError, match="'tol' to be a Python number"):
        fastloss.sinkhorn(cost, eps=0.1, tol=torch.tensor(1e-3))
    with pytest.raises(TypeError, match="'max_iter' to be an int, got float"):
        fastloss.sinkhorn(cost, eps=0.1, max_iter=2.5)
    # An unbatched cost's marginals are quoted against the cost as given.
    with pytest.raises(ValueError, match=r"'a' to have shape \(4,\) to match 'cost' \(4, 5\), got \(5,\)"):
        fastloss.sinkhorn(torch.rand(4, 5, device=device), torch.full((5,), 0.2, device=device), eps=0.1)
    # (1, n) is a batch of one: not for an unbatched cost (its result would have no batch dim).
    with pytest.raises(ValueError, match=r"'a' to have shape \(4,\) to match 'cost' \(4, 5\), got \(1, 4\)"):
        fastloss.sinkhorn(torch.rand(4, 5, device=device), torch.full((1, 4), 0.25, device=device), eps=0.1)
    with pytest.raises(RuntimeError, match="'cost'.*got torch.int64"):
        fastloss.sinkhorn(torch.ones(2, 3, dtype=torch.long, device=device), eps=0.1)
    with pytest.raises(RuntimeError, match="'eps' > 0"):
        torch.ops.fastloss.sinkhorn(cost, a, b, 0.0, 10, 1e-6)
    if device == "cpu":  # on CUDA these would need a host sync: the problem comes back NaN
        neg = a.clone()
        neg[0, 0] = -0.1
        neg[0, 1] += 0.1
        with pytest.raises(RuntimeError, match="'a' to be finite and >= 0"):
            fastloss.sinkhorn(cost, neg, b, eps=0.1)
        for fn in (fastloss.sinkhorn, lambda *x, **k: fastloss.sinkhorn_cost(*x, **k, grad="unrolled")):
            with pytest.raises(RuntimeError, match=r"same total mass.* in problem 0 \(relative difference 0.333333"):
                fn(cost, a * 1.5, b, eps=0.1)
            with pytest.raises(RuntimeError, match="'b' to be finite and >= 0"):
                fn(cost, a, torch.full_like(b, math.nan), eps=0.1)
        # Masses close together print apart.
        with pytest.raises(RuntimeError, match=r"got 1.00000200000000\d* and 1 in problem 0 \(relative difference"):
            fastloss.sinkhorn(cost[0], a[0] * (1 + 2e-6), eps=0.1)
    # float64 marginals rounded through float32 (3e-8 apart here) pass: the float64 tolerance is
    # 1e-6 (on CUDA a refused problem would come back NaN).
    third = torch.full((3,), 1 / 3, device=device).double()
    assert abs(third.sum().item() - 1) > 2e-8
    cost3 = torch.rand(3, 4, dtype=torch.float64, device=device)
    assert torch.isfinite(fastloss.sinkhorn(cost3, third, eps=0.1).value).all()
    assert torch.isfinite(fastloss.sinkhorn_cost(cost3, third, eps=0.1, grad="unrolled")).all()
    with pytest.raises(ValueError, match=r"'max_iter' to be an int in \[0, 2\*\*63\)"):
        fastloss.sinkhorn(cost, eps=0.1, max_iter=2**63)


def test_unrolled_invalid_marginals_give_nan_where_unchecked(device):
    """Vmapped (no value-dependent check possible), or compiled on CUDA, the unrolled value of a
    problem with invalid marginals is NaN, as the kernels' on CUDA; compiled on the CPU, a check
    in the graph raises, as the kernel does for the envelope path. Valid problems are unaffected."""
    cost, a, b = random_problem(2, 5, 4, seed=16, device=device)
    value = lambda c, a: fastloss.sinkhorn_cost(c, a, b[0], eps=0.1, grad="unrolled", max_iter=30)
    compiled = torch.compile(value, fullgraph=True)
    good = a[0]
    expected = value(cost, good)
    torch.testing.assert_close(compiled(cost, good), expected)
    for bad in (torch.tensor([0.5, 0.5, 0.25, -0.25, 0.0]), torch.full((5,), 0.4),
                torch.tensor([0.5, 0.5, math.nan, 0.0, 0.0])):
        bad = bad.to(device=device, dtype=cost.dtype)
        if device == "cpu":
            with pytest.raises(RuntimeError, match="equal total mass in each problem"):
                compiled(cost, bad)
        else:
            assert torch.isnan(compiled(cost, bad)).all()
        assert torch.isnan(torch.func.vmap(lambda c: value(c, bad))(cost)).all()
    assert torch.isfinite(torch.func.vmap(lambda c: value(c, good))(cost)).all()
    # Compiled around torch.func transforms (no check in the graph there, and nothing that
    # cannot be traced).
    vmapped = torch.compile(torch.func.vmap(lambda c: value(c, good)), fullgraph=True)
    torch.testing.assert_close(vmapped(cost), torch.func.vmap(lambda c: value(c, good))(cost))
    grad = torch.compile(torch.func.grad(lambda c: value(c, good).sum()), fullgraph=True)
    torch.testing.assert_close(grad(cost), torch.func.grad(lambda c: value(c, good).sum())(cost))


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_starting_iterate_never_meets_tol(device, grad):
    """At eps far above the cost scale the starting plan a b^T exp(-C / eps) is nearly a b^T: its
    row error can meet a loose tol, but its columns are not normalized (and its value is 0). One
    iteration at least runs, as in POT."""
    cost = torch.rand(64, 64, generator=torch.Generator().manual_seed(17), dtype=torch.float64).to(device)
    r = fastloss.sinkhorn(cost, eps=10.0, tol=0.1)
    assert r.n_iter.item() >= 1
    assert (r.plan.sum(0) - 1 / 64).abs().max() < 1e-12
    converged = fastloss.sinkhorn_cost(cost, eps=10.0, tol=1e-13, max_iter=10000)
    c = cost.clone().requires_grad_()
    loose = fastloss.sinkhorn_cost(c, eps=10.0, tol=0.1, max_iter=20, grad=grad)
    torch.testing.assert_close(loose, converged, rtol=0.02, atol=0)
    (dc,) = torch.autograd.grad(loose, c)
    torch.testing.assert_close(dc.sum(), torch.ones((), dtype=dc.dtype, device=device), rtol=1e-6, atol=0)


@pytest.mark.cuda
def test_cuda_invalid_marginals_give_nan():
    if not CUDA:
        pytest.skip("needs CUDA")
    cost, a, b = random_problem(3, 5, 4, seed=16, device="cuda")
    a = a.clone()
    a[1] *= 2
    r = fastloss.sinkhorn(cost, a, b, eps=0.1)
    assert torch.isnan(r.plan[1]).all() and torch.isnan(r.value[1])
    assert torch.isfinite(r.plan[[0, 2]]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 64, 64), (4, 256, 256), (2, 300, 170), (1, 1500, 2100), (1, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_paths_match_cpu(shape, dtype):
    """The block-per-problem and the multi-block paths against the CPU kernel."""
    if not CUDA:
        pytest.skip("needs CUDA")
    cost, a, b = random_problem(*shape, seed=17)
    cost = cost.to(dtype)
    r_cpu = fastloss.sinkhorn(cost, a, b, eps=0.05, tol=1e-6, max_iter=3000)
    r = fastloss.sinkhorn(cost.cuda(), a.cuda(), b.cuda(), eps=0.05, tol=1e-6, max_iter=3000)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(r.plan.cpu(), r_cpu.plan, rtol=1e-3, atol=tol * r_cpu.plan.max().item() * 10)
    torch.testing.assert_close(r.value.cpu(), r_cpu.value, rtol=1e-4, atol=1e-6)
    assert (r.marginal_error.cpu() <= 1e-6).all()
    # Same iteration, different rounding: the stopping iteration may move a little.
    assert ((r.n_iter.cpu() - r_cpu.n_iter).abs() <= 3 + r_cpu.n_iter // 20).all()


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 1500, 2100)])  # CUDA: block and grid paths
def test_error_of_the_starting_iterate_is_not_clamped(device, shape):
    """At u = v = 0 the row ratio is sum_j b_j exp(-C_ij / eps) = e^100: the reported error is
    that in float64 and inf in float32, never a clamped exponential."""
    for dtype, expected in [(torch.float64, math.expm1(100.0)), (torch.float32, math.inf)]:
        cost = torch.full(shape, -100.0, dtype=dtype, device=device)
        r = fastloss.sinkhorn(cost, eps=1.0, max_iter=0)
        assert (r.n_iter == 0).all()
        err = r.marginal_error.cpu().double()
        torch.testing.assert_close(err, torch.full_like(err, expected), rtol=1e-12, atol=0)


@pytest.mark.cuda
def test_cuda_memcheck():
    """Small subset run under compute-sanitizer by `make gpu-check`."""
    if not CUDA:
        pytest.skip("needs CUDA")
    for shape in [(3, 5, 7), (1, 700, 900)]:  # the block path, the grid path
        for zeros in (0, 2):  # zero-mass rows and columns: their c-transforms after the solve
            cost, a, b = random_problem(*shape, zeros=zeros, seed=18, device="cuda", dtype=torch.float32)
            c, a, b = cost.requires_grad_(), a.requires_grad_(), b.requires_grad_()
            fastloss.sinkhorn_cost(c, a, b, eps=0.1, max_iter=50).sum().backward()
    zs = torch.randn(33, 70, device="cuda", requires_grad=True)
    fastloss.sinkhorn_kd_loss(zs, torch.randn(33, 70, device="cuda")).backward()


# ---------------------------------------------------------------------------------------------
# SinKD


def sinkd_reference(zs, zt, temperature=2.0, eps=0.1, n_iter=20, scale=0.001, twice_differentiable=False,
                    row_shift=False):
    """The SinKD loss as its authors compute it (eager; autograd through every step).
    twice_differentiable writes the L1 cost out: torch.cdist's backward has no derivative.
    row_shift subtracts each row's smallest cost before the exponential: the same value when
    n_iter >= 1 (the first row normalization cancels it), with gradients that stay finite
    where autograd through subnormal kernel entries overflows."""
    ps = torch.softmax(zs / temperature, dim=1)
    pt = torch.softmax(zt / temperature, dim=1)
    if twice_differentiable:
        W = (ps[:, None, :] - pt[None, :, :]).abs().sum(-1)
    else:
        W = torch.cdist(ps, pt, p=1)
    P = torch.exp(-(W - W.amin(1, keepdim=True).detach() if row_shift else W) / eps)
    for _ in range(n_iter):
        P = P / P.sum(dim=1, keepdim=True)
        P = P / P.sum(dim=0, keepdim=True)
    return scale * torch.sum(P * W)


@pytest.mark.parametrize("B,C", [(1, 3), (16, 3), (32, 100), (33, 31), (70, 600), (600, 5)])
@pytest.mark.parametrize("n_iter", [0, 1, 20])
def test_sinkd_matches_reference_float64(device, B, C, n_iter):
    g = torch.Generator().manual_seed(B * 1000 + C)
    zs = (torch.randn(B, C, generator=g, dtype=torch.float64) * 3).to(device).requires_grad_()
    zt = (torch.randn(B, C, generator=g, dtype=torch.float64) * 3).to(device).requires_grad_()
    kw = dict(temperature=1.5, eps=0.2, n_iter=n_iter, scale=0.01)
    loss = fastloss.sinkhorn_kd_loss(zs, zt, **kw)
    ref = sinkd_reference(zs, zt, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-14)
    w = torch.tensor(1.7, dtype=torch.float64, device=device)
    got = torch.autograd.grad(loss * w, (zs, zt))
    expected = torch.autograd.grad(ref * w, (zs, zt))
    for a_, b_ in zip(got, expected):
        torch.testing.assert_close(a_, b_, rtol=1e-8, atol=1e-8 * b_.abs().max().item() + 1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkd_kernel_entries_near_underflow(device, dtype):
    # Small eps puts exp(-W / eps) near the underflow: the eager formulation keeps subnormal
    # entries, and a row of them still normalizes to finite values. Flushing them at the
    # smallest normal number changed the loss by 32% (float32) or made it NaN (float64).
    cases = {
        torch.float32: ([[5.783, 3.79, -0.81], [2.798, 6.489, -0.784], [-0.186, -1.291, 3.983], [0.262, 2.553, 5.2]],
                        [[-1.437, 2.282, -0.036], [-2.023, 6.909, -0.31], [-2.25, 1.749, 0.658],
                         [-0.801, 4.042, -2.71]], 0.019939244417992375),
        torch.float64: ([[3.0, -3.0], [2.5, -2.5]], [[-2.5, 2.5], [-3.0, 3.0]], 0.0027405952726428625),
    }
    s_, t_, eps = cases[dtype]
    zs = torch.tensor(s_, dtype=dtype, device=device, requires_grad=True)
    zt = torch.tensor(t_, dtype=dtype, device=device, requires_grad=True)
    kw = dict(temperature=1.0, eps=eps, n_iter=20, scale=1.0)
    loss = fastloss.sinkhorn_kd_loss(zs, zt, **kw)
    ref = sinkd_reference(zs.double(), zt.double(), **kw)
    assert torch.isfinite(ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    got = torch.autograd.grad(loss, (zs, zt))
    # (Autograd through the eager formulation's subnormal entries gives NaN in float64.)
    expected = torch.autograd.grad(sinkd_reference(zs.double(), zt.double(), row_shift=True, **kw), (zs, zt))
    for a_, b_ in zip(got, expected):
        scale_ = b_.abs().max().item()
        assert scale_ > 0
        tol = (1e-3 if dtype == torch.float32 else 1e-8) * scale_
        torch.testing.assert_close(a_.double(), b_.double(), rtol=0, atol=tol)
    # The create_graph=True path (autograd through the formulation) shifts its rows as well.
    first = torch.autograd.grad(fastloss.sinkhorn_kd_loss(zs, zt, **kw), (zs, zt), create_graph=True)
    for a_, b_ in zip(first, expected):
        torch.testing.assert_close(a_.double(), b_.double(), rtol=0,
                                   atol=(1e-3 if dtype == torch.float32 else 1e-8) * b_.abs().max().item())
    assert torch.isfinite(torch.autograd.grad(first[0].square().sum(), zs)[0]).all()


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 0.011), (torch.float32, 0.003), (torch.float64, 1 / 720)])
def test_sinkd_columns_whose_kernel_underflows(device, dtype, eps):
    # A column whose every exp(-W / eps) (row-shifted) is subnormal: the reciprocal of its sum
    # overflowed and the loss was NaN, where the eager formulation divides subnormals by their
    # subnormal sum and stays finite. Each column is now shifted by its smallest cost too.
    g = torch.Generator().manual_seed(7)
    if eps == 0.003:
        zs, zt = torch.randn(8, 5, generator=g) * 5, torch.randn(8, 5, generator=g) * 5
    else:
        big = 20.0 if dtype == torch.float32 else 40.0
        zs, zt = torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [big, -big]])
    zs = zs.to(device, dtype).requires_grad_()
    zt = zt.to(device, dtype).requires_grad_()
    kw = dict(eps=eps, n_iter=20)
    loss = fastloss.sinkhorn_kd_loss(zs, zt, **kw)
    ref = sinkd_reference(zs.detach().double(), zt.detach().double(), **kw)
    assert torch.isfinite(ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    got = torch.autograd.grad(loss, (zs, zt))
    assert all(torch.isfinite(t).all() for t in got)
    # The reference's own gradients are NaN here (autograd through its subnormals); the
    # create_graph=True path (the formulation in ATen ops, shifted alike) must agree with the
    # fused backward.
    first = torch.autograd.grad(fastloss.sinkhorn_kd_loss(zs, zt, **kw), (zs, zt), create_graph=True)
    for a_, b_ in zip(first, got):
        torch.testing.assert_close(a_, b_, rtol=1e-3 if dtype == torch.float32 else 1e-9,
                                   atol=(1e-4 if dtype == torch.float32 else 1e-10) * b_.abs().max().item() + 1e-30)


def test_sinkd_float32_gradient_where_the_scalings_spread_widely(device):
    """T = 0.1, eps = 0.003: the float32 scalings reach x ~ 2.4e23 and y ~ 1.1e15 (valid values,
    the loss is right), and the backward formed x_i y_j (1 - W_ij / eps) and the rank-2n
    product before multiplying by K_ij: inf x ~0 = NaN in 21 entries of d student. The
    powers of two of x_n and y_n now move from the factors onto K (exact scalings)."""
    zs = torch.tensor([
        [-5.3125, 1.2578125, 3.765625, -3.59375, -4.25, 1.59375, 3.734375],
        [2.703125, 0.50390625, -0.125, -4.25, 1.5625, -1.75, -0.1494140625],
        [4.46875, -1.5625, 0.57421875, 6.09375, -0.482421875, -1.8828125, -3.015625],
        [5.84375, 0.734375, 2.421875, 3.359375, 0.265625, 0.69140625, -0.84375],
        [0.91015625, 3.3125, 2.03125, 0.828125, -1.640625, 2.4375, 0.80859375],
        [-3.3125, -0.70703125, -0.0024871826171875, -0.33203125, -2.484375, 6.1875, 0.42578125],
        [-2.078125, 2.6875, 0.087890625, -2.359375, 3.0625, 1.96875, 2.34375],
    ])
    zt = torch.tensor([
        [0.091796875, -1.375, -1.6953125, -1.828125, -0.443359375, 4.25, -6.6875],
        [-0.1826171875, 0.87109375, -2.25, 4.09375, -0.380859375, -2.453125, -1.3828125],
        [-0.54296875, 0.8203125, -3.71875, -1.125, -0.8671875, 5.5, -0.146484375],
        [-4.3125, -1.4375, 0.54296875, -2.59375, 0.73046875, -2.484375, -0.474609375],
        [0.91015625, -0.5390625, -3.15625, 0.62109375, -0.65625, 0.2177734375, 3.890625],
        [-1.515625, 0.6484375, -2.375, 3.8125, -1.1796875, -1.2734375, -2.734375],
        [3.765625, 3.859375, -0.7109375, -2.484375, -1.3125, -0.392578125, -2.25],
    ])
    kw = dict(temperature=0.1, eps=0.003, n_iter=50, scale=1.0)
    grads = []
    for dtype in (torch.float32, torch.float64):
        a, b = (t.to(device, dtype).requires_grad_() for t in (zs, zt))
        grads.append(torch.autograd.grad(fastloss.sinkhorn_kd_loss(a, b, **kw), (a, b)))
    for got, ref in zip(*grads):
        assert torch.isfinite(got).all()
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("n_iter", [40, 90])
def test_sinkd_float32_where_the_scalings_leave_float32s_range(device, n_iter):
    """eps = 0.0065, T = 0.3: the scalings spread by ~3 powers of two per step (x from 2^-136 to
    2^122 after 90 steps here). Float32 normalizations went to inf and NaN there (the loss was
    NaN in about half of such random problems); the normalizations now run in float64 wherever
    a float32 scaling would leave 2^+-63, and the float32 loss and gradients follow float64's."""
    g = torch.Generator().manual_seed(38)
    zs, zt = (torch.randn(38, 9, generator=g) * 3 for _ in range(2))
    kw = dict(temperature=0.3, eps=0.0065, n_iter=n_iter, scale=1.0)
    xs = torch.ops.fastloss.sinkhorn_kd(zs.double().to(device), zt.double().to(device), 0.3, 0.0065, n_iter, 1.0)[4]
    span = xs.log2()
    assert span.min() < -126 or span.max() > 127 if n_iter == 90 else span.abs().max() > 63
    results = []
    for dtype in (torch.float32, torch.float64):
        a, b = (t.to(device, dtype).requires_grad_() for t in (zs, zt))
        loss = fastloss.sinkhorn_kd_loss(a, b, **kw)
        results.append((loss, *torch.autograd.grad(loss, (a, b))))
    for got, ref in zip(*results):
        assert torch.isfinite(got).all()
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("eps,narrow", [(0.1, True), (0.01, False)])
def test_sinkd_float32_normalizations_keep_clear_of_subnormals(eps, narrow):
    """CPU: float32 normalizations where every kernel entry is 0 or >= 2^-60 (eps = 0.1 here);
    at eps = 0.01 smaller entries made products with the scalings subnormal (the processor's
    slow path: 256 x 3 took 17x the time at eps = 0.1) and they run in float64. Either way the loss and
    gradients follow float64's. (Which one ran shows in the saved scalings: float32 values
    or not.)"""
    g = torch.Generator().manual_seed(256)
    zs, zt = (torch.randn(256, 3, generator=g) for _ in range(2))
    kw = dict(temperature=1.0, eps=eps, n_iter=20, scale=1.0)
    xs = torch.ops.fastloss.sinkhorn_kd(zs, zt, 1.0, eps, 20, 1.0)[4]
    assert torch.equal(xs, xs.float().double()) == narrow
    results = []
    for dtype in (torch.float32, torch.float64):
        a, b = (t.to(dtype).requires_grad_() for t in (zs, zt))
        loss = fastloss.sinkhorn_kd_loss(a, b, **kw)
        results.append((loss, *torch.autograd.grad(loss, (a, b))))
    for got, ref in zip(*results):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("T,n_iter,seed", [(1.0, 5, 1), (2.0, 20, 1), (1.0, 20, 2)])
def test_sinkd_float32_gradients_of_small_batches(device, T, n_iter, seed):
    """Batches of 2 at eps = 0.01: with float32 normalizations the gradients were 1e-5 to 3e-5
    off (relative), from the cancellation of test_sinkd_float32_gradient_where_its_terms_cancel;
    small batches also normalize in float64 (CPU; CUDA always does)."""
    g = torch.Generator().manual_seed(seed)
    zs, zt = ((torch.randn(2, 3, generator=g, dtype=torch.float64) * 3).float() for _ in range(2))
    kw = dict(temperature=T, eps=0.01, n_iter=n_iter, scale=1.0)
    grads = []
    for dtype in (torch.float32, torch.float64):
        a, b = (t.to(device, dtype).requires_grad_() for t in (zs, zt))
        grads.append(torch.autograd.grad(fastloss.sinkhorn_kd_loss(a, b, **kw), (a, b)))
    for got, ref in zip(*grads):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6


# Normwise errors before -> after: 8.7e-7 -> 2.4e-7 (eager float32: 2.2e-7), 1.1e-5 -> 1.2e-6
# (eager float32: NaN, its kernel underflows), 3.3e-6 -> 6.5e-7 (eager float32: 8.6e-7).
@pytest.mark.parametrize("B,spread,correlated,eps,seed,tol", [(32, 8.0, True, 0.05, 0, 5e-7),
                                                              (16, 2.0, False, 0.01, 1, 3e-6),
                                                              (64, 8.0, False, 0.05, 2, 1.5e-6)])
def test_sinkd_float32_gradient_where_its_terms_cancel(B, spread, correlated, eps, seed, tol):
    """CPU, float32 normalizations: the cost gradient's two terms, s P o W / eps and the reverse
    sweep's K o Lf Rf^T / eps, are many times the size of their difference where W / eps is
    large; computed with W as it is, that cancellation put the float32 gradient several times
    farther from float64's than eager float32's. With W less its column minima (the same
    derivative) it has float32's accuracy."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, 100, generator=g) * spread
    zt = zs + 0.3 * spread * torch.randn(B, 100, generator=g) if correlated else torch.randn(B, 100, generator=g) * spread
    kw = dict(temperature=2.0, eps=eps, n_iter=20, scale=1e-3)
    xs = torch.ops.fastloss.sinkhorn_kd(zs, zt, 2.0, eps, 20, 1e-3)[4]
    assert torch.equal(xs, xs.float().double())  # the float32 normalizations ran
    grads = []
    for dtype in (torch.float32, torch.float64):
        a, b = (t.to(dtype).requires_grad_() for t in (zs, zt))
        grads.append(torch.cat([d.flatten() for d in torch.autograd.grad(fastloss.sinkhorn_kd_loss(a, b, **kw), (a, b))]))
    got, ref = grads
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype,shifts", [(torch.float32, (40, -40)), (torch.float32, (123, -124)),
                                          (torch.float64, (1021, -1018))])
def test_sinkd_backward_with_scalings_near_the_ends_of_the_range(device, dtype, shifts):
    """A trajectory rescaled as (x 2^c, y 2^-c) has the same plan, loss and gradients; with x_n or
    y_n near the ends of the exponent range, moving their powers of two (2^1024 = inf) or their
    reciprocals onto the factors overflowed: the powers are clamped. (Float32 logits: shifts of
    2^+-40 keep the CPU's reverse sweep in float32, those of 2^+-123 move it to float64, as
    scalings beyond 2^+-63 do.)"""
    g = torch.Generator().manual_seed(64)
    zs, zt = (torch.randn(64, 10, generator=g, dtype=dtype).to(device) for _ in range(2))
    loss, ps, pt, W, xs, ys = torch.ops.fastloss.sinkhorn_kd(zs, zt, 1.0, 0.1, 20, 1.0)
    one = torch.ones((), dtype=dtype, device=device)
    args = (1.0, 0.1, 1.0, True, True, dtype, dtype)
    base = torch.ops.fastloss.sinkhorn_kd_backward(one, ps, pt, W, xs, ys, *args)
    # (for these inputs, float64: x_n up to 2^1022.4 / down to 2^-1022.5; further, the sweep's
    # own products of the scalings overflow, before and after the clamp)
    for c in shifts:
        got = torch.ops.fastloss.sinkhorn_kd_backward(one, ps, pt, W, xs * 2.0**c, ys * 2.0**-c, *args)
        for a, b in zip(got, base):
            # the sweep's own products of such scalings pass through subnormals: close, not equal
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())


def test_sinkd_cpu_independent_of_thread_count():
    # B = 600 takes the parallel fused passes: fixed row ranges, added in a fixed order.
    g = torch.Generator().manual_seed(600)
    zs = (torch.randn(600, 7, generator=g) * 3).requires_grad_()
    zt = torch.randn(600, 7, generator=g) * 3
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            loss = fastloss.sinkhorn_kd_loss(zs, zt, eps=0.2)
            results.append((loss, *torch.autograd.grad(loss, zs)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a_, b_ in zip(results[0], other):
            assert torch.equal(a_, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [3, 200])
def test_sinkd_low_precision(device, dtype, C):
    g = torch.Generator().manual_seed(C)
    z64s = torch.randn(40, C, generator=g, dtype=torch.float64).to(device) * 2
    z64t = torch.randn(40, C, generator=g, dtype=torch.float64).to(device) * 2
    zs = z64s.to(dtype).requires_grad_()
    zt = z64t.to(dtype)
    loss = fastloss.sinkhorn_kd_loss(zs, zt)
    assert loss.dtype == dtype
    (gs,) = torch.autograd.grad(loss, zs)
    assert gs.dtype == dtype
    zr = zs.detach().double().requires_grad_()
    ref = sinkd_reference(zr, zt.double())
    (gr,) = torch.autograd.grad(ref, zr)
    # fp32 accumulation: as close to the float64 reference as torch's own fp32 formulation.
    zf = zs.detach().float().requires_grad_()
    ref32 = sinkd_reference(zf, zt.float())
    (g32,) = torch.autograd.grad(ref32, zf)
    loss_err = (loss.double() - ref).abs().item()
    grad_err = (gs.double() - gr).abs().max().item()
    out_eps = torch.finfo(dtype).eps
    assert loss_err <= 2 * (ref32.double() - ref).abs().item() + out_eps * ref.abs().item() + 1e-9
    # (+ the spacing of subnormals: float16 gradients of ~1e-5 are subnormal)
    quantum = torch.finfo(dtype).smallest_normal * out_eps
    assert grad_err <= 2 * (g32.double() - gr).abs().max().item() + out_eps * gr.abs().max().item() + quantum


def test_sinkd_gradcheck(device):
    zs = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    zt = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: fastloss.sinkhorn_kd_loss(s, t, n_iter=5, eps=0.3), (zs, zt))
    # More classes than the few-classes kernel takes.
    zs = torch.randn(5, 40, dtype=torch.float64, device=device, requires_grad=True)
    zt = torch.randn(5, 40, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: fastloss.sinkhorn_kd_loss(s, t, n_iter=4, eps=0.5), (zs, zt))


def test_sinkd_double_backward(device):
    g = torch.Generator().manual_seed(77)
    zs = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    zt = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    kw = dict(temperature=1.5, eps=0.3, n_iter=4, scale=0.5)
    loss = fastloss.sinkhorn_kd_loss(zs, zt, **kw)
    first = torch.autograd.grad(loss, (zs, zt), create_graph=True)
    plain = torch.autograd.grad(fastloss.sinkhorn_kd_loss(zs, zt, **kw), (zs, zt))
    for a_, b_ in zip(first, plain):
        assert a_.requires_grad
        torch.testing.assert_close(a_, b_, rtol=1e-12, atol=1e-15)
    # Second derivatives (a gradient penalty and a Hessian-vector product) against autograd
    # through the eager formulation.
    ref = sinkd_reference(zs, zt, **kw, twice_differentiable=True)
    ref_first = torch.autograd.grad(ref, (zs, zt), create_graph=True)
    u = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    got = torch.autograd.grad((first[0] ** 2).sum() + (first[1] * u).sum(), (zs, zt))
    expected = torch.autograd.grad((ref_first[0] ** 2).sum() + (ref_first[1] * u).sum(), (zs, zt))
    for a_, b_ in zip(got, expected):
        torch.testing.assert_close(a_, b_, rtol=1e-9, atol=1e-12 * b_.abs().max().item())
    f = lambda s, t: fastloss.sinkhorn_kd_loss(s, t, **kw)
    assert torch.autograd.gradgradcheck(f, (zs, zt))
    # Only the student differentiable, as in distillation; more classes than the few-classes kernel.
    zs = torch.randn(4, 40, dtype=torch.float64, device=device, requires_grad=True)
    zt = torch.randn(4, 40, dtype=torch.float64, device=device)
    assert torch.autograd.gradgradcheck(lambda s: fastloss.sinkhorn_kd_loss(s, zt, n_iter=3, eps=0.5), (zs,))


def test_sinkd_double_backward_row_chunks(device):
    # 6 x 150000: the L1 cost's derivative maps go in row chunks of 4 and 2.
    g = torch.Generator().manual_seed(78)
    zs = torch.randn(6, 150000, generator=g, dtype=torch.float64).to(device).requires_grad_()
    zt = torch.randn(6, 150000, generator=g, dtype=torch.float64).to(device).requires_grad_()
    kw = dict(temperature=0.5, eps=0.3, n_iter=3, scale=1.0)
    first = torch.autograd.grad(fastloss.sinkhorn_kd_loss(zs, zt, **kw), (zs, zt), create_graph=True)
    got = torch.autograd.grad((first[0] ** 2).sum() + (first[1] ** 2).sum(), (zs, zt))
    ref_first = torch.autograd.grad(sinkd_reference(zs, zt, **kw, twice_differentiable=True), (zs, zt), create_graph=True)
    expected = torch.autograd.grad((ref_first[0] ** 2).sum() + (ref_first[1] ** 2).sum(), (zs, zt))
    for a_, b_ in zip(got, expected):
        torch.testing.assert_close(a_, b_, rtol=1e-9, atol=1e-11 * b_.abs().max().item())


def test_sinkd_create_graph_low_precision(device):
    zs = torch.randn(8, 12, device=device).bfloat16().requires_grad_()
    zt = torch.randn(8, 12, device=device)
    (gs,) = torch.autograd.grad(fastloss.sinkhorn_kd_loss(zs, zt), zs, create_graph=True)
    (plain,) = torch.autograd.grad(fastloss.sinkhorn_kd_loss(zs, zt), zs)
    assert gs.dtype == torch.bfloat16 and gs.requires_grad
    torch.testing.assert_close(gs, plain, rtol=2e-2, atol=1e-2 * plain.abs().max().item())
    (h,) = torch.autograd.grad(gs.float().pow(2).sum(), zs)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h).all() and h.abs().max() > 0


def test_sinkd_op_softmax_outputs_differentiable(device):
    # The raw op's softmaxes (outputs 1 and 2) carry gradients to their logits.
    zs = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    zt = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    op = torch.ops.fastloss.sinkhorn_kd
    assert torch.autograd.gradcheck(lambda s, t: op(s, t, 2.0, 0.3, 3, 1.0)[:3], (zs, zt))
    assert torch.autograd.gradgradcheck(lambda s, t: op(s, t, 2.0, 0.3, 3, 1.0)[:3], (zs, zt))


def test_sinkd_opcheck(device):
    zs = torch.randn(7, 5, device=device, requires_grad=True)
    zt = torch.randn(7, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastloss.sinkhorn_kd, (zs, zt, 2.0, 0.1, 20, 0.001))
    torch.library.opcheck(torch.ops.fastloss.sinkhorn_kd, (zs.double(), zt.detach().double(), 1.0, 0.5, 3, 1.0))
    torch.library.opcheck(torch.ops.fastloss.sinkhorn_kd, (zs.detach().bfloat16().requires_grad_(), zt.detach(), 2.0, 0.1, 2, 0.1))
    _, ps, pt, W, x, y = torch.ops.fastloss.sinkhorn_kd(zs.detach(), zt.detach(), 2.0, 0.1, 4, 0.001)
    g = torch.tensor(1.0, device=device)
    torch.library.opcheck(
        torch.ops.fastloss.sinkhorn_kd_backward,
        (g, ps, pt, W, x, y, 2.0, 0.1, 0.001, True, False, torch.float32, torch.bfloat16),
    )


def test_sinkd_module_noncontiguous_empty(device):
    loss_fn = fastloss.nn.SinkhornKDLoss(temperature=3.0, n_iter=7)
    base = torch.randn(12, 20, dtype=torch.float64, device=device)
    zs = base.t()[:, :9]  # (20, 9), non-contiguous
    zt = torch.randn(9, 20, dtype=torch.float64, device=device).t()
    assert not zs.is_contiguous() and not zt.is_contiguous()
    torch.testing.assert_close(loss_fn(zs, zt), sinkd_reference(zs, zt, temperature=3.0, n_iter=7))
    assert "n_iter=7" in repr(loss_fn)
    empty = torch.zeros(0, 5, device=device, requires_grad=True)
    loss = fastloss.sinkhorn_kd_loss(empty, torch.zeros(0, 5, device=device))
    assert loss.item() == 0
    loss.backward()
    assert empty.grad.shape == (0, 5)
    # create_graph=True recomputes the formulation, whose shifts (row and column minima) an
    # empty batch does not have (amin raised IndexError).
    (g,) = torch.autograd.grad(fastloss.sinkhorn_kd_loss(empty, torch.zeros(0, 5, device=device), n_iter=3), empty,
                               create_graph=True)
    assert g.shape == (0, 5)


def test_sinkd_bad_input(device):
    z = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="'temperature'"):
        fastloss.sinkhorn_kd_loss(z, z, temperature=0)
    with pytest.raises(ValueError, match="'eps'"):
        fastloss.sinkhorn_kd_loss(z, z, eps=-0.1)
    with pytest.raises(ValueError, match="'n_iter'"):
        fastloss.sinkhorn_kd_loss(z, z, n_iter=-1)
    with pytest.raises(RuntimeError, match="'teacher_logits' to have the shape"):
        fastloss.sinkhorn_kd_loss(z, z[:3])
    with pytest.raises(RuntimeError, match="shape \\(B, classes\\)"):
        fastloss.sinkhorn_kd_loss(z[0], z[0])
    with pytest.raises(TypeError, match="'teacher_logits'"):
        fastloss.sinkhorn_kd_loss(z, None)
    # n_iter + 1 saved scalings per problem: a count whose bytes overflow int64 is refused by
    # name (it overflowed into a negative size) on the real and the fake kernel.
    for n_iter in (2**63 - 1, 2**62, 2**61 // 4):
        with pytest.raises(RuntimeError, match="expected 'n_iter' <= 288230376151711742 "):
            fastloss.sinkhorn_kd_loss(z, z, n_iter=n_iter)
        with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="expected 'n_iter' <= "):
            fastloss.sinkhorn_kd_loss(mode.from_tensor(z), mode.from_tensor(z), n_iter=n_iter)


def test_sinkd_backward_op_checks_scale(device):
    """The backward op refuses the non-finite scale its forward refuses (it returned NaN/inf)."""
    s = torch.randn(4, 3, device=device, dtype=torch.float64)
    saved = torch.ops.fastloss.sinkhorn_kd(s, s.flip(0), 2.0, 0.1, 3, 0.001)[1:]
    grad_loss = torch.ones((), device=device, dtype=torch.float64)
    for scale in (math.nan, math.inf):
        for call in (lambda *a: torch.ops.fastloss.sinkhorn_kd_backward(*a),
                     lambda *a: _fake_call(torch.ops.fastloss.sinkhorn_kd_backward, *a)):
            with pytest.raises(RuntimeError, match="'scale' to be finite"):
                call(grad_loss, *saved, 2.0, 0.1, scale, True, True, torch.float64, torch.float64)


def _fake_call(op, *args):
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def test_envelope_backward_makes_no_plan_sized_zeros():
    """Only the value's gradient is read: autograd must not fill the plan's (unused) gradient
    with a plan-sized float32 tensor of zeros."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PlanSizedFills(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.seen = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (isinstance(out, torch.Tensor) and out.numel() >= self.numel
                    and func.__name__.startswith(("zeros", "zero_", "full", "new_zeros", "fill_"))):
                self.seen.append(func.__name__)
            return out

    cost = torch.rand(2, 64, 32, generator=torch.Generator().manual_seed(18), requires_grad=True)
    value = fastloss.sinkhorn_cost(cost, eps=0.1)
    mode = PlanSizedFills(cost.numel())
    with mode:
        (grad,) = torch.autograd.grad(value.sum(), cost)
    assert mode.seen == []
    torch.testing.assert_close(grad, fastloss.sinkhorn(cost.detach(), eps=0.1).plan)


def test_cpu_iterations_flush_subnormals_and_restore_the_thread_state():
    """Peaked marginals (softmax of std 30: masses down to 1e-40) made the scaling passes'
    products subnormal (9x the time); the CPU iterations flush subnormals, within their own
    threads only: the caller's arithmetic keeps its subnormals afterwards, and the value matches
    float64's as before."""
    g = torch.Generator().manual_seed(30)
    c = torch.rand(4, 64, 48, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(4, 64, generator=g, dtype=torch.float64) * 30, 1)
    b = torch.softmax(torch.randn(4, 48, generator=g, dtype=torch.float64) * 30, 1)
    assert ((a.float() > 0) & (a.float() < torch.finfo(torch.float32).tiny)).any()
    ref = fastloss.sinkhorn(c, a, b, eps=0.1, max_iter=100, tol=0).value
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            got = fastloss.sinkhorn(c.float(), a.float(), b.float(), eps=0.1, max_iter=100, tol=0).value
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
            # (subnormal arithmetic in this thread still gives subnormals)
            assert (torch.tensor([1e-39]) * torch.tensor([0.5])).item() > 0
            assert (torch.tensor([1e-310], dtype=torch.float64) * 0.5).item() > 0
    finally:
        torch.set_num_threads(threads)
