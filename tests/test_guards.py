"""Guards shared by every op: a meta argument beside a real one raises instead of returning
uninitialised memory, the fake kernels reject what the real ones reject, and NumPy scalars
pass where Python numbers do (forward-mode AD and torch.func transforms: test_func.py)."""

import math
import warnings

import numpy as np
import pytest
import torch

import fastloss


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


META_CASES = {
    "stat_topk_gelu_mul": lambda x, m: fastloss.stat_topk_gelu_mul(x, m, 0.5),
    "sinkhorn_kd_loss": lambda x, m: fastloss.sinkhorn_kd_loss(x, m),
    "sinkhorn_cost": lambda x, m: fastloss.sinkhorn_cost(x.abs(), m[:, 0].abs() + 1, eps=0.1),
    "log_bessel_iv": lambda x, m: fastloss.log_bessel_iv(m, x),
    "linear_cross_entropy": lambda x, m: fastloss.linear_cross_entropy(x, m, torch.tensor([0, 1])),
    "softmax_backward": lambda x, m: torch.ops.fastloss.softmax_backward.default(x, m, -1, torch.float64),
}


@pytest.mark.parametrize("name", list(META_CASES))
def test_meta_argument_beside_a_real_one_raises(name):
    # The dispatcher sends any call with a meta argument to the fake kernel, which returned an
    # uninitialised tensor on the other argument's device (values like 7e34).
    x = _randn(2, 4)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        META_CASES[name](x, _randn(2, 4).to("meta"))


F = torch.ops.fastloss
_LONG = torch.int64

