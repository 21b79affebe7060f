"""torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, jvp, vmap and their nestings)
and forward-mode AD through the fastloss ops, against eager autograd (reverse mode) and, for
softmax, against torch itself."""

import unittest.mock
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastloss
from fastloss import vmf


def _randn(*shape, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64, device=device)


def _positive(*shape, device="cpu", scale=10.0):
    return torch.rand(*shape, dtype=torch.float64, device=device) * scale + 0.05


# name -> (function of tensors, inputs(device), whether a second derivative exists)
CASES = {
    "softmax": (lambda x: fastloss.softmax(x, dim=-1), lambda d: (_randn(3, 7, device=d),), True),
    "softmax_dim0": (lambda x: fastloss.softmax(x, dim=0), lambda d: (_randn(3, 7, device=d),), True),
    "log_softmax": (lambda x: fastloss.log_softmax(x, dim=1), lambda d: (_randn(3, 7, 2, device=d),), True),
    "log_bessel_iv": (fastloss.log_bessel_iv, lambda d: (_positive(4, 1, device=d), _positive(4, 5, device=d)), True),
    "log_bessel_kv": (fastloss.log_bessel_kv, lambda d: (_randn(5, device=d), _positive(5, device=d)), True),
    "vmf_log_normalizer": (lambda k: fastloss.vmf_log_normalizer(k, 5), lambda d: (_positive(6, device=d),), True),
    "vmf_mean_resultant": (lambda k: fastloss.vmf_mean_resultant(k, 40), lambda d: (_positive(6, device=d),), True),
    # A_p' has one more derivative, A_p'' (A_p''' is not implemented).
    "vmf_mean_resultant_slope": (lambda k: vmf._mean_resultant_slope(k, 3), lambda d: (_positive(6, device=d),),
                                 False),
    "vmf_mean_resultant_complement": (lambda k: vmf._mean_resultant_complement(k, 3),
                                      lambda d: (_positive(6, device=d),), True),
    "vmf_entropy": (lambda k: vmf._vmf_entropy(k, 8), lambda d: (_positive(6, device=d),), True),
    "vmf_kappa_mle": (lambda r: fastloss.vmf_kappa_mle(r, 16),
                      lambda d: (_positive(6, device=d, scale=0.9),), True),
    "stat_topk_soft": (lambda x: fastloss.stat_topk(x, sparsity=0.7), lambda d: (_randn(3, 40, device=d),), True),
    "stat_topk_hard_dim0": (lambda x: fastloss.stat_topk(x, sparsity=0.6, dim=0, mode="hard"),
                            lambda d: (_randn(30, 3, device=d),), True),
    "stat_topk_constant_threshold": (lambda x: fastloss.stat_topk(x, k=9, threshold_grad=False),
                                     lambda d: (_randn(3, 40, device=d),), True),
    "stat_topk_threshold": (lambda x: fastloss.stat_topk(x, sparsity=0.7, return_threshold=True)[1],
                            lambda d: (_randn(3, 40, device=d),), True),
    "stat_topk_gelu_mul": (lambda g, u: fastloss.stat_topk_gelu_mul(g, u, 0.6),
                           lambda d: (_randn(3, 40, device=d), _randn(3, 40, device=d)), True),
}

_TARGETS = torch.tensor([[1, 2, -100, 0, 12], [3, 3, 7, 11, 0]])

CASES.update({
    "linear_cross_entropy": (lambda h, c: fastloss.linear_cross_entropy(h, c, _TARGETS.to(h.device)),
                             lambda d: (_randn(2, 5, 4, device=d), _randn(13, 4, device=d)), True),
    "linear_cross_entropy_options": (
        lambda h, c, b: fastloss.linear_cross_entropy(h, c, _TARGETS.to(h.device), b, reduction="none", softcap=2.0,
                                                      label_smoothing=0.1, z_loss=1e-3, shift=True),
        lambda d: (_randn(2, 5, 4, device=d), _randn(13, 4, device=d), _randn(13, device=d)), True),
})

# Reverse mode only (grad, vjp, jacrev, vmap): forward mode raises.
REVERSE_ONLY = {
    "sinkhorn_kd_loss": (lambda s, t: fastloss.sinkhorn_kd_loss(s, t, n_iter=7),
                         lambda d: (_randn(6, 5, device=d), _randn(6, 5, device=d)), False),
    "sinkhorn_cost": (lambda c, a: fastloss.sinkhorn_cost(c, a / a.sum(), eps=0.2, tol=1e-12),
                      lambda d: (_positive(3, 4, 5, device=d), _positive(4, device=d)), False),
}
ALL = {**CASES, **REVERSE_ONLY}

SECOND_ORDER = [name for name, case in CASES.items() if case[2]]
FIRST_ORDER_ONLY = [name for name, case in ALL.items() if not case[2]]


def _reverse(fn, args, weight):
    """J^T weight for every argument, by eager autograd (the reference)."""
    leaves = [a.clone().requires_grad_() for a in args]
    return torch.autograd.grad((fn(*leaves) * weight).sum(), leaves)


