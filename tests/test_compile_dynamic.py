"""torch.compile(fullgraph=True, dynamic=True) of every op family: the fake kernels and the
Python wrappers trace with symbolic shapes and floats, and a second shape reuses the graph."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastloss


def _forward_and_grads(fn, args):
    args = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*args)
    loss = out[0] if isinstance(out, tuple) else out
    leaves = [a for a in args if a.requires_grad]
    return (loss,) + torch.autograd.grad(loss.sum(), leaves)


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


CASES = {
    "softmax": (lambda x: fastloss.softmax(x, dim=-1), lambda n: (_randn(n, n + 3),)),
    "log_softmax": (lambda x: fastloss.log_softmax(x, dim=0), lambda n: (_randn(n, n + 3),)),
    "stat_topk": (lambda x: fastloss.stat_topk(x, sparsity=0.9), lambda n: (_randn(n, 16 * n),)),
    "stat_topk_gelu_mul": (lambda g, u: fastloss.stat_topk_gelu_mul(g, u, 0.9),
                           lambda n: (_randn(n, 16 * n), _randn(n, 16 * n))),
    # k with a symbolic row length: the ops take k and resolve 1 - k/d when they run
    "stat_topk(k=)": (lambda x: fastloss.stat_topk(x, k=5, mode="hard"), lambda n: (_randn(n, 16 * n),)),
    "stat_topk(k=d//8)": (lambda x: fastloss.stat_topk(x, k=x.shape[-1] // 8), lambda n: (_randn(n, 16 * n),)),
    "stat_topk_gelu_mul(k=)": (lambda g, u: fastloss.stat_topk_gelu_mul(g, u, k=5),
                               lambda n: (_randn(n, 16 * n), _randn(n, 16 * n))),
    "log_bessel_iv": (fastloss.log_bessel_iv, lambda n: (_randn(n).abs() * 3, _randn(n).abs() * 5)),
    "log_bessel_kv": (fastloss.log_bessel_kv, lambda n: (_randn(n) * 3, _randn(n).abs() * 5)),
    "linear_cross_entropy": (fastloss.linear_cross_entropy,
                             lambda n: (_randn(2 * n, 16), _randn(10 * n, 16), torch.randint(0, 10 * n, (2 * n,)))),
    "sinkhorn_cost": (lambda c: fastloss.sinkhorn_cost(c, eps=0.5), lambda n: (_randn(3, n, n + 2).abs(),)),
    "sinkhorn_kd_loss": (fastloss.sinkhorn_kd_loss, lambda n: (_randn(n, 5), _randn(n, 5))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compile_dynamic_shapes(name):
    fn, make = CASES[name]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    # Without the on-disk caches: their entries from an earlier build of fastloss carry that
    # build's guards (they are keyed by the graph, not by the extension's code).
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        first = None
        for n in (4, 7, 9):
            args = make(n)
            got, expected = _forward_and_grads(compiled, args), _forward_and_grads(fn, args)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
            first = counter.frame_count if first is None else first
    # No recompile for a new shape (log-Bessel's backward once fixed the sizes: one per shape).
    assert counter.frame_count == first