# Op calls the kernels reject, by the argument their error names: the fake kernels (meta
# tensors, torch.compile, export) must raise the same exception, not trace through.
BAD_CALLS = {
    "softmax integer": ("self", lambda t: F.softmax(t(4, 5, dtype=_LONG), -1, False)),
    "softmax dim": ("dim", lambda t: F.softmax(t(4, 5), 3, False)),
    "softmax half_to_float": ("half_to_float", lambda t: F.log_softmax(t(4, 5), -1, True)),
    "softmax_backward dtype": ("grad_output", lambda t: F.softmax_backward(t(4, 5), t(4, 5, dtype=torch.float64), -1,
                                                                          torch.float32)),
    "softmax_backward shape": ("grad_output", lambda t: F.softmax_backward(t(4, 6), t(4, 5), -1, torch.float32)),
    "softmax_backward input_dtype": ("input_dtype", lambda t: F.log_softmax_backward(t(4, 5), t(4, 5), -1,
                                                                                    torch.float64)),
    "stat_topk k too large": ("k", lambda t: F.stat_topk(t(4, 5), -1, 0.0, False, True, 5)),
    "stat_topk k negative": ("k", lambda t: F.stat_topk(t(4, 5), -1, 0.0, False, True, -1)),
    "stat_topk sparsity": ("sparsity", lambda t: F.stat_topk(t(4, 5), -1, 1.0, False, True, 0)),
    "stat_topk dim": ("dim", lambda t: F.stat_topk(t(4, 5), 2, 0.5, False, True, 0)),
    "stat_topk integer": ("x", lambda t: F.stat_topk(t(4, 5, dtype=torch.int32), -1, 0.5, False, True, 0)),
    "stat_topk_backward theta": ("theta", lambda t: F.stat_topk_backward(t(4, 5), None, t(4, 5), t(4, 2), t(4, 1),
                                                                         t(4, 1), -1, 0.5, False, True, 0)),
    "gelu_mul up shape": ("up", lambda t: F.stat_topk_gelu_mul(t(4, 5), t(4, 6), 0.5, True, 0)),
    "gelu_mul k": ("k", lambda t: F.stat_topk_gelu_mul(t(4, 5), t(4, 5), 0.0, True, 9)),
    "gelu_mul 0-d": ("gate", lambda t: F.stat_topk_gelu_mul(t(), t(), 0.5, True, 0)),
    "log_bessel integer": ("v", lambda t: F.log_bessel_iv(t(4, dtype=_LONG), t(4))),
    "log_bessel dtypes": ("dtype", lambda t: F.log_bessel_kv_grad(t(4, dtype=torch.float64), t(4))),
    "log_bessel second derivatives": ("'x'", lambda t: F.log_bessel_iv_hess(t(4), t(4, dtype=_LONG))),
    "lce 3-d hidden": ("hidden", lambda t: F.linear_cross_entropy(t(2, 4, 8), t(10, 8), t(8, dtype=_LONG), None, -100,
                                                                  0.0, 0.0, 0.0, 0.0)),
    "lce classifier width": ("classifier", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 7), t(4, dtype=_LONG), None,
                                                                            -100, 0.0, 0.0, 0.0, 0.0)),
    "lce float targets": ("targets", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 8), t(4), None, -100, 0.0, 0.0,
                                                                      0.0, 0.0)),
    "lce targets shape": ("targets", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 8), t(5, dtype=_LONG), None,
                                                                      -100, 0.0, 0.0, 0.0, 0.0)),
    "lce bias shape": ("bias", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 8), t(4, dtype=_LONG), t(9), -100, 0.0,
                                                                0.0, 0.0, 0.0)),
    "lce softcap": ("softcap", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 8), t(4, dtype=_LONG), None, -100,
                                                                -1.0, 0.0, 0.0, 0.0)),
    "lce label_smoothing": ("label_smoothing", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 8), t(4, dtype=_LONG),
                                                                                None, -100, 0.0, 1.5, 0.0, 0.0)),
    "lce empty vocabulary": ("classifier", lambda t: F.linear_cross_entropy(t(4, 8), t(0, 8), t(4, dtype=_LONG), None,
                                                                            -100, 0.0, 0.0, 0.0, 0.0)),
    "lce shard outside": ("vocab_start", lambda t: F.linear_cross_entropy_shard(t(4, 8), t(10, 8), t(4, dtype=_LONG),
                                                                                None, -100, 0.0, 0.0, 5, 12)),
    "lce shard int64 overflow": ("vocab_start", lambda t: F.linear_cross_entropy_shard(
        t(4, 8), t(5, 8), t(4, dtype=_LONG), None, -100, 0.0, 0.0, 2**63 - 2, 2**63 - 1)),
    "lce forward filter_eps": ("filter_eps", lambda t: F.linear_cross_entropy(t(4, 8), t(10, 8), t(4, dtype=_LONG),
                                                                              None, -100, 0.0, 0.0, 0.0, 2.0)),
    "lce backward lse": ("lse", lambda t: F.linear_cross_entropy_backward(
        t(4), None, t(4, 8), t(10, 8), t(4, dtype=_LONG), None, t(5), -100, 0.0, 0.0, 0.0, 0.0, [True, True, False])),
    "lce backward filter_eps": ("filter_eps", lambda t: F.linear_cross_entropy_backward(
        t(4), None, t(4, 8), t(10, 8), t(4, dtype=_LONG), None, t(4), -100, 0.0, 0.0, 0.0, 1.0, [True, True, False])),
    "sinkhorn 2-d cost": ("cost", lambda t: F.sinkhorn(t(4, 5), t(1, 4), t(1, 5), 0.1, 10, 1e-6)),
    "sinkhorn a shape": ("'a'", lambda t: F.sinkhorn(t(1, 4, 5), t(1, 5), t(1, 5), 0.1, 10, 1e-6)),
    "sinkhorn empty side": ("n, m >= 1", lambda t: F.sinkhorn(t(1, 0, 5), t(1, 0), t(1, 5), 0.1, 10, 1e-6)),
    "sinkhorn eps": ("eps", lambda t: F.sinkhorn(t(1, 4, 5), t(1, 4), t(1, 5), 0.0, 10, 1e-6)),
    "sinkhorn error_norm": ("error_norm", lambda t: F.sinkhorn(t(1, 4, 5), t(1, 4), t(1, 5), 0.1, 10, 1e-6, 3.0)),
    "sinkhorn_kd shapes": ("teacher_logits", lambda t: F.sinkhorn_kd(t(4, 5), t(4, 6), 2.0, 0.1, 20, 1e-3)),
    "sinkhorn_kd integer": ("student_logits", lambda t: F.sinkhorn_kd(t(4, 5, dtype=_LONG), t(4, 5), 2.0, 0.1, 20,
                                                                      1e-3)),
    "sinkhorn_kd scale": ("scale", lambda t: F.sinkhorn_kd(t(4, 5), t(4, 5), 2.0, 0.1, 20, math.nan)),
    "sinkhorn_kd temperature": ("temperature", lambda t: F.sinkhorn_kd(t(4, 5), t(4, 5), 0.0, 0.1, 20, 1e-3)),
    "vmf p": ("'p'", lambda t: F.vmf_log_normalizer(t(4), 1)),
    "vmf integer": ("kappa", lambda t: F.vmf_entropy(t(4, dtype=_LONG), 3)),
    "vmf derivative": ("derivative", lambda t: F.vmf_mean_resultant(t(4), 3, 3)),
    "vmf iterations": ("iterations", lambda t: F.vmf_kappa_mle(t(4), 3, 0)),
    "vmf sample shapes": ("shape", lambda t: F.vmf_sample_w_derivative(t(4), t(3), 3)),
    "vmf iterations before dtype": ("iterations", lambda t: F.vmf_kappa_mle(t(4, dtype=_LONG), 3, 0)),
    "vmf derivative before dtype": ("derivative", lambda t: F.vmf_mean_resultant(t(4, dtype=_LONG), 3, 3)),
    "log_bessel broadcast": ("'v'", lambda t: F.log_bessel_iv(t(3), t(4))),
    "sinkhorn_kd_backward grad_loss": ("grad_loss", lambda t: F.sinkhorn_kd_backward(
        t(2), t(4, 5), t(4, 5), t(4, 4), t(3, 4), t(3, 4), 2.0, 0.1, 1e-3, True, True, torch.float32, torch.float32)),
    "sinkhorn_kd_backward temperature": ("temperature", lambda t: F.sinkhorn_kd_backward(
        t(), t(4, 5), t(4, 5), t(4, 4), t(3, 4, dtype=torch.float64), t(3, 4, dtype=torch.float64), 0.0, 0.1, 1e-3,
        True, True, torch.float32, torch.float32)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_fake_kernels_reject_what_the_kernels_reject(case):
    arg, call = BAD_CALLS[case]

    def tensors(device):
        def make(*shape, dtype=torch.float32):
            t = torch.ones(shape, dtype=dtype, device=device)
            return t / 2 if dtype.is_floating_point else t
        return make

    with pytest.raises(Exception) as real:
        call(tensors("cpu"))
    with pytest.raises(Exception) as fake:
        call(tensors("meta"))
    assert type(fake.value) is type(real.value), (real.value, fake.value)
    for err in (real.value, fake.value):
        assert "fastloss." in str(err) and arg in str(err), err


# Calls at the edges of what the ops accept: the fake kernels must accept them too, with the
# real outputs' shapes and dtypes.
GOOD_CALLS = {
    "softmax 0-d": lambda t: F.softmax(t(), 0, False),
    "softmax empty": lambda t: F.log_softmax(t(0, 3), 0, False),
    "softmax half_to_float": lambda t: F.softmax(t(2, 3, dtype=torch.bfloat16), -1, True),
    "softmax_backward half input": lambda t: F.softmax_backward(t(2, 3), t(2, 3), 1, torch.float16),
    "stat_topk k": lambda t: F.stat_topk(t(3, 8), 0, 0.0, True, True, 2),
    "stat_topk 0-d": lambda t: F.stat_topk(t(), 0, 0.5, False, True, 0),
    "gelu_mul k": lambda t: F.stat_topk_gelu_mul(t(2, 8, dtype=torch.bfloat16), t(2, 8, dtype=torch.bfloat16), 0.0,
                                                 True, 3),
    "log_bessel broadcast": lambda t: F.log_bessel_kv(t(3, 1), t(4)),
    "lce no tokens": lambda t: F.linear_cross_entropy(t(0, 8), t(10, 8), t(0, dtype=_LONG), t(10), -100, 2.0, 0.1,
                                                      1e-3, 0.0),
    "lce shard": lambda t: F.linear_cross_entropy_shard(t(4, 8), t(5, 8), t(4, dtype=torch.int32), None, -100, 0.0,
                                                        0.0, 5, 12),
    "sinkhorn inf norm": lambda t: F.sinkhorn(t(2, 3, 4), t(2, 3) / 3, t(2, 4) / 4, 0.1, 5, 1e-6, math.inf),
    "sinkhorn_kd no rows": lambda t: F.sinkhorn_kd(t(0, 5), t(0, 5), 2.0, 0.1, 3, 1e-3),
    "vmf 0-d": lambda t: F.vmf_kappa_mle(t(), 3, 10),
}


@pytest.mark.parametrize("case", list(GOOD_CALLS))
def test_fake_kernels_accept_what_the_kernels_accept(case):
    def tensors(device):
        return lambda *shape, dtype=torch.float32: torch.full(shape, 0.5, dtype=dtype, device=device) \
            if dtype.is_floating_point else torch.zeros(shape, dtype=dtype, device=device)

    real, fake = GOOD_CALLS[case](tensors("cpu")), GOOD_CALLS[case](tensors("meta"))
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake]


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (2, 0, 4), (2, 3, 0)])
def test_sinkhorn_with_an_empty_side_raises(shape):
    # One side empty: no mass to transport (the potentials of the other side came back as
    # uninitialised memory).
    with pytest.raises(ValueError, match="empty side"):
        fastloss.sinkhorn(torch.rand(shape, dtype=torch.float64), eps=0.1)
    # A batch of no problems is fine.
    assert fastloss.sinkhorn(torch.rand(0, 3, 4), eps=0.1).plan.shape == (0, 3, 4)