def _no_vmap_fallback():
    """Turns torch's warning for an op without a batching rule into an error."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=".*performance drop.*")
    return ctx


@pytest.mark.parametrize("name", list(ALL))
def test_reverse_mode_transforms_match_autograd(name, device):
    fn, make, _ = ALL[name]
    args = make(device)
    weight = torch.randn_like(fn(*args))
    expected = _reverse(fn, args, weight)
    argnums = tuple(range(len(args)))
    got = grad(lambda *a: (fn(*a) * weight).sum(), argnums=argnums)(*args)
    _, pullback = vjp(fn, *args)
    got_vjp = pullback(weight)
    jac = jacrev(fn, argnums=argnums)(*args)
    got_jac = [(j * weight.reshape(weight.shape + (1,) * a.dim())).flatten(0, weight.dim() - 1).sum(0)
               if weight.dim() else j * weight for j, a in zip(jac, args)]
    for g, v, j, e in zip(got, got_vjp, got_jac, expected):
        # The same backward kernels (the MLE's 1 / A' multiplies where the C++ autograd divides).
        torch.testing.assert_close(g, e, rtol=1e-15, atol=0)
        torch.testing.assert_close(v, e, rtol=1e-15, atol=0)
        torch.testing.assert_close(j, e, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_mode_matches_reverse_mode(name, device):
    # <weight, J t> = <J^T weight, t>, through torch.func.jvp and through forward_ad dual tensors.
    fn, make, _ = CASES[name]
    args = make(device)
    tangents = tuple(torch.randn_like(a) for a in args)
    out, jt = jvp(fn, args, tangents)
    torch.testing.assert_close(out, fn(*args), rtol=0, atol=0)
    weight = torch.randn_like(out)
    expected = sum((g * t).sum() for g, t in zip(_reverse(fn, args, weight), tangents))
    torch.testing.assert_close((jt * weight).sum(), expected, rtol=1e-12, atol=1e-12)
    with fwAD.dual_level():
        dual_out = fn(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(dual_out).tangent, jt, rtol=0, atol=0)
    argnums = tuple(range(len(args)))
    for f, r in zip(jacfwd(fn, argnums=argnums)(*args), jacrev(fn, argnums=argnums)(*args)):
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)


def test_stat_topk_tangent_matches_finite_differences():
    # An independent check of the threshold's tangent (mean(t) + z mean((x - mean) t) / std).
    x, up, tx, tu = (_randn(3, 50) for _ in range(4))
    h = 1e-6
    # Entries the step moves across the threshold (the kink of relu) are left out.
    theta = x.mean(-1, keepdim=True) + x.std(-1, correction=0, keepdim=True) * torch.special.ndtri(torch.tensor(0.6))
    smooth = (x - theta).abs() > 1e-4
    assert smooth.float().mean() > 0.9
    for fn in (lambda a, b: fastloss.stat_topk(a, sparsity=0.6) * b,
               lambda a, b: fastloss.stat_topk_gelu_mul(a, b, 0.6)):
        _, jt = jvp(fn, (x, up), (tx, tu))
        fd = (fn(x + h * tx, up + h * tu) - fn(x - h * tx, up - h * tu)) / (2 * h)
        torch.testing.assert_close(jt[smooth], fd[smooth], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(ALL))
def test_vmap_matches_a_loop_without_falling_back(name, device):
    fn, make, _ = ALL[name]
    args = make(device)
    batched = [torch.stack([a, 0.5 * a, a.flip(0)]) for a in args]
    expected = torch.stack([fn(*[b[i] for b in batched]) for i in range(3)])
    ctx = _no_vmap_fallback()
    try:
        torch.testing.assert_close(vmap(fn)(*batched), expected, rtol=0, atol=0)
        moved = [b.movedim(0, -1) for b in batched]
        torch.testing.assert_close(vmap(fn, in_dims=-1)(*moved), expected, rtol=0, atol=0)
        if len(args) == 2:  # one argument batched, the other shared
            # The ops' outputs are exact; a wrapper's reduction over a batch (torch's sum along an
            # inner dimension) can round an ulp away from the sum of one entry's (the mean of
            # linear_cross_entropy, 8% of random inputs).
            got = vmap(fn, in_dims=(0, None))(batched[0], args[1])
            torch.testing.assert_close(got, torch.stack([fn(b, args[1]) for b in batched[0]]), rtol=1e-15, atol=0)
            got = vmap(fn, in_dims=(None, 0))(args[0], batched[1])
            torch.testing.assert_close(got, torch.stack([fn(args[0], b) for b in batched[1]]), rtol=1e-15, atol=0)
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.parametrize("name", list(ALL))
def test_per_sample_gradients(name, device):
    # vmap(grad(f)): the usual per-sample-gradient idiom.
    fn, make, _ = ALL[name]
    args = make(device)
    batched = [torch.stack([a, 0.75 * a]) for a in args]
    loss = lambda *a: fn(*a).square().sum()  # noqa: E731
    argnums = tuple(range(len(args)))
    ctx = _no_vmap_fallback()
    try:
        got = vmap(grad(loss, argnums=argnums))(*batched)
    finally:
        ctx.__exit__(None, None, None)
    for i in range(2):
        sample = [b[i] for b in batched]
        leaves = [s.clone().requires_grad_() for s in sample]
        expected = torch.autograd.grad(loss(*leaves), leaves)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[i], e, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_second_derivatives_match_double_backward(name):
    fn, make, _ = CASES[name]
    x, *rest = make("cpu")
    loss = lambda a: fn(a, *rest).pow(3).sum()  # noqa: E731
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    direction = torch.randn_like(x)
    (expected,) = torch.autograd.grad((g * direction).sum(), leaf)  # H direction
    for transform in (hessian, lambda f: jacrev(jacrev(f)), lambda f: jacrev(jacfwd(f))):
        h = transform(loss)(x)
        got = (h.reshape(x.numel(), x.numel()) @ direction.reshape(-1)).reshape(x.shape)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_transforms_match_torch(log, dim):
    ours = (lambda x: fastloss.log_softmax(x, dim)) if log else (lambda x: fastloss.softmax(x, dim))
    ref = (lambda x: torch.log_softmax(x, dim)) if log else (lambda x: torch.softmax(x, dim))
    x = _randn(4, 6)
    for transform in (jacrev, jacfwd, lambda f: hessian(lambda a: f(a).pow(2).sum()), vmap,
                      lambda f: vmap(jacrev(f))):
        torch.testing.assert_close(transform(ours)(x), transform(ref)(x), rtol=1e-12, atol=1e-14)


def test_softmax_half_to_float_under_transforms():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    fn = lambda a: fastloss.softmax(a, dtype=torch.float32)  # noqa: E731
    assert vmap(fn)(x).dtype == torch.float32
    g = grad(lambda a: fn(a)[:, 0].sum())(x)
    assert g.dtype == torch.bfloat16
    leaf = x.clone().requires_grad_()
    torch.testing.assert_close(g, torch.autograd.grad(fn(leaf)[:, 0].sum(), leaf)[0], rtol=0, atol=0)
    _, t = jvp(fn, (x,), (torch.ones_like(x),))
    assert t.dtype == torch.float32


def test_vmap_of_zero_dim_rows():
    x = _randn(5)
    torch.testing.assert_close(vmap(lambda a: fastloss.softmax(a, 0))(x), torch.ones_like(x))
    torch.testing.assert_close(vmap(lambda a: fastloss.stat_topk(a, sparsity=0.5))(x), torch.zeros_like(x))
    with pytest.raises(IndexError, match="fastloss.softmax: 'dim' out of range"):
        vmap(lambda a: fastloss.softmax(a, 1))(x)


@pytest.mark.parametrize("name", FIRST_ORDER_ONLY)
def test_missing_second_derivatives_raise(name):
    fn, make, _ = ALL[name]
    args = make("cpu")
    loss = lambda a: fn(a, *args[1:]).pow(2).sum()  # noqa: E731
    for transform in (hessian, lambda f: jacrev(jacrev(f))):
        with pytest.raises(NotImplementedError, match="(second|third) derivative|envelope|forward-mode"):
            transform(loss)(args[0])


def test_nested_forward_mode_raises():
    # autograd.Function's jvp rule does not see an enclosing forward level's tangents: the
    # result would be silently wrong, so it raises.
    with pytest.raises(NotImplementedError, match="nested forward-mode"):
        jacfwd(jacfwd(lambda a: fastloss.softmax(a, -1)))(_randn(4))


@pytest.mark.parametrize("name", list(REVERSE_ONLY))
def test_forward_mode_raises_where_there_is_no_rule(name):
    # torch's own errors here do not name the op, and forward mode through a Python autograd
    # registration returned zero derivatives (sinkhorn_cost's directional derivative was 1, not 0).
    fn, make, _ = REVERSE_ONLY[name]
    args = make("cpu")
    tangents = tuple(torch.ones_like(a) for a in args)
    public = name.replace("_options", "")
    with pytest.raises(NotImplementedError, match=f"fastloss.{public}: forward-mode"):
        jvp(fn, args, tangents)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"fastloss.{public}: forward-mode"):
        fn(fwAD.make_dual(args[0], tangents[0]), *args[1:])
    # Nested: torch's generated vmap rule used to fail an AssertionError before the rule raised.
    first = lambda a: fn(a, *args[1:]).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match=f"fastloss.{public}: nested forward-mode"):
        jacfwd(jacfwd(first))(args[0])
    # Nested forward mode around the function, whose arguments carry no tangent: a constant.
    y = _randn(3)
    constant = fn(*args).sum()
    torch.testing.assert_close(jacfwd(jacfwd(lambda y: y.pow(3).sum() * fn(*args).sum()))(y),
                               torch.diag(6 * y) * constant)


def test_sinkhorn_results_are_constants_under_transforms():
    c = _positive(4, 5)
    g = grad(lambda x: fastloss.sinkhorn(x, eps=0.2).plan.sum() + x.sum())(c)
    torch.testing.assert_close(g, torch.ones_like(c))
    torch.testing.assert_close(vmap(lambda x: fastloss.sinkhorn(x, eps=0.2).plan)(c[None]), fastloss.sinkhorn(c[None], eps=0.2).plan)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_vocab_parallel_cross_entropy_under_transforms_raises():
    h, c = _randn(3, 4), _randn(5, 4)
    group = unittest.mock.Mock(spec=torch.distributed.ProcessGroup)  # refused before any collective
    fn = lambda x: fastloss.linear_cross_entropy(x, c, torch.tensor([1, 2, 0]), process_group=group)  # noqa: E731
    for transform in (grad, lambda f: (lambda x: vmap(f)(x[None])), lambda f: (lambda x: jvp(f, (x,), (x,)))):
        with pytest.raises(NotImplementedError, match="fastloss.linear_cross_entropy: torch.func .* process_group"):
            transform(fn)(h)


def test_unrolled_sinkhorn_cost_supports_forward_mode_ad():
    # grad="unrolled" is a loop of torch ops: forward mode works there (against reverse mode).
    c = _randn(3, 4).abs()
    direction = _randn(3, 4)
    fn = lambda c: fastloss.sinkhorn_cost(c, eps=0.5, max_iter=50, grad="unrolled")  # noqa: E731
    _, t = jvp(fn, (c,), (direction,))
    cr = c.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(cr), cr)
    torch.testing.assert_close(t, (g * direction).sum(), rtol=1e-10, atol=1e-12)


# ---- found by fuzzing -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sinkhorn_kd_second_derivative_raises_rather_than_zero(scale):
    # With a linear outer function the inner gradient's cotangent is a constant: the saved
    # softmaxes were constants too, so jacrev(jacrev(f)) came back all zeros.
    s, t = _randn(4, 5), _randn(4, 5)
    f = lambda a: scale * fastloss.sinkhorn_kd_loss(a, t, n_iter=5)  # noqa: E731
    with pytest.raises(NotImplementedError, match="second derivative"):
        jacrev(jacrev(f))(s)


@pytest.mark.parametrize("which", ["y_soft", "theta", "gelu_mul"])
def test_stat_topk_reverse_over_forward_matches_the_formula(which):
    # jacrev(jacfwd(f)): the tangents used the kernel's saved mean and std, constants to the
    # enclosing reverse transform, and the second derivative came back wrong without an error.
    import statistics

    z = statistics.NormalDist().inv_cdf(0.7)
    x, up = _randn(3, 12), _randn(3, 12)
    theta_ref = lambda a: a.mean(-1, keepdim=True) + a.std(-1, correction=0, keepdim=True) * z  # noqa: E731
    fns = {
        "y_soft": (lambda a: fastloss.stat_topk(a, sparsity=0.7), lambda a: torch.relu(a - theta_ref(a))),
        "theta": (lambda a: fastloss.stat_topk(a, sparsity=0.7, return_threshold=True)[1], theta_ref),
        "gelu_mul": (lambda a: fastloss.stat_topk_gelu_mul(a, up, 0.7),
                     lambda a: torch.nn.functional.gelu(torch.relu(a - theta_ref(a)), approximate="tanh") * up),
    }
    ours, ref = fns[which]
    torch.testing.assert_close(jacrev(jacfwd(ours))(x), jacrev(jacfwd(ref))(x), rtol=1e-10, atol=1e-12)
    constant = torch.full((2, 6), 0.1, dtype=torch.float64)  # std = 0: finite, no 0/0
    assert torch.isfinite(jacrev(jacfwd(ours if which != "gelu_mul" else
                                        (lambda a: fastloss.stat_topk_gelu_mul(a, up[:2, :6], 0.7))))(constant)).all()


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the graph breaks, by design
def test_forward_ad_through_torch_compile():
    # The compiled code runs on the dual tensors, but traced values carry no tangents: the
    # ops with Python autograd dropped them without a word (the others raised torch's generic
    # error). With a forward-AD level open the wrappers now take the transform path.
    x, t = _randn(3, 8), _randn(3, 8)
    c = _randn(5, 8)
    for fn in (lambda a: fastloss.stat_topk(a, sparsity=0.6), lambda a: fastloss.softmax(a, -1),
               lambda a: fastloss.log_bessel_iv(1.5, a.abs()),
               lambda a: fastloss.linear_cross_entropy(a, c, torch.tensor([0, 1, 2]))):
        with fwAD.dual_level():
            expected = fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent
            got = fwAD.unpack_dual(torch.compile(fn, backend="aot_eager")(fwAD.make_dual(x, t))).tangent
        torch.testing.assert_close(got, expected)
        torch._dynamo.reset()
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        torch.compile(lambda a: fastloss.sinkhorn_kd_loss(a, x), backend="aot_eager")(fwAD.make_dual(x, t))
    torch._dynamo.reset()


def test_sinkhorn_results_are_constants_under_forward_mode():
    c = _positive(4, 5)
    fn = lambda x: (fastloss.sinkhorn(x, eps=0.2).plan * x).sum()  # noqa: E731
    _, t = jvp(fn, (c,), (torch.ones_like(c),))
    torch.testing.assert_close(t, fastloss.sinkhorn(c, eps=0.2).plan.sum())


def test_von_mises_fisher_rsample_under_transforms():
    # The concentration's reparameterization gradient under torch.func.grad, jvp and
    # forward_ad (the tangent was dropped; torch.func refused torch's Beta sampler).
    from fastloss.distributions import VonMisesFisher

    loc = torch.nn.functional.normalize(_randn(5), dim=0)

    def samples(k):
        torch.manual_seed(0)
        return VonMisesFisher(loc, k).rsample((50,))

    def f(k):
        return samples(k).sum()

    kappa = torch.tensor(3.0, dtype=torch.float64)
    leaf = kappa.clone().requires_grad_()
    (expected,) = torch.autograd.grad(f(leaf), leaf)
    # The 250 per-entry derivatives cancel in the sum, by a factor that depends on loc: the
    # modes may order their additions differently, so the bound scales with their magnitudes.
    scale = jvp(samples, (kappa,), (torch.ones_like(kappa),))[1].abs().sum()
    close = dict(rtol=0, atol=float(1e-14 * scale))
    torch.testing.assert_close(grad(f)(kappa), expected, **close)
    torch.testing.assert_close(jvp(f, (kappa,), (torch.ones_like(kappa),))[1], expected, **close)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(kappa, torch.ones_like(kappa)))).tangent
    torch.testing.assert_close(tangent, expected, **close)


def test_vmap_over_an_empty_batch():
    assert vmap(lambda a: fastloss.sinkhorn_kd_loss(a, a))(torch.randn(0, 4, 5)).shape == (0,)
    h, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    per_classifier = vmap(lambda c: fastloss.linear_cross_entropy(h, c, t, reduction="sum"))
    assert per_classifier(torch.randn(0, 5, 4)).shape == (0,)
    assert vmap(lambda a: fastloss.softmax(a, -1))(torch.randn(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("name", list(ALL))
def test_functionalize_takes_the_plain_path(name):
    # torch.func.functionalize has no rule for autograd.Function; the ops mutate nothing, so
    # under functionalize alone they are called directly (as before torch.func support).
    fn, make, _ = ALL[name]
    args = make("cpu")
    torch.testing.assert_close(torch.func.functionalize(fn)(*args), fn(*args), rtol=0, atol=0)


def test_torch_export():
    class Model(torch.nn.Module):
        def forward(self, x):
            return fastloss.softmax(x, -1) + fastloss.stat_topk(x, sparsity=0.5) + fastloss.log_bessel_iv(0.5, x.abs())

    x = _randn(4, 8)
    exported = torch.export.export(Model(), (x,))
    torch.testing.assert_close(exported.module()(x), Model()(x), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "label_smoothing": 0.1, "z_loss": 1e-3, "shift": True}])
def test_per_sample_hidden_gradients_of_cut_cross_entropy(options):
    # The README's example: hidden-state gradients only, shared classifier (the batch folds into
    # the tokens; the other tests also differentiate the classifier, which loops).
    hidden, classifier, bias = _randn(3, 5, 4), _randn(13, 4), _randn(13)
    targets = torch.randint(0, 13, (3, 5))
    targets[1, 2] = -100
    loss = lambda h, t: fastloss.linear_cross_entropy(h, classifier, t, bias, **options)  # noqa: E731
    ctx = _no_vmap_fallback()
    try:
        got = vmap(grad(loss))(hidden, targets)
    finally:
        ctx.__exit__(None, None, None)
    for i in range(3):
        leaf = hidden[i].clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss(leaf, targets[i]), leaf)
        torch.testing.assert_close(got[i], expected, rtol=1e-13, atol=1e-15)


def test_unrolled_sinkhorn_cost_checks_marginals_under_grad():
    # The marginal checks branch on values: skipped under vmap only (they were skipped under
    # every transform, and grad returned a value for marginals of unequal mass).
    c = _positive(4, 5)
    a = torch.full((4,), 0.5, dtype=torch.float64)  # mass 2 against b's 1
    fn = lambda x: fastloss.sinkhorn_cost(x, a, eps=0.5, max_iter=20, grad="unrolled")  # noqa: E731
    with pytest.raises(RuntimeError, match="same total mass"):
        grad(fn)(c)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the graph breaks, by design
def test_torch_compile_of_transforms():
    x = _randn(3, 6)
    for fn in (lambda a: fastloss.log_softmax(a, -1).pow(2).sum(), lambda a: fastloss.stat_topk(a, sparsity=0.5).sum(),
               lambda a: fastloss.vmf_log_normalizer(a.abs(), 5).sum()):
        for transform in (grad, lambda f: vmap(grad(f))):
            expected = transform(fn)(x)
            torch.testing.assert_close(torch.compile(transform(fn), backend="aot_eager")(x), expected)
        torch._dynamo.reset()


@pytest.mark.parametrize("name", list(ALL))
def test_vmap_inside_eager_autograd(name):
    # Under vmap alone the ops' batching rules serve directly, unless autograd records the call
    # (an input requiring grad): then the transform function, whose backward eager autograd runs.
    fn, make, _ = ALL[name]
    args = make("cpu")
    batched = [torch.stack([a, 0.5 * a]).requires_grad_() for a in args]
    out = vmap(fn)(*batched)
    weight = torch.randn_like(out)
    got = torch.autograd.grad((out * weight).sum(), batched)
    leaves = [b.detach().clone().requires_grad_() for b in batched]
    expected_out = torch.stack([fn(*[leaf[i] for leaf in leaves]) for i in range(2)])
    expected = torch.autograd.grad((expected_out * weight).sum(), leaves)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("which", ["soft", "hard", "theta", "soft_and_theta", "constant_threshold", "dim0"])
def test_stat_topk_hessian_and_hessian_vector_products(which):
    # Forward over reverse through the backward op's forward rule, against the eager formula.
    import statistics

    z = statistics.NormalDist().inv_cdf(0.7)
    theta_ref = lambda a: a.mean(-1, keepdim=True) + a.std(-1, correction=0, keepdim=True) * z  # noqa: E731
    fns = {
        "soft": (lambda a: fastloss.stat_topk(a, sparsity=0.7), lambda a: torch.relu(a - theta_ref(a))),
        "hard": (lambda a: fastloss.stat_topk(a, sparsity=0.7, mode="hard"),
                 lambda a: a * (a > theta_ref(a).detach())),
        "theta": (lambda a: fastloss.stat_topk(a, sparsity=0.7, return_threshold=True)[1], theta_ref),
        "soft_and_theta": (
            lambda a: (lambda y, th: y.sum(-1, keepdim=True) * th)(
                *fastloss.stat_topk(a, sparsity=0.7, mode="hard", return_threshold=True)),
            lambda a: (a * (a > theta_ref(a).detach())).sum(-1, keepdim=True) * theta_ref(a)),
        "constant_threshold": (lambda a: fastloss.stat_topk(a, sparsity=0.7, threshold_grad=False),
                               lambda a: torch.relu(a - theta_ref(a).detach())),
        "dim0": (lambda a: fastloss.stat_topk(a.T, sparsity=0.7, dim=0), lambda a: torch.relu(a - theta_ref(a)).T),
    }
    ours, ref = fns[which]
    x, w = _randn(2, 9), _randn(2, 9)
    loss = lambda f: (lambda a: f(a).pow(3).sum())  # noqa: E731
    torch.testing.assert_close(hessian(loss(ours))(x), hessian(loss(ref))(x), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(jacrev(jacrev(loss(ours)))(x), hessian(loss(ref))(x), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(jvp(grad(loss(ours)), (x,), (w,))[1], jvp(grad(loss(ref)), (x,), (w,))[1],
                               rtol=1e-12, atol=1e-13)
    # Per-row Hessian-vector products: jvp(vmap(grad)) (torch's generated vmap rule failed an
    # internal assert there while the op's row statistics were non-differentiable outputs).
    rows = lambda f: (lambda a: f(a[None]).pow(3).sum())  # noqa: E731
    torch.testing.assert_close(jvp(vmap(grad(rows(ours))), (x,), (w,))[1],
                               jvp(vmap(grad(rows(ref))), (x,), (w,))[1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("threshold_grad", [True, False])
def test_stat_topk_gelu_mul_hessian_and_hessian_vector_products(threshold_grad):
    import statistics

    z = statistics.NormalDist().inv_cdf(0.6)
    theta_ref = lambda a: a.mean(-1, keepdim=True) + a.std(-1, correction=0, keepdim=True) * z  # noqa: E731
    ours = lambda g, u: fastloss.stat_topk_gelu_mul(g, u, 0.6, threshold_grad=threshold_grad)  # noqa: E731

    def ref(g, u):
        theta = theta_ref(g) if threshold_grad else theta_ref(g).detach()
        return torch.nn.functional.gelu(torch.relu(g - theta), approximate="tanh") * u

    loss = lambda f: (lambda g, u: f(g, u).pow(3).sum())  # noqa: E731
    gate, up, w, v = (_randn(2, 9) for _ in range(4))
    gate[1] *= 20  # gelu's far tail too (h > 8)
    expected_hessian = hessian(loss(ref), argnums=(0, 1))(gate, up)
    for transform in (hessian, lambda f, argnums: jacrev(jacrev(f, argnums=argnums), argnums=argnums)):
        for got, expected in zip(transform(loss(ours), argnums=(0, 1))(gate, up), expected_hessian):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    got = jvp(grad(loss(ours), argnums=(0, 1)), (gate, up), (w, v))[1]
    expected = jvp(grad(loss(ref), argnums=(0, 1)), (gate, up), (w, v))[1]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    rows = lambda f: (lambda g, u: f(g[None], u[None]).pow(3).sum())  # noqa: E731
    got = jvp(vmap(grad(rows(ours), argnums=(0, 1))), (gate, up), (w, v))[1]
    expected = jvp(vmap(grad(rows(ref), argnums=(0, 1))), (gate, up), (w, v))[1]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


_NO_TANGENT_THROUGH_BACKWARD = {"sinkhorn_kd_loss", "sinkhorn_cost"}


@pytest.mark.parametrize("name", list(ALL))
def test_forward_mode_through_the_output_gradient(name):
    # autograd.grad(fn(x), x, grad_outputs=dual(v, d)): the gradient is linear in v, so its
    # tangent is the gradient for d. Through a backward op without a forward rule the tangent
    # used to be dropped (None) without a word; where there is none, it raises.
    fn, make, _ = ALL[name]
    args = make("cpu")
    leaves = [a.clone().requires_grad_() for a in args]
    out = fn(*leaves)
    v, d = torch.randn_like(out), torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad_outputs=d, retain_graph=True)
    if name in _NO_TANGENT_THROUGH_BACKWARD:  # no jvp through these backwards: they raise, naming the op
        with fwAD.dual_level(), pytest.raises((RuntimeError, NotImplementedError), match=f"fastloss.{name}"):
            torch.autograd.grad(out, leaves, grad_outputs=fwAD.make_dual(v, d))
        return
    with fwAD.dual_level():
        grads = torch.autograd.grad(out, leaves, grad_outputs=fwAD.make_dual(v, d))
        tangents = [fwAD.unpack_dual(g).tangent for g in grads]
    for t, e in zip(tangents, expected):
        assert t is not None
        torch.testing.assert_close(t, e, rtol=1e-12, atol=1e-13)


def _stat_topk_cases():
    """(ours, the eager Gemma 3n formula) for stat_topk's and the gelu-mul's modes."""
    import statistics

    def theta_ref(a, sparsity):
        return a.mean(-1, keepdim=True) + a.std(-1, correction=0, keepdim=True) * statistics.NormalDist().inv_cdf(
            sparsity)

    up = _randn(2, 6)
    gelu = lambda h: torch.nn.functional.gelu(h, approximate="tanh")  # noqa: E731
    return {
        "soft_and_theta": (
            lambda a: (lambda o: o[0] * o[1])(fastloss.stat_topk(a, sparsity=0.65, return_threshold=True)),
            lambda a: torch.relu(a - theta_ref(a, 0.65)) * theta_ref(a, 0.65)),
        "hard": (lambda a: fastloss.stat_topk(a, sparsity=0.3, mode="hard"),
                 lambda a: a * (a > theta_ref(a, 0.3).detach())),
        "gelu_mul": (lambda a: fastloss.stat_topk_gelu_mul(a, up, 0.4),
                     lambda a: gelu(torch.relu(a - theta_ref(a, 0.4))) * up),
        "gelu_mul_constant_threshold": (lambda a: fastloss.stat_topk_gelu_mul(a, up, 0.4, threshold_grad=False),
                                        lambda a: gelu(torch.relu(a - theta_ref(a, 0.4).detach())) * up),
    }


@pytest.mark.parametrize("which", ["soft_and_theta", "hard", "gelu_mul", "gelu_mul_constant_threshold"])
def test_stat_topk_third_derivatives_and_reverse_over_forward(which):
    # The backward ops' forward rules take the row statistics (and the gelu-mul's theta) from
    # torch ops on x, so that reverse passes over them see their dependence on x: third
    # derivatives, reverse over forward, and a reverse pass through the tangent of a gradient
    # (these came out wrong with the kernel's saved statistics, constants to autograd).
    ours, ref = _stat_topk_cases()[which]
    x, w = _randn(2, 6), _randn(2, 6)  # (torch's own gelu gives NaN third derivatives far in its tail)
    loss = lambda f: (lambda a: (f(a).pow(2) * w).sum())  # noqa: E731
    expected = jacrev(jacrev(jacrev(loss(ref))))(x)
    for transform in (lambda f: jacrev(jacrev(jacrev(f))), lambda f: jacfwd(jacrev(jacrev(f))),
                      lambda f: jacrev(hessian(f))):
        torch.testing.assert_close(transform(loss(ours))(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacrev(jacfwd(ours))(x), jacrev(jacfwd(ref))(x), rtol=1e-11, atol=1e-12)

    def eager_third(f):
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(f)(leaf), leaf, create_graph=True)
        (h,) = torch.autograd.grad((g * w).sum(), leaf, create_graph=True)
        return torch.autograd.grad((h * w).sum(), leaf)[0]

    torch.testing.assert_close(eager_third(ours), eager_third(ref), rtol=1e-10, atol=1e-12)

    def through_dual_gradient(f):
        leaf = x.clone().requires_grad_()
        with fwAD.dual_level():
            (g,) = torch.autograd.grad(f(leaf), leaf, fwAD.make_dual(torch.ones_like(x), w), create_graph=True)
            tangent = fwAD.unpack_dual(g).tangent
            if not tangent.requires_grad:  # hard mode: the mask times w, constant in x
                return torch.zeros_like(x)
            return torch.autograd.grad(tangent.pow(2).sum(), leaf)[0]

    torch.testing.assert_close(through_dual_gradient(ours), through_dual_gradient(ref), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL))
def test_batched_output_gradients(name):
    # autograd.grad(..., is_grads_batched=True), as vectorized jacobians and gradcheck's batched
    # checks use it, against a loop; the in-place CPU backwards must leave batched gradients be.
    fn, make, _ = ALL[name]
    leaves = [a.clone().requires_grad_() for a in make("cpu")]
    out = fn(*leaves)
    v = torch.randn(3, *out.shape, dtype=out.dtype)
    batched = torch.autograd.grad(out, leaves, v, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        looped = torch.autograd.grad(out, leaves, v[i], retain_graph=True)
        for b, e in zip(batched, looped):
            torch.testing.assert_close(b[i], e, rtol=1e-12, atol=1e-13)


def test_sinkhorn_kd_vectorized_hessian():
    s, t = _randn(3, 5), _randn(3, 5)
    f = lambda s: fastloss.sinkhorn_kd_loss(s, t, n_iter=7)  # noqa: E731
    looped = torch.autograd.functional.hessian(f, s)
    torch.testing.assert_close(torch.autograd.functional.hessian(f, s, vectorize=True), looped, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.filterwarnings("ignore")  # compiled autograd's and dynamo's own warnings
@pytest.mark.parametrize("name", ["stat_topk_soft", "stat_topk_threshold", "stat_topk_gelu_mul", "sinkhorn_kd_loss"])
def test_compiled_autograd(name):
    # A forward run eagerly, its backward traced by compiled autograd: C++ autograd functions
    # with non-differentiable outputs used to fail an internal assert there.
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    fn, make, _ = ALL[name]
    args = make("cpu")
    expected = _reverse(fn, args, 1.0)
    leaves = [a.clone().requires_grad_() for a in args]
    loss = fn(*leaves).sum()
    torch._dynamo.reset()
    counters.clear()
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        loss.backward()
    assert counters["compiled_autograd"]["captures"] == 1
    torch._dynamo.reset()
    for leaf, e in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e20, 1e30])
def test_stat_topk_float32_tangents_at_extreme_magnitudes(scale):
    # The tangents and second derivatives recompute the row statistics: like the kernels, in
    # units of a power of two (plain float32 squares of these rows overflow or underflow).
    g = torch.Generator().manual_seed(5)
    x, t, w = (torch.randn(2, 64, generator=g, dtype=torch.float64) for _ in range(3))
    up = torch.randn(2, 64, generator=g, dtype=torch.float64)
    for f in (lambda z: fastloss.stat_topk(z, sparsity=0.5), lambda z: fastloss.stat_topk_gelu_mul(z, up.to(z), 0.5)):
        expected = jvp(f, (x * scale,), (t * scale,))[1]
        got = jvp(f, ((x * scale).float(),), ((t * scale).float(),))[1]
        torch.testing.assert_close(got.double() / scale, expected / scale, rtol=1e-4, atol=1e-4)

    def hvp_by_double_backward(z):
        z = z.clone().requires_grad_()
        y, theta = fastloss.stat_topk(z, sparsity=0.5, return_threshold=True)
        (g1,) = torch.autograd.grad((y * w.to(z)).sum() + theta.pow(2).sum() / scale, z, create_graph=True)
        return torch.autograd.grad((g1 * t.to(z)).sum(), z)[0]

    torch.testing.assert_close(hvp_by_double_backward((x * scale).float()).double(),
                               hvp_by_double_backward(x * scale), rtol=1e-4, atol=1e-4)


def test_log_bessel_zero_tangents_meet_infinite_derivatives():
    # log I_0(x) at x = 0: d/dx = 0 and d2/dx2 = 1/2 are finite, d/dv = -inf and d2/dvdx = inf;
    # v's tangent and cotangent are absent (v a number), not zeros that would make 0 * inf NaN.
    x = torch.tensor([0.0, 0.5], dtype=torch.float64)
    f = lambda x: fastloss.log_bessel_iv(0.0, x)  # noqa: E731
    reference = lambda x: torch.special.i0(x).log()  # noqa: E731
    torch.testing.assert_close(jvp(f, (x,), (torch.ones_like(x),))[1], jvp(reference, (x,), (torch.ones_like(x),))[1])
    expected = hessian(lambda x: reference(x).sum())(x)
    torch.testing.assert_close(hessian(lambda x: f(x).sum())(x), expected)
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(leaf).sum(), leaf, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(g.sum(), leaf)[0], expected.sum(0))
    # A tangent in v only, where d/dx overflows: jvp equals the reverse-mode d/dv.
    v, x = torch.tensor([1e6]), torch.tensor([1e-303], dtype=torch.float64)
    v = v.double()
    for fn in (fastloss.log_bessel_iv, fastloss.log_bessel_kv):
        leaf = v.clone().requires_grad_()
        (dv,) = torch.autograd.grad(fn(leaf, x).sum(), leaf)
        torch.testing.assert_close(jvp(lambda v: fn(v, x), (v,), (torch.ones_like(v),))[1], dv)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_second_derivatives_keep_the_input_dtype(log):
    # dtype=float32 on a bfloat16 input: the gradient is bfloat16, so is its tangent (torch's too).
    fn = fastloss.log_softmax if log else fastloss.softmax
    x = torch.randn(3, 8).to(torch.bfloat16)
    w = torch.randn(3, 8)
    f = lambda x: (fn(x, -1, dtype=torch.float32) * w).sum()  # noqa: E731
    _, tangent = jvp(grad(f), (x,), (torch.randn_like(x),))
    assert tangent.dtype == torch.bfloat16
    assert hessian(f)(x).dtype == torch.bfloat16


def test_stat_topk_tangents_and_double_backward_of_empty_rows():
    x = torch.randn(3, 0, dtype=torch.float64)
    f = lambda z: fastloss.stat_topk(z, sparsity=0.5)  # noqa: E731
    assert jvp(f, (x,), (torch.ones_like(x),))[1].shape == (3, 0)
    assert jvp(lambda z: fastloss.stat_topk_gelu_mul(z, z, 0.5), (x,), (torch.ones_like(x),))[1].shape == (3, 0)
    leaf = x.clone().requires_grad_()
    y, theta = fastloss.stat_topk(leaf, sparsity=0.5, return_threshold=True)
    (g,) = torch.autograd.grad(y.sum() + theta.sum(), leaf, create_graph=True)
    assert torch.autograd.grad(g.sum(), leaf, allow_unused=True)[0].shape == (3, 0)
