"""Guards shared by every op: a meta argument beside a real one raises instead of returning
uninitialised memory, and NumPy scalars pass where Python numbers do (forward-mode AD and
torch.func transforms: test_func.py)."""

import math

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
])
def test_modules_check_their_options_when_built(build):
    # (They used to fail only at the first forward.)
    with pytest.raises((ValueError, TypeError)):
        build()