def test_numpy_scalars_are_numbers():
    c = torch.rand(3, 4, dtype=torch.float64)
    expected = fastloss.sinkhorn_cost(c, eps=0.125, tol=0.5**30, max_iter=500)
    got = fastloss.sinkhorn_cost(c, eps=np.float32(0.125), tol=np.float64(0.5**30), max_iter=np.int64(500))
    torch.testing.assert_close(got, expected)
    assert fastloss.vmf_log_normalizer(2.0, np.int64(3)).item() == pytest.approx(
        fastloss.vmf_log_normalizer(2.0, 3).item(), rel=1e-15)
    s, t = _randn(4, 3), _randn(4, 3)
    torch.testing.assert_close(fastloss.sinkhorn_kd_loss(s, t, eps=np.float32(0.25), n_iter=np.int32(5)),
                               fastloss.sinkhorn_kd_loss(s, t, eps=float(np.float32(0.25)), n_iter=5))
    assert math.isfinite(fastloss.sinkhorn_kd_loss(s, t, scale=np.float32(1e-3)).item())


@pytest.mark.parametrize("build", [
    lambda: fastloss.nn.SinkhornKDLoss(eps=-1.0),
    lambda: fastloss.nn.SinkhornKDLoss(n_iter=2.5),
    lambda: fastloss.nn.SinkhornKDLoss(temperature=0),
    lambda: fastloss.nn.LinearCrossEntropy(label_smoothing=2.0),
    lambda: fastloss.nn.LinearCrossEntropy(softcap=-1.0),
    lambda: fastloss.nn.LinearCrossEntropy(reduction="avg"),
    lambda: fastloss.nn.LinearCrossEntropy(filter_eps="fast"),
    lambda: fastloss.nn.LinearCrossEntropy(shift="no"),
    lambda: fastloss.nn.LinearCrossEntropy(process_group="group0"),
    lambda: fastloss.nn.StatTopK(k=2, dim="last"),
    lambda: fastloss.nn.StatTopK(k=2, threshold_grad="no"),
])
def test_modules_check_their_options_when_built(build):
    # (They used to fail only at the first forward.)
    with pytest.raises((ValueError, TypeError)):
        build()


