"""Type-checked, not run: the public API as a user's type checker sees it (test_typing.py runs
mypy over this file and the package). Each assert_type fails the check if an annotation drifts."""

from typing import Any, Dict, Tuple

import torch
from typing_extensions import assert_type

import fastloss
from fastloss.distributions import VonMisesFisher
from fastloss.integrations.transformers import patch, unpatch

x = torch.randn(4, 8)
assert_type(fastloss.__version__, str)
assert_type(fastloss.softmax(x), torch.Tensor)
assert_type(fastloss.log_softmax(x, dim=0, dtype=torch.float64), torch.Tensor)

assert_type(fastloss.stat_topk(x, sparsity=0.9), torch.Tensor)
assert_type(fastloss.stat_topk(x, k=2, mode="hard", return_threshold=False), torch.Tensor)
assert_type(fastloss.stat_topk(x, k=2, return_threshold=True), Tuple[torch.Tensor, torch.Tensor])
assert_type(fastloss.stat_topk_gelu_mul(x, x, sparsity=0.95), torch.Tensor)

hidden, weight, targets = torch.randn(6, 16), torch.randn(32, 16), torch.randint(0, 32, (6,))
assert_type(fastloss.linear_cross_entropy(hidden, weight, targets), torch.Tensor)
assert_type(fastloss.linear_cross_entropy(hidden, weight, targets, softcap=30.0, reduction="none"), torch.Tensor)
assert_type(fastloss.linear_cross_entropy(hidden, weight, targets, return_lse=True),
            Tuple[torch.Tensor, torch.Tensor])

cost = torch.rand(5, 7)
result = fastloss.sinkhorn(cost, eps=0.1)
assert_type(result, fastloss.SinkhornResult)
assert_type(result.plan, torch.Tensor)
assert_type(fastloss.sinkhorn_cost(cost, eps=0.1), torch.Tensor)
assert_type(fastloss.sinkhorn_kd_loss(x, x), torch.Tensor)

assert_type(fastloss.log_bessel_iv(2.5, x), torch.Tensor)
assert_type(fastloss.log_bessel_kv(x, 3), torch.Tensor)
assert_type(fastloss.vmf_log_normalizer(x, 64), torch.Tensor)
assert_type(fastloss.vmf_mean_resultant(10.0, 64), torch.Tensor)
assert_type(fastloss.vmf_kappa_mle(0.5, 64), torch.Tensor)

vmf = VonMisesFisher(torch.nn.functional.normalize(x, dim=-1), torch.full((4,), 5.0))
assert_type(vmf.log_prob(vmf.rsample()), torch.Tensor)
assert_type(vmf.entropy(), torch.Tensor)
assert_type(VonMisesFisher.fit(vmf.sample((10,))), VonMisesFisher)

loss_fn = fastloss.nn.LinearCrossEntropy(reduction="sum")
assert_type(loss_fn.forward(hidden, weight, targets), torch.Tensor)
assert_type(fastloss.nn.StatTopK(sparsity=0.9).forward(x), torch.Tensor)
assert_type(fastloss.nn.SinkhornKDLoss().forward(x, x), torch.Tensor)
assert_type(patch(torch.nn.Linear(2, 2)), torch.nn.Module)
assert_type(unpatch(torch.nn.Linear(2, 2)), torch.nn.Module)
assert_type(fastloss.build_info(), Dict[str, Any])