FLAG_CASES = {
    "shift": lambda v: fastloss.linear_cross_entropy(_randn(2, 3, 4), _randn(5, 4), torch.zeros(2, 3, dtype=torch.long),
                                                     shift=v),
    "return_lse": lambda v: fastloss.linear_cross_entropy(_randn(3, 4), _randn(5, 4), torch.zeros(3, dtype=torch.long),
                                                          return_lse=v),
    "threshold_grad": lambda v: fastloss.stat_topk(_randn(3, 8), k=2, threshold_grad=v),
    "return_threshold": lambda v: fastloss.stat_topk(_randn(3, 8), k=2, return_threshold=v),
    "gelu_mul threshold_grad": lambda v: fastloss.stat_topk_gelu_mul(_randn(3, 8), _randn(3, 8), 0.5,
                                                                     threshold_grad=v),
}


@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_flags_must_be_bools(name):
    # A string such as "no" used to count as true; NumPy bools are bools.
    FLAG_CASES[name](False)
    FLAG_CASES[name](np.True_)
    with pytest.raises(TypeError, match="must be a bool"):
        FLAG_CASES[name]("no")


def test_complex_inputs_raise_instead_of_dropping_the_imaginary_part():
    z = torch.tensor([2 + 7j])
    for call in (lambda: fastloss.vmf_log_normalizer(z, 3), lambda: fastloss.vmf_mean_resultant(z, 3),
                 lambda: fastloss.vmf_kappa_mle(z / 10, 3), lambda: fastloss.vmf_log_normalizer(2 + 7j, 3),
                 lambda: fastloss.distributions.VonMisesFisher(torch.tensor([1.0, 0.0]), z[0]),
                 lambda: fastloss.distributions.VonMisesFisher(torch.tensor([1.0, 0.0]), 2 + 7j),
                 lambda: fastloss.distributions.VonMisesFisher(torch.tensor([1.0, 0.0]), np.complex64(2 + 7j)),
                 lambda: fastloss.vmf_log_normalizer(np.array([2 + 7j]), 3)):
        with pytest.raises(TypeError, match="real"):
            call()
    # Integers are promoted, as torch.special does.
    assert fastloss.vmf_log_normalizer(torch.tensor([2]), 3).item() == pytest.approx(
        fastloss.vmf_log_normalizer(2.0, 3).item(), rel=1e-6)


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_sinkhorn_cost_refuses_non_float_costs_and_marginals(grad):
    # grad="unrolled" never reaches the op and cast int, bool and complex costs itself.
    ci = torch.tensor([[0, 1, 2], [2, 1, 0]])
    for cost in (ci, ci.bool(), ci.to(torch.complex64)):
        with pytest.raises(RuntimeError, match="'cost' to be a float32"):
            fastloss.sinkhorn_cost(cost, eps=1.0, grad=grad)
    with pytest.raises(RuntimeError, match="'a' to be a float32"):
        fastloss.sinkhorn_cost(ci.double(), torch.tensor([1, 1]), torch.tensor([1.0, 0.5, 0.5]), eps=1.0, grad=grad)


def test_fake_tensors_and_make_fx_trace_the_eager_value_checks():
    # The wrappers' eager checks read values on the host; with fake tensors or under make_fx
    # they used to raise data-dependent errors (the ops still check the real values).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    h, w, t = _randn(2, 4, 5), _randn(7, 5), torch.randint(0, 7, (2, 4))
    shifted = lambda h, w, t: fastloss.linear_cross_entropy(h, w, t, shift=True)  # noqa: E731
    unrolled = lambda c: fastloss.sinkhorn_cost(c, eps=0.5, max_iter=3, grad="unrolled")  # noqa: E731
    cost = torch.rand(3, 4, 5, dtype=torch.float64)
    mode = FakeTensorMode()
    with mode:
        assert shifted(*map(mode.from_tensor, (h, w, t))).shape == ()
        assert unrolled(mode.from_tensor(cost)).shape == (3,)
    for tracing in ("real", "fake", "symbolic"):
        torch.testing.assert_close(make_fx(shifted, tracing_mode=tracing)(h, w, t)(h, w, t), shifted(h, w, t))
        torch.testing.assert_close(make_fx(unrolled, tracing_mode=tracing)(cost)(cost), unrolled(cost))
    # Eager, the checks still run: the wrapper's (the user's position, not the shifted one),
    # also under an eager dispatch mode.
    bad = torch.full((2, 4), 9)
    with pytest.raises(IndexError, match=r"at position 1 \(index \(0, 1\)\)"):
        shifted(h, w, bad)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):
        with pytest.raises(IndexError, match=r"at position 1 \(index \(0, 1\)\)"):
            shifted(h, w, bad)
        with pytest.raises(RuntimeError, match="'a' to be finite and >= 0"):
            fastloss.sinkhorn_cost(cost[0], torch.tensor([0.5, 0.7, -0.2, 0.0], dtype=torch.float64), eps=0.5,
                                   grad="unrolled")


def _nested(t):
    return torch.nested.nested_tensor(list(t.float()))


def _sparse(t):
    return t.to_sparse()


def _quantized(t):
    with warnings.catch_warnings():  # (quantized tensors are deprecated in torch)
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)


# (call with the odd tensor in the named argument, the argument's name)
LAYOUT_CASES = {
    "softmax": (lambda t: fastloss.softmax(t), "input"),
    "stat_topk": (lambda t: fastloss.stat_topk(t, sparsity=0.5), "x"),
    "stat_topk_gelu_mul": (lambda t: fastloss.stat_topk_gelu_mul(_randn(3, 4).float(), t, 0.5), "up"),
    "sinkhorn_cost": (lambda t: fastloss.sinkhorn_cost(t, eps=0.1), "cost"),
    "sinkhorn_kd_loss": (lambda t: fastloss.sinkhorn_kd_loss(_randn(3, 4).float(), t), "teacher_logits"),
    "linear_cross_entropy": (lambda t: fastloss.linear_cross_entropy(_randn(5, 4).float(), t, torch.tensor([0, 1])),
                             "classifier"),
    "log_bessel_iv": (lambda t: fastloss.log_bessel_iv(1.5, t), "x"),
    "vmf_log_normalizer": (lambda t: fastloss.vmf_log_normalizer(t, 3), "kappa"),
    "VonMisesFisher": (lambda t: fastloss.distributions.VonMisesFisher(t, 1.0), "loc"),
}


@pytest.mark.parametrize("kind", [_nested, _sparse, _quantized], ids=["nested", "sparse", "quantized"])
@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_non_dense_tensors_get_an_error_naming_the_argument(name, kind):
    # Nested, sparse and quantized tensors failed deep inside torch ("Internal error ... Please
    # file an issue", "reshape is not implemented for sparse tensors") with no argument named.
    call, arg = LAYOUT_CASES[name]
    with pytest.raises(TypeError, match=f"'{arg}' to be a dense"):
        call(kind(_randn(3, 4).abs() + 0.1))
