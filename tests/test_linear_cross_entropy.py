"""fastloss.linear_cross_entropy (cut cross-entropy) against torch's hidden @ C.T + bias, softcap
and F.cross_entropy in float64; gradients, filtering, opcheck, gradcheck, torch.compile, errors,
vocabulary parallelism (gloo, 2 processes) and the Hugging Face causal-LM patch."""

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import torch.autograd.forward_ad as fwAD

import fastloss
from conftest import rerun_without_avx512
from fastloss.ops import _lce_derivatives as lce_derivatives

IGNORE = -100


def reference(hidden, classifier, targets, bias=None, *, ignore_index=IGNORE, reduction="mean", softcap=None,
              label_smoothing=0.0, z_loss=0.0, shift=False, return_lse=False):
    """The eager formulation: logits, softcap, F.cross_entropy, z-loss."""
    z = hidden @ classifier.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if shift:
        targets = torch.cat([targets[..., 1:], torch.full_like(targets[..., :1], ignore_index)], dim=-1)
    z2, t = z.reshape(-1, z.shape[-1]), targets.reshape(-1).long()
    active = t != ignore_index
    per = F.cross_entropy(z2, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(z2, -1) * active
    per = per + z_loss * lse * lse
    if reduction == "none":
        loss = per.view(targets.shape)
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / active.sum().clamp(min=1)
    return (loss, lse.view(targets.shape)) if return_lse else loss


def make_inputs(n_lead, d, v, dtype, device, *, bias=False, seed=0, scale=1.0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_lead, d, generator=g, dtype=torch.float64) * scale
    classifier = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    targets = torch.randint(0, v, n_lead, generator=g)
    targets[torch.rand(n_lead, generator=g) < ignore_frac] = IGNORE
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    conv = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return conv(hidden), conv(classifier), targets.to(device), conv(b)


def grads_of(fn, tensors, seed=5):
    tensors = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*tensors)
    loss = out[0] if isinstance(out, tuple) else out
    weight = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    total = (loss.double() * weight.to(loss.device)).sum()
    if isinstance(out, tuple):
        total = total + (out[1].double() * 0.3).sum()
    leaves = [t for t in tensors if t is not None]
    return out, torch.autograd.grad(total, leaves)


OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "everything": {"bias": True, "softcap": 3.0, "label_smoothing": 0.2, "z_loss": 1e-3, "return_lse": True},
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def check_against_reference(device, dtype, options, reduction, n_lead=(3, 7), d=24, v=1100, shift=False, seed=0,
                            filter_eps=None):
    options = dict(options)
    h, c, t, b = make_inputs(n_lead, d, v, dtype, device, bias=options.pop("bias", False), seed=seed)
    kw = dict(reduction=reduction, shift=shift, **options)
    out, grads = grads_of(lambda h_, c_, b_: fastloss.linear_cross_entropy(h_, c_, t, b_, filter_eps=filter_eps, **kw),
                          [h, c, b])
    ref, ref_grads = grads_of(lambda h_, c_, b_: reference(h_, c_, t, b_, **kw),
                              [h.double(), c.double(), None if b is None else b.double()])
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for a, r in zip(outs, refs):
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(a.double(), r, **TOL[dtype])
    for a, r in zip(grads, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), r, **TOL[dtype])


# --------------------------------------------------------------------------------------------
# Against torch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_torch(device, dtype, reduction, option):
    check_against_reference(device, dtype, OPTIONS[option], reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shift(device, dtype):
    check_against_reference(device, dtype, {"bias": True}, "mean", shift=True)
    check_against_reference(device, dtype, {}, "none", shift=True, n_lead=(2, 3, 5))


def test_shift_reads_cut_cross_entropys_int_flags():
    h, c, t, _ = make_inputs((2, 6), 8, 50, torch.float32, "cpu", bias=False)
    for flag in (0, 1):
        assert torch.equal(fastloss.linear_cross_entropy(h, c, t, shift=flag),
                           fastloss.linear_cross_entropy(h, c, t, shift=bool(flag)))
    for bad in (2, -1, "yes", 1.0):
        with pytest.raises(TypeError, match="'shift' must be a bool"):
            fastloss.linear_cross_entropy(h, c, t, shift=bad)


@pytest.mark.parametrize("v", [50257, 151936])
def test_large_vocabularies(device, v):
    check_against_reference(device, torch.float32, {"bias": True, "softcap": 30.0}, "mean", n_lead=(2, 9), d=16, v=v)


@pytest.mark.parametrize("v", [1, 7, 512, 513, 1025])
def test_vocab_block_edges(device, v):
    check_against_reference(device, torch.float64, {"bias": True}, "sum", n_lead=(1030,), d=8, v=v)


def test_default_filter_matches_in_float32(device):
    # finfo(float32).eps / 32 drops nothing that float32 gradients would carry.
    check_against_reference(device, torch.float32, OPTIONS["everything"], "mean", filter_eps="auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_half_within_twice_torch_error(device, dtype, filter_eps):
    """Low precision: error against float64 at most 2x torch's own (logits and loss in dtype)."""
    h, c, t, b = make_inputs((4, 64), 64, 3000, dtype, device, bias=True, seed=3, scale=3.0)
    kw = dict(softcap=20.0, label_smoothing=0.05)
    out, grads = grads_of(lambda h_, c_, b_: fastloss.linear_cross_entropy(h_, c_, t, b_, filter_eps=filter_eps, **kw),
                          [h, c, b])
    torch_out, torch_grads = grads_of(lambda h_, c_, b_: reference(h_, c_, t, b_, **kw), [h, c, b])
    ref, ref_grads = grads_of(lambda h_, c_, b_: reference(h_, c_, t, b_, **kw), [h.double(), c.double(), b.double()])

    def err(a, r):
        return ((a.double() - r).norm() / r.norm()).item()

    assert err(out, ref) <= 2 * err(torch_out, ref) + 1e-6
    for name, a, tg, r in zip("hidden classifier bias".split(), grads, torch_grads, ref_grads):
        assert err(a, r) <= 2 * err(tg, r), name


BF16_PRODUCTS = fastloss.build_info()["linear_cross_entropy_cpu_bf16"].startswith("oneDNN")
needs_bf16_products = pytest.mark.skipif(not BF16_PRODUCTS, reason="needs a CPU with AVX512-BF16 (bfloat16 products)")


def profiled(run):
    """The names of the events run() recorded, and its result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    return {e.name for e in prof.events()}, result


def ran_bf16_products(run):
    """Whether run() multiplied bfloat16 operands into float32 (profiled as fastloss::gemm_bf16)."""
    names, result = profiled(run)
    return "fastloss::gemm_bf16" in names, result


TOKEN_TILES = "fastloss::linear_cross_entropy (token tiles)"
TOKEN_PARTS = "fastloss::linear_cross_entropy_backward (token parts)"


@needs_bf16_products
@pytest.mark.parametrize("case", [
    # two token tiles, the last of odd length; an odd last vocabulary block; every option
    dict(n_lead=(1101,), d=64, v=1101, ignore_frac=0.0,
         kw=dict(softcap=20.0, label_smoothing=0.05, z_loss=1e-3), bias=True),
    dict(n_lead=(3, 37), d=32, v=3000, ignore_frac=0.2, kw=dict(reduction="none", return_lse=True), bias=False),
    dict(n_lead=(2, 50), d=16, v=700, ignore_frac=0.1, kw=dict(shift=True, reduction="sum"), bias=True),
    # several 64-wide blocks along D in both gradient products
    dict(n_lead=(300,), d=200, v=600, ignore_frac=0.1, kw={}, bias=False),
    # fewer tokens than D: d classifier formed directly as dZ^T E (one partial 64-deep tile;
    # two token tiles)
    dict(n_lead=(2, 23), d=96, v=1300, ignore_frac=0.1, kw=dict(label_smoothing=0.1), bias=True),
    dict(n_lead=(1100,), d=1104, v=600, ignore_frac=0.05, kw={}, bias=False),
])
def test_bfloat16_products_on_the_cpu(case):
    """bfloat16 operands multiplied into float32: the loss and LSE as exact as float32 logits of
    the same operands; the gradients off by the bfloat16 rounding of the logit gradient."""
    h, c, t, b = make_inputs(case["n_lead"], case["d"], case["v"], torch.bfloat16, "cpu", bias=case["bias"], seed=11,
                             scale=2.0, ignore_frac=case["ignore_frac"])
    kw = dict(filter_eps=None, **case["kw"])
    tensors = [h, c, b] if b is not None else [h, c]
    fn = lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2] if len(a) > 2 else None, **kw)  # noqa: E731
    used, (out, grads) = ran_bf16_products(lambda: grads_of(fn, tensors))
    assert used
    kw.pop("filter_eps")
    ref, ref_grads = grads_of(lambda *a: reference(a[0], a[1], t, a[2] if len(a) > 2 else None, **kw),
                              [x.double() for x in tensors])
    for a, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        # rounding the logit gradient and the result to bfloat16: 2 x 2^-9 relative at most
        assert ((a.double() - r).norm() / r.norm()).item() < 4e-3

    # The same without oneDNN (the float32 matmuls): the same loss to float32 rounding.
    with torch.backends.mkldnn.flags(enabled=False):
        used, (plain_out, _) = ran_bf16_products(lambda: grads_of(fn, tensors))
    assert not used
    torch.testing.assert_close(plain_out, out, rtol=2e-5, atol=2e-5)


@needs_bf16_products
@pytest.mark.parametrize("d", [48, 256])  # d classifier as E^T dZ (205 tokens > D), then dZ^T E
def test_bfloat16_products_for_one_gradient_at_a_time(d):
    """d hidden and d classifier alone are what the two together give, bit for bit."""
    h, c, t, b = make_inputs((5, 41), d, 1500, torch.bfloat16, "cpu", bias=True, seed=12)
    both = torch.autograd.grad(fastloss.linear_cross_entropy(h.requires_grad_(), c.requires_grad_(), t, b), (h, c))
    only_h = torch.autograd.grad(fastloss.linear_cross_entropy(h, c.detach(), t, b), h)[0]
    only_c = torch.autograd.grad(fastloss.linear_cross_entropy(h.detach(), c, t, b), c)[0]
    assert torch.equal(only_h, both[0]) and torch.equal(only_c, both[1])


@needs_bf16_products
def test_bfloat16_few_tokens_do_not_depend_on_the_thread_count():
    """Few tokens: the vocabulary blocks run in parts, in parallel, merged in part order; the
    loss, LSE and gradients are the same bits on 1, 2 and 3 threads."""
    h, c, t, b = make_inputs((3, 30), 80, 4000, torch.bfloat16, "cpu", bias=True, seed=17, ignore_frac=0.1)
    run = lambda: grads_of(lambda *x: fastloss.linear_cross_entropy(x[0], x[1], t, x[2], z_loss=1e-3,  # noqa: E731
                                                                      return_lse=True), [h, c, b])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            used, r = ran_bf16_products(run)
            assert used
            results.append(r)
    finally:
        torch.set_num_threads(threads)
    (out1, grads1) = results[0]
    ref, ref_grads = grads_of(lambda *x: reference(x[0], x[1], t, x[2], z_loss=1e-3, return_lse=True),
                              [x.double() for x in (h, c, b)])
    for a, r in zip(out1, ref):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads1, ref_grads):
        assert ((a.double() - r).norm() / r.norm()).item() < 4e-3
    for out, grads in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(out, out1))
        assert all(torch.equal(x, y) for x, y in zip(grads, grads1))


@needs_bf16_products
@pytest.mark.parametrize("case", [
    # three token tiles (the last partial), ignored tokens, every option
    dict(n_lead=(3, 900), d=64, v=10, ignore_frac=0.2, kw=dict(softcap=20.0, label_smoothing=0.05, z_loss=1e-3),
         bias=True),
    # a whole block of 512; 9 token tiles, one per part; d hidden's 64-row pieces
    dict(n_lead=(9000,), d=96, v=512, ignore_frac=0.0, kw=dict(reduction="none", return_lse=True), bias=False),
    # an odd vocabulary and an odd last tile (27 tokens)
    dict(n_lead=(2075,), d=48, v=257, ignore_frac=0.0, kw=dict(label_smoothing=0.1), bias=True),
    # V x D float32 sums of 8 MiB: the minimum of 8 parts, for 10 tiles (two parts of two)
    dict(n_lead=(9 * 1024 + 5,), d=4096, v=512, ignore_frac=0.0, kw={}, bias=True, scale=1.0),
])
def test_bfloat16_one_block_vocabulary_in_token_parts(case):
    """A vocabulary of one block and several token tiles: the tiles run in parallel, in parts
    merged in part order. Against float64; the same bits on 1, 2 and 3 threads; d hidden and
    d classifier alone are what the two together give."""
    h, c, t, b = make_inputs(case["n_lead"], case["d"], case["v"], torch.bfloat16, "cpu", bias=case["bias"], seed=18,
                             scale=case.get("scale", 2.0), ignore_frac=case["ignore_frac"])
    kw = case["kw"]
    tensors = [h, c, b] if b is not None else [h, c]
    fn = lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2] if len(a) > 2 else None, **kw)  # noqa: E731
    tiles = -(-int((t != IGNORE).sum()) // 1024)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            names, r = profiled(lambda: grads_of(fn, tensors))
            assert "fastloss::gemm_bf16" in names and TOKEN_PARTS in names
            assert (TOKEN_TILES in names) == (tiles >= n)  # the forward's choice: the same bits either way
            results.append(r)
    finally:
        torch.set_num_threads(threads)
    out, grads = results[0]
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)  # noqa: E731
    for other_out, other_grads in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(as_tuple(other_out), as_tuple(out)))
        assert all(torch.equal(x, y) for x, y in zip(other_grads, grads))
    ref, ref_grads = grads_of(lambda *a: reference(a[0], a[1], t, a[2] if len(a) > 2 else None, **kw),
                              [x.double() for x in tensors])
    for a, r in zip(as_tuple(out), as_tuple(ref)):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - r).norm() / r.norm()).item() < 4e-3
    assert torch.count_nonzero(grads[0][t == IGNORE]) == 0
    loss = lambda x, y: as_tuple(fastloss.linear_cross_entropy(x, y, t, b, **kw))[0].float().sum()  # noqa: E731
    hl, cl = h.detach().requires_grad_(), c.detach().requires_grad_()
    (only_h,), (only_c,) = torch.autograd.grad(loss(hl, c), hl), torch.autograd.grad(loss(h, cl), cl)
    assert all(torch.equal(x, y) for x, y in zip((only_h, only_c), torch.autograd.grad(loss(hl, cl), (hl, cl))))


@needs_bf16_products
def test_bfloat16_token_parts_of_a_vocabulary_slice():
    """A vocabulary-parallel slice of one block at an offset (odd width) with three token tiles:
    its statistics and gradients match float32 operands' (the gradients up to the bfloat16
    logit gradient), and each gradient alone is what all three together give, bit for bit."""
    h, c, t, b = make_inputs((2075,), 48, 1000, torch.bfloat16, "cpu", bias=True, seed=20, ignore_frac=0.1)
    ops = torch.ops.fastloss
    start, stop = 300, 557
    f32 = lambda x: x.float()  # noqa: E731
    names, (lse, linear) = profiled(lambda: ops.linear_cross_entropy_shard(
        h, c[start:stop], t, b[start:stop], IGNORE, 10.0, 0.1, start, 1000))
    assert TOKEN_TILES in names
    lse32, linear32 = ops.linear_cross_entropy_shard(f32(h), f32(c[start:stop]), t, f32(b[start:stop]), IGNORE, 10.0,
                                                     0.1, start, 1000)
    torch.testing.assert_close(lse, lse32, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(linear, linear32, rtol=2e-5, atol=2e-4)
    _, total_lse = fastloss.linear_cross_entropy(f32(h), f32(c), t, f32(b), softcap=10.0, reduction="none",
                                                 return_lse=True)
    g = torch.randn(2075)

    def backward(mask, hidden, classifier, bias):
        return ops.linear_cross_entropy_backward(g, None, hidden, classifier[start:stop], t, bias[start:stop],
                                                 total_lse, IGNORE, 10.0, 0.1, 1e-3, 0.0, mask, start, 1000, False)

    names, full = profiled(lambda: backward([True, True, True], h, c, b))
    assert TOKEN_PARTS in names
    for got, want in zip(full, backward([True, True, True], f32(h), f32(c), f32(b))):
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 4e-3
    assert torch.count_nonzero(full[0][t == IGNORE]) == 0
    for mask in ([True, False, False], [False, True, False], [False, False, True], [True, False, True]):
        for wanted, got, all_three in zip(mask, backward(mask, h, c, b), full):
            assert torch.equal(got, all_three) if wanted else got.numel() == 0


@needs_bf16_products
def test_bfloat16_token_parts_skip_filtered_tiles():
    """A vocabulary-parallel shard of one block: a token tile whose targets are all outside the
    shard, with every probability below filter_eps, is skipped: zero rows of d hidden, nothing
    added to d classifier."""
    g = torch.Generator().manual_seed(19)
    n, v, d, shard = 2100, 1000, 64, 300  # token tiles [0, 1024), [1024, 2048), [2048, 2100)
    h = (torch.randn(n, d, generator=g) * 0.1).bfloat16()
    c = (torch.randn(v, d, generator=g) * 0.1).bfloat16()
    t = torch.cat([torch.randint(0, shard, (1024,), generator=g), torch.randint(shard, v, (1024,), generator=g),
                   torch.randint(0, shard, (n - 2048,), generator=g)])
    h64, c64 = h.double(), c.double()
    lse = torch.logsumexp(h64 @ c64.T, -1)
    used, (dh, dc, _) = ran_bf16_products(lambda: torch.ops.fastloss.linear_cross_entropy_backward(
        torch.ones(n), None, h, c[:shard], t, None, lse.float(), IGNORE, 0.0, 0.0, 0.0, 1e-2, [True, True, False], 0,
        v, False))
    assert used
    dz = (torch.softmax(h64 @ c64.T, -1) - F.one_hot(t, v).double())[:, :shard]
    dz[1024:2048] = 0  # p ~ 1/1000 < 1e-2 and no target: the tile is filtered out
    assert torch.count_nonzero(dh[1024:2048]) == 0
    for got, want in ((dh, dz @ c64[:shard]), (dc, dz.T @ h64)):
        assert ((got.double() - want).norm() / want.norm()).item() < 4e-3


@needs_bf16_products
# d classifier as E^T dZ, then dZ^T E; a one-block vocabulary in token parts (float32 d hidden)
@pytest.mark.parametrize("n_lead,d,v", [((3, 70), 64, 1300), ((2, 20), 96, 1300), ((2, 1100), 64, 300)])
def test_float32_in_bfloat16_at_medium_matmul_precision(n_lead, d, v):
    """torch.set_float32_matmul_precision("medium") lets float32 matmuls run in bfloat16: the
    float32 operands are rounded to bfloat16 once; products, sums and results stay float32."""
    h, c, t, b = make_inputs(n_lead, d, v, torch.float32, "cpu", bias=True, seed=15)
    fn = lambda h_, c_, b_: fastloss.linear_cross_entropy(h_, c_, t, b_, filter_eps=None)  # noqa: E731
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        used, (out, grads) = ran_bf16_products(lambda: grads_of(fn, [h, c, b]))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert used
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    ref, ref_grads = grads_of(lambda h_, c_, b_: reference(h_, c_, t, b_),
                              [h.bfloat16().double(), c.bfloat16().double(), b.double()])
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads, ref_grads):
        assert ((a.double() - r).norm() / r.norm()).item() < 4e-3  # the logit gradient in bfloat16
    used, _ = ran_bf16_products(lambda: fastloss.linear_cross_entropy(h, c, t, b))  # "highest": float32
    assert not used


@needs_bf16_products
def test_float32_in_bfloat16_by_the_per_backend_precision_setting():
    # torch.backends.<backend>.matmul.fp32_precision (mixed with the legacy setting, torch
    # refuses to report the legacy one): oneDNN's "bf16" turns the products on, CUDA's "tf32"
    # changes nothing on the CPU.
    h, c, t, _ = make_inputs((50,), 32, 700, torch.float32, "cpu", seed=16)
    mkldnn, cuda = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        used, plain = ran_bf16_products(lambda: fastloss.linear_cross_entropy(h, c, t))
        assert not used
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        used, rounded = ran_bf16_products(lambda: fastloss.linear_cross_entropy(h, c, t))
        assert used
    finally:
        torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = mkldnn, cuda
    torch.testing.assert_close(plain.double(), reference(h.double(), c.double(), t), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(rounded.double(), reference(h.bfloat16().double(), c.bfloat16().double(), t),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("products,d", [(True, 32), (True, 1104), (False, 32)])
def test_filtered_blocks_in_bfloat16(products, d):
    """Filtered tiles add nothing: a vocabulary block filtered out for every token tile gets a
    zero gradient, and one kept only for its second token tile gets that tile's part alone
    (d = 1104: more than the 1100 tokens, the bfloat16 products form d classifier directly)."""
    if products and not BF16_PRODUCTS:
        pytest.skip("needs a CPU with AVX512-BF16 (bfloat16 products)")
    g = torch.Generator().manual_seed(14)
    n, v = 1100, 1800  # token tiles [0, 1024) and [1024, 1100); vocabulary blocks of 512
    h = (torch.randn(n, d, generator=g) * 0.1).bfloat16()
    c = (torch.randn(v, d, generator=g) * 0.1).bfloat16()
    # tile 0's targets in block 0, tile 1's in block 1: blocks 2 and 3 hold no target
    t = torch.cat([torch.randint(0, 512, (1024,), generator=g), torch.randint(512, 1024, (n - 1024,), generator=g)])
    # near-uniform softmax (p ~ 1/1800): filter_eps 1e-2 drops every tile without a target
    with torch.backends.mkldnn.flags(enabled=products):
        used, (dh, dc) = ran_bf16_products(lambda: torch.autograd.grad(
            fastloss.linear_cross_entropy(h.requires_grad_(), c.requires_grad_(), t, reduction="sum",
                                          filter_eps=1e-2), (h, c)))
    assert used == products
    h64, c64 = h.detach().double(), c.detach().double()
    dz = torch.softmax(h64 @ c64.T, -1) - F.one_hot(t, v).double()
    kept = torch.zeros(n, v, dtype=torch.bool)
    kept[:1024, :512] = True
    kept[1024:, 512:1024] = True
    dz = dz * kept
    for got, want in ((dh, dz @ c64), (dc, dz.T @ h64)):
        assert ((got.double() - want).norm() / want.norm()).item() < 4e-3
    assert torch.count_nonzero(dc[1024:]) == 0


def test_bfloat16_with_an_odd_hidden_size_uses_float32_matmuls():
    # The packed bfloat16 operands pair up entries along D: an odd D takes the float32 path.
    h, c, t, _ = make_inputs((40,), 33, 600, torch.bfloat16, "cpu", seed=13)
    used, loss = ran_bf16_products(lambda: fastloss.linear_cross_entropy(h, c, t))
    assert not used
    torch.testing.assert_close(loss.double(), reference(h.double(), c.double(), t), rtol=2e-5, atol=2e-5)


def test_autocast_runs_the_head_in_the_autocast_dtype(device):
    """Under torch.autocast the head sees the autocast dtype like F.linear does, and float32
    master weights get float32 gradients; a bfloat16 hidden with float32 weights works."""
    h, c, t, b = make_inputs((4, 32), 64, 1500, torch.float32, device, bias=True, seed=4, scale=2.0)
    for hidden in (h, h.bfloat16()):
        with torch.autocast(device, dtype=torch.bfloat16):
            out, grads = grads_of(lambda h_, c_, b_: fastloss.linear_cross_entropy(
                h_, c_, t, b_, filter_eps=None, deterministic=True), [hidden, c, b])
        # deterministic: bitwise comparable on CUDA too (its default backward adds with atomics)
        expected, expected_grads = grads_of(
            lambda h_, c_, b_: fastloss.linear_cross_entropy(h_.bfloat16(), c_.bfloat16(), t, b_.bfloat16(),
                                                             filter_eps=None, deterministic=True), [hidden, c, b])
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for a, e, leaf in zip(grads, expected_grads, (hidden, c, b)):
            assert a.dtype == leaf.dtype
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    # float64 is left alone, as autocast leaves it
    h64, c64 = h.double(), c.double()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = fastloss.linear_cross_entropy(h64, c64, t)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference(h64, c64, t), **TOL[torch.float64])


def test_int32_targets_and_return_lse(device):
    h, c, t, b = make_inputs((5, 11), 16, 700, torch.float64, device, bias=True)
    loss64, lse64 = fastloss.linear_cross_entropy(h, c, t, b, return_lse=True, reduction="none")
    loss32, lse32 = fastloss.linear_cross_entropy(h, c, t.int(), b, return_lse=True, reduction="none")
    assert torch.equal(loss64, loss32) and torch.equal(lse64, lse32)
    z = h @ c.T + b
    torch.testing.assert_close(lse64, torch.logsumexp(z, -1) * (t != IGNORE))
    assert lse64.shape == t.shape


def test_non_contiguous(device):
    h, c, t, b = make_inputs((6, 10), 32, 900, torch.float32, device, bias=True)
    h_nc = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, transposed strides
    c_nc = torch.cat([c, c], dim=1)[:, : c.shape[1]]
    b_nc = torch.stack([b, b], dim=1)[:, 0]
    assert not (h_nc.is_contiguous() or c_nc.is_contiguous() or b_nc.is_contiguous())
    out, grads = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], filter_eps=None), [h_nc, c_nc, b_nc])
    ref, ref_grads = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], filter_eps=None), [h, c, b])
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: the CUDA tensor-core kernels
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_token_ignored(device, reduction, dtype):
    h, c, t, b = make_inputs((2, 70), 32, 500, dtype, device, bias=True)
    t = torch.full_like(t, IGNORE)
    (loss, lse), grads = grads_of(
        lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], reduction=reduction, z_loss=0.1,
                                                 return_lse=True), [h, c, b])
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(lse, torch.zeros_like(lse))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_custom_ignore_index(device):
    h, c, t, _ = make_inputs((20,), 8, 30, torch.float64, device, ignore_frac=0.0)
    t[::3] = 7  # a valid class used as ignore_index
    check = fastloss.linear_cross_entropy(h, c, t, ignore_index=7, reduction="none")
    torch.testing.assert_close(check, reference(h, c, t, ignore_index=7, reduction="none"))


def test_empty(device):
    h = torch.empty(0, 16, device=device, requires_grad=True)
    c = torch.randn(10, 16, device=device, requires_grad=True)
    t = torch.empty(0, dtype=torch.long, device=device)
    loss = fastloss.linear_cross_entropy(h, c, t)
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.shape == h.shape and torch.equal(c.grad, torch.zeros_like(c))
    assert fastloss.linear_cross_entropy(h, c, t, reduction="none").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_the_gradients_asked_for(device, dtype):
    # A frozen LM head (LoRA fine-tuning) skips the d classifier matmul, a frozen trunk d hidden.
    h, c, t, b = make_inputs((4, 9), 16, 700, dtype, device, bias=True)
    (_, (dh_all, dc_all, db_all)) = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2]), [h, c, b])
    for wanted in ([h], [c], [b], [h, b]):
        inputs = [x.detach().clone().requires_grad_(any(x is w for w in wanted)) for x in (h, c, b)]
        loss = fastloss.linear_cross_entropy(inputs[0], inputs[1], t, inputs[2])
        weight = torch.randn((), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grads = torch.autograd.grad((loss.double() * weight.to(loss.device)).sum(), [x for x in inputs if x.requires_grad])
        expected = [g for g, x in zip((dh_all, dc_all, db_all), inputs) if x.requires_grad]
        for got, ref in zip(grads, expected):
            if device == "cuda" and dtype != torch.float32:
                # The tensor-core backward adds with float atomics: the order, and the last bit
                # after rounding to bfloat16, can differ between runs.
                torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-6)
            else:
                assert torch.equal(got, ref)
    dh, dc, db = torch.ops.fastloss.linear_cross_entropy_backward(
        torch.ones(36, device=device), None, h.reshape(36, 16), c, t.reshape(36), b,
        torch.zeros(36, device=device), IGNORE, 0.0, 0.0, 0.0, 0.0, [True, False, False])
    assert dh.shape == (36, 16) and dc.shape == (0,) and db.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_flag(device, dtype):
    # deterministic=True: bitwise-equal gradients across runs (on the CPU always), the same
    # values as the default up to rounding; passed through the op schema to the backward.
    h, c, t, b = make_inputs((2, 40), 16, 900, dtype, device, bias=True)
    f = lambda det: lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], z_loss=1e-3,  # noqa: E731
                                                             deterministic=det)
    (out0, g0), (out1, g1), (out2, g2) = grads_of(f(True), [h, c, b]), grads_of(f(True), [h, c, b]), \
        grads_of(f(False), [h, c, b])
    assert torch.equal(out0, out1) and torch.equal(out0, out2)
    for a, r, d in zip(g0, g1, g2):
        assert torch.equal(a, r)
        torch.testing.assert_close(d, a, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="'deterministic' must be a bool"):
        fastloss.linear_cross_entropy(h, c, t, deterministic=1)
    ops = torch.ops.fastloss
    loss, lse = ops.linear_cross_entropy(h.reshape(80, 16), c, t.reshape(80), b, IGNORE, 0.0, 0.0, 0.0, 0.0, True)
    dh, dc, db = ops.linear_cross_entropy_backward(torch.ones_like(loss), None, h.reshape(80, 16), c, t.reshape(80),
                                                   b, lse, IGNORE, 0.0, 0.0, 0.0, 0.0, [True, True, True], 0, -1,
                                                   True)
    assert dh.shape == (80, 16) and dc.shape == c.shape and db.shape == b.shape


def test_zero_width_hidden(device):
    # D = 0: every logit is 0, so the loss is log V and the gradients are empty.
    h = torch.zeros(3, 0, device=device, requires_grad=True)
    c = torch.zeros(5, 0, device=device, requires_grad=True)
    loss = fastloss.linear_cross_entropy(h, c, torch.tensor([0, 1, 2], device=device))
    loss.backward()
    torch.testing.assert_close(loss.item(), torch.log(torch.tensor(5.0)).item())
    assert h.grad.shape == (3, 0) and c.grad.shape == (5, 0)


def test_large_logits_and_nan(device):
    # Logits in the tens of thousands: no overflow (online max), finite gradients.
    h, c, t, _ = make_inputs((64,), 16, 3000, torch.float32, device, scale=1000.0, ignore_frac=0.0)
    loss = fastloss.linear_cross_entropy(h, c, t)
    torch.testing.assert_close(loss.double(), reference(h.double(), c.double(), t), rtol=1e-5, atol=0)
    _, grads = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t), [h, c])
    assert all(torch.isfinite(g).all() for g in grads)
    # A NaN in one token's hidden state makes only that token's loss NaN, like torch.
    h[1, 2] = float("nan")
    per = fastloss.linear_cross_entropy(h, c, t, reduction="none")
    assert torch.isnan(per[1]) and torch.isfinite(per[torch.arange(64, device=device) != 1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v", [2, 600])
def test_hidden_gradient_of_token_tiles_that_every_block_skips(device, dtype, v):
    # d hidden starts uninitialized on the CPU (without bfloat16 products): a token tile's first
    # product writes it, and tiles whose every logit gradient is filtered out are zeroed at the
    # end. The first 1024-token tile predicts its targets with near certainty, so blocks skip
    # it. V = 2 takes the small-block logits, 600 two vocabulary blocks. (Whether an unzeroed
    # tile would show NaN here depends on the allocator handing back the freed NaN memory.)
    g = torch.Generator().manual_seed(v)
    n, d = 1100, 8  # d hidden of 70 KiB: malloc reuses freed memory for it (not fresh pages)
    c = torch.randn(v, d, generator=g, dtype=torch.float64)
    c = c / c.norm(dim=-1, keepdim=True)
    t = torch.randint(0, v, (n,), generator=g)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h[:1024] = 2000 * c[t[:1024]]  # target logit 2000, the others 2000 cos
    h, c = (x.to(device, dtype).requires_grad_() for x in (h, c))
    loss = fastloss.linear_cross_entropy(h, c, t.to(device), reduction="sum")
    for _ in range(4):  # NaN in freed memory that d hidden may reuse
        garbage = torch.full((n, d), float("nan"), dtype=dtype, device=device)
        del garbage
    dh, dc = torch.autograd.grad(loss, (h, c))
    h64, c64 = (x.detach().double().requires_grad_() for x in (h, c))
    rh, rc = torch.autograd.grad(reference(h64, c64, t.to(device), reduction="sum"), (h64, c64))
    assert torch.isfinite(dh).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(dh.double(), rh, rtol=tol, atol=tol * rh.abs().max().item())
    torch.testing.assert_close(dc.double(), rc, rtol=tol, atol=tol * rc.abs().max().item())


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_float32_loss_is_not_rounded_through_the_lse(device, offset, z_loss):
    """Exact logits (D = 1, hidden 1) of offset + N(0, 3): the loss (max - z_target) + log(sum)
    is accurate to float32 rounding of itself, as eager's log-softmax is. Formed as lse +
    linear it carried the LSE's rounding, up to |lse| x 2^-24: 0.6 ulp of 1e4 = 5e-4."""
    g = torch.Generator().manual_seed(5)
    v, n = 1000, 64
    c = (offset + 3 * torch.randn(v, 1, generator=g)).float()
    h = torch.ones(n, 1)
    t = torch.randint(0, v, (n,), generator=g)
    t[:8] = c[:, 0].argmax()  # the smallest losses
    loss, lse = fastloss.linear_cross_entropy(h.to(device), c.to(device), t.to(device), reduction="none",
                                              z_loss=z_loss, return_lse=True)
    z = c[:, 0].double()
    exact_lse = torch.logsumexp(z, 0)
    expected = exact_lse - z[t] + z_loss * exact_lse ** 2
    eager = F.cross_entropy(c[:, 0].expand(n, v), t, reduction="none").double() + z_loss * exact_lse ** 2
    err, eager_err = (loss.cpu().double() - expected).abs(), (eager - expected).abs()
    # per token: a few roundings of the loss and of log(sum) (<= log V), and z_loss's lse^2
    bound = 4 * 2.0**-24 * (expected.abs() + math.log(v) + z_loss * exact_lse ** 2)
    assert (err <= bound).all(), (err.max().item(), eager_err.max().item())
    torch.testing.assert_close(lse.cpu().double(), exact_lse.expand(n), rtol=2.0**-23, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [4, 300])
def test_nan_in_classifier_or_bias_makes_every_loss_nan(device, dtype, tokens):
    # A NaN logit in any vocabulary row, like torch: every token's loss and LSE NaN. Rows in
    # several 512-row blocks: with few tokens the CPU's bfloat16 products split the vocabulary
    # into parts, and a part whose first block held the NaN once merged as empty (finite loss).
    h, c, t, b = make_inputs((tokens,), 8, 5003, dtype, device, bias=True, ignore_frac=0.0)
    for row in (3, 600, 1030, 2600, 5002):
        for where in ("classifier", "bias"):
            c_bad, b_bad = c.clone(), b.clone()
            if where == "classifier":
                c_bad[row, 1] = float("nan")
            else:
                b_bad[row] = float("nan")
            loss, lse = fastloss.linear_cross_entropy(h, c_bad, t, b_bad, reduction="none", return_lse=True)
            assert loss.isnan().all() and lse.isnan().all(), (row, where)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_vocabulary_entries(device, dtype, reduction):
    # A bias of -inf masks vocabulary entries (padding rows of the head, disallowed tokens).
    # Without smoothing torch's loss and gradients stay finite; with it the loss is inf.
    h, c, t, b = make_inputs((4, 9), 16, 300, dtype, device, bias=True)
    masked = torch.arange(300, device=device) % 7 == 3
    t[(t.remainder(7) == 3) & (t != IGNORE)] = 5  # targets are never masked
    b = b.masked_fill(masked, float("-inf"))
    out, grads = grads_of(lambda h_, c_: fastloss.linear_cross_entropy(h_, c_, t, b, reduction=reduction), [h, c])
    ref, ref_grads = grads_of(lambda h_, c_: reference(h_, c_, t, b.double(), reduction=reduction),
                              [h.double(), c.double()])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, **TOL[dtype])
    smoothed = fastloss.linear_cross_entropy(h, c, t, b, reduction="none", label_smoothing=0.1)
    expected = reference(h.double(), c.double(), t, b.double(), reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(smoothed.double(), expected, **TOL[dtype])  # inf at active tokens, 0 at ignored


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_whole_masked_vocabulary_blocks(device, dtype):
    # Whole blocks of the vocabulary masked (a padded head's tail; here the first 1100 entries
    # and 2048 ... 2600 as well): a block's maximum is then -inf, and -inf - -inf made the LSE
    # NaN on the CPU and on the CUDA ATen path. Both block sizes (512 CPU, 1024 ATen) and the
    # CUDA tiles (128) are covered; bfloat16 runs the tensor-core kernels on CUDA.
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bfloat16 is a CUDA tensor-core case")
    h, c, t, b = make_inputs((5, 7), 32, 3000, dtype, device, bias=True, seed=3, ignore_frac=0.1)
    idx = torch.arange(3000, device=device)
    masked = (idx < 1100) | ((idx >= 2048) & (idx < 2600))
    t = torch.where((t != IGNORE) & masked[t.clamp(min=0)], torch.full_like(t, 1500), t)
    b = b.masked_fill(masked, float("-inf"))
    out, grads = grads_of(lambda h_, c_, b_: fastloss.linear_cross_entropy(h_, c_, t, b_, reduction="none",
                                                                           return_lse=True), [h, c, b])
    ref, ref_grads = grads_of(lambda h_, c_, b_: reference(h_, c_, t, b_, reduction="none", return_lse=True),
                              [h.double(), c.double(), b.double()])
    tol = TOL.get(dtype, dict(rtol=3e-2, atol=3e-2))
    for a, r in zip(out, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), r, **tol)
    for a, r in zip(grads, ref_grads):
        assert not a.isnan().any()
        torch.testing.assert_close(a.double(), r, **tol)


def test_label_smoothing_is_never_filtered(device):
    # Every logit-gradient entry carries -smoothing / V (3e-5 here, below bfloat16's auto
    # threshold 2^-12): skipping such tiles dropped their share of the smoothing gradient (half
    # of d hidden here, where the classifier rows share an offset and peaked softmaxes leave
    # most tiles below the threshold).
    h, c, t, _ = make_inputs((4,), 32, 16384, torch.bfloat16, device, scale=30.0, ignore_frac=0.0)
    c = c + 1
    def grads(filter_eps):
        return grads_of(lambda h_, c_: fastloss.linear_cross_entropy(h_, c_, t, label_smoothing=0.5,
                                                                     filter_eps=filter_eps), [h, c])[1]
    for a, b in zip(grads("auto"), grads(None)):
        if device == "cpu":
            assert torch.equal(a, b)
        else:  # the CUDA kernel adds d hidden's tiles with float atomics, in no fixed order
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-6)


def test_int32_targets_with_an_ignore_index_beyond_int32(device):
    h, c, _, _ = make_inputs((4,), 8, 10, torch.float64, device)
    t = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
    for ignore_index in (2**32, -(2**40)):  # matches no int32 target: every token counts
        loss = fastloss.linear_cross_entropy(h, c, t, ignore_index=ignore_index)
        torch.testing.assert_close(loss, reference(h, c, t.long()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])  # True: the ATen path on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_tokens_with_inf_hidden_rows(device, dtype, deterministic):
    # Padding positions may hold inf or NaN: ignored, they must not reach any gradient.
    h, c, t, b = make_inputs((40,), 16, 700, dtype, device, bias=True, ignore_frac=0.0)
    t[[3, 17]] = IGNORE
    h_bad = h.clone()
    h_bad[3] = float("inf")
    h_bad[17, 5] = float("nan")
    run = lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], deterministic=deterministic)  # noqa: E731
    out, grads = grads_of(run, [h_bad, c, b])
    ref, ref_grads = grads_of(run, [h, c, b])
    torch.testing.assert_close(out, ref)
    assert (grads[0][[3, 17]] == 0).all()
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_an_infinite_output_gradient_spreads_as_torchs(device, label_smoothing):
    # One token's output gradient is inf: d classifier and d bias hold +-inf where torch's do,
    # NaN only where torch's do (without smoothing the smoothing term was inf * 0 = NaN, in
    # every entry).
    h, c, t, b = make_inputs((8,), 16, 64, torch.float32, device, bias=True, ignore_frac=0.0)
    g = torch.randn(8, generator=torch.Generator().manual_seed(1)).to(device)
    g[0] = float("inf")
    ins = [x.clone().requires_grad_() for x in (h, c, b)]
    got = torch.autograd.grad(fastloss.linear_cross_entropy(*ins[:2], t, ins[2], reduction="none",
                                                            label_smoothing=label_smoothing), ins, g)
    refs = [x.clone().requires_grad_() for x in (h, c, b)]
    logits = refs[0] @ refs[1].T + refs[2]
    want = torch.autograd.grad(F.cross_entropy(logits, t, reduction="none", label_smoothing=label_smoothing), refs, g)
    for name, x, r in zip(("hidden", "classifier", "bias"), got, want):
        assert torch.equal(x.isnan(), r.isnan()), f"d {name}: NaN pattern"
        assert torch.equal(x.isinf(), r.isinf()) and torch.equal(x[x.isinf()], r[r.isinf()]), f"d {name}: infinities"


# --------------------------------------------------------------------------------------------
# Gradient filtering


def test_filter_skips_tiles_within_its_bound(device):
    # Half of the vocabulary is far below the rest: those tiles' probabilities are < 1e-6.
    h, c, t, _ = make_inputs((600,), 16, 2048, torch.float64, device, ignore_frac=0.0)
    h = h.abs() + 1
    c[1024:] = -c[1024:].abs() - 1
    c[:1024] = c[:1024].abs()
    t = t % 1024
    eps = 1e-6
    _, (dh, dc) = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, filter_eps=eps, reduction="sum"),
                           [h, c])
    _, (dh_ref, dc_ref) = grads_of(lambda *a: reference(a[0], a[1], t, reduction="sum"), [h, c])
    weight = torch.randn(1, generator=torch.Generator().manual_seed(5), dtype=torch.float64).abs().item()
    # Every dropped entry of d loss / d z is below eps * |output gradient|.
    assert (dc - dc_ref).abs().max() <= eps * weight * h.abs().sum(0).max()
    assert (dh - dh_ref).abs().max() <= eps * weight * c.abs().sum(0).max()
    assert dc_ref[1024:].abs().max() > 0
    if device == "cpu":  # the CUDA path (ATen ops) does not filter: skipping would need a host sync
        assert torch.equal(dc[1024:], torch.zeros_like(dc[1024:]))  # skipped, so exactly 0
    # Without filtering, exact.
    _, (dh0, dc0) = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, filter_eps=None,
                                                                      reduction="sum"), [h, c])
    torch.testing.assert_close(dc0, dc_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_logit_gradients_below_the_normal_range_are_zero(dtype):
    """Logit gradients below the smallest normal number come out as 0 rather than as subnormals,
    which sent every BLAS product over the gradient tile down the processor's slow path (float32
    logits of std 20: the backward took 14x its time). The gradients move by less than that
    number times the token or vocabulary count."""
    tiny = torch.finfo(dtype).tiny
    # One token, 3 classes: the third's probability (e^-80 / e^-700) is a normal number, and
    # times the output gradient 1e-5 a subnormal one.
    far = 80.0 if dtype == torch.float32 else 700.0
    h = torch.tensor([[1.0, 0.0]], dtype=dtype)
    c = torch.tensor([[far, 0.0], [far - 0.5, 0.0], [0.0, 0.0]], dtype=dtype)
    t = torch.tensor([1])
    grad_out = torch.tensor(1e-5, dtype=dtype)
    grads = []
    for fn in (lambda *a: fastloss.linear_cross_entropy(*a, t, filter_eps=None, reduction="sum"),
               lambda *a: reference(*a, t, reduction="sum")):
        a = [x.clone().requires_grad_() for x in (h, c)]
        grads.append(torch.autograd.grad(fn(*a), a, grad_out))
    (dh, dc), (dh_ref, dc_ref) = grads
    assert 0 < dc_ref[2].abs().max() < tiny  # eager keeps the subnormal
    assert torch.equal(dc[2], torch.zeros_like(dc[2]))
    torch.testing.assert_close(dc[:2], dc_ref[:2], rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    # (d hidden sums terms of size 1e-5 x far that cancel: their rounding sets the tolerance)
    torch.testing.assert_close(dh, dh_ref, rtol=0, atol=64 * 1e-5 * far * torch.finfo(dtype).eps)


def test_filter_eps_auto_values():
    from fastloss.ops.linear_cross_entropy import resolve_filter_eps

    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_filter_eps("auto", torch.float16) == 2.0**-15
    assert resolve_filter_eps("auto", torch.float32) == 2.0**-28
    assert resolve_filter_eps(None, torch.float32) == 0.0


# --------------------------------------------------------------------------------------------
# Registration: gradcheck, opcheck, torch.compile, nn module


def test_gradcheck(device):
    h, c, t, b = make_inputs((2, 5), 6, 40, torch.float64, device, bias=True)
    t[0, 0] = IGNORE

    def f(h_, c_, b_):
        return fastloss.linear_cross_entropy(h_, c_, t, b_, softcap=3.0, label_smoothing=0.1, z_loss=0.05,
                                             reduction="none", return_lse=True, filter_eps=None)

    inputs = [x.requires_grad_() for x in (h, c, b)]
    assert torch.autograd.gradcheck(f, inputs)


def test_opcheck(device):
    h, c, t, b = make_inputs((9,), 8, 600, torch.float32, device, bias=True)
    ops = torch.ops.fastloss
    torch.library.opcheck(ops.linear_cross_entropy.default, (h, c, t, b, IGNORE, 0.0, 0.0, 0.0, 0.0))
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          (h.requires_grad_(), c.requires_grad_(), t.int(), None, IGNORE, 5.0, 0.1, 1e-3, 1e-6))
    h, c = h.detach(), c.detach()
    torch.library.opcheck(ops.linear_cross_entropy_shard.default, (h, c[100:300], t, b[100:300], IGNORE, 0.0, 0.1,
                                                                    100, 600))
    torch.library.opcheck(ops.linear_cross_entropy_shard.default,
                          (h.clone().requires_grad_(), c[100:300].clone().requires_grad_(), t,
                           b[100:300].clone().requires_grad_(), IGNORE, 3.0, 0.1, 100, 600))
    loss, lse = ops.linear_cross_entropy(h, c, t, b, IGNORE, 0.0, 0.0, 0.0, 0.0)
    g = torch.randn_like(loss)
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (g, None, h, c, t, b, lse, IGNORE, 0.0, 0.0, 0.0, 0.0, [True, True, True]))
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (g, torch.randn_like(lse), h, c, t, None, lse, IGNORE, 2.0, 0.1, 0.01, 1e-4,
                           [True, False, True], 0, 600))
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (g, None, h, c, t, b, lse, IGNORE, 0.0, 0.0, 0.0, 0.0, [False, True, False]))
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (g, None, h, c, t, b, lse, IGNORE, 0.0, 0.0, 0.0, 0.0, [True, True, True], 0, -1, True))
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          (h.requires_grad_(), c, t, b, IGNORE, 0.0, 0.0, 0.0, 0.0, True))


def test_torch_compile_fullgraph(device):
    h, c, t, b = make_inputs((3, 8), 16, 300, torch.float32, device, bias=True)

    def f(h_, c_, b_):
        loss, lse = fastloss.linear_cross_entropy(h_, c_, t, b_, softcap=10.0, z_loss=1e-3, shift=True,
                                                  return_lse=True)
        return loss + lse.mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, grads = grads_of(compiled, [h, c, b])
    ref, ref_grads = grads_of(f, [h, c, b])
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_nn_module(device):
    h, c, t, b = make_inputs((2, 6), 8, 100, torch.float32, device, bias=True)
    m = fastloss.nn.LinearCrossEntropy(shift=True, softcap=5.0, reduction="sum")
    torch.testing.assert_close(m(h, c, t, b), fastloss.linear_cross_entropy(h, c, t, b, shift=True, softcap=5.0,
                                                                           reduction="sum"))
    assert "shift=True" in repr(m)


# --------------------------------------------------------------------------------------------
# Bad input


def test_shift_with_int32_targets_and_an_ignore_index_beyond_int32(device):
    h, c, _, _ = make_inputs((2, 3), 8, 10, torch.float64, device)
    t = torch.randint(0, 10, (2, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(4)).to(device)
    for reduction in ("mean", "none"):
        got = fastloss.linear_cross_entropy(h, c, t, ignore_index=2**31, shift=True, reduction=reduction)
        want = fastloss.linear_cross_entropy(h, c, t.long(), ignore_index=2**31, shift=True, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("strict", [True, False])
def test_shift_exports_with_a_dynamic_sequence_length(strict):
    # (Slicing T - 1 targets put a guard T != 2 on the length that non-strict export refused.)
    from torch.export import Dim, export

    class Model(torch.nn.Module):
        def forward(self, h, c, t):
            return fastloss.linear_cross_entropy(h, c, t, shift=True, reduction="none")

    h, c, t = make_inputs((2, 5), 8, 10, torch.float64, "cpu")[:3]
    B, T = Dim("B", min=2, max=64), Dim("T", min=2, max=64)
    program = export(Model(), (h, c, t), dynamic_shapes=({0: B, 1: T}, None, {0: B, 1: T}), strict=strict)
    h, c, t = make_inputs((3, 9), 8, 10, torch.float64, "cpu")[:3]
    torch.testing.assert_close(program.module()(h, c, t), Model()(h, c, t), rtol=0, atol=0)


@pytest.mark.parametrize("cap", [30.0, 1e4])
def test_softcap_perfect_prediction_has_zero_gradient(device, cap):
    # The backward recomputes each capped logit exactly as the forward rounded it: a token whose
    # target probability is 1 has loss 0 and gradient 0 (a fused multiply-add of cap * tanh
    # into exp(logit - lse) gave it up to 1.5e-4 at logits near 5000).
    x = torch.tensor([[4640.4], [5369.2], [29.0], [25.0]], device=device, requires_grad=True)
    c = torch.tensor([[1.0], [0.0]], device=device)
    t = torch.zeros(4, dtype=torch.long, device=device)
    loss = fastloss.linear_cross_entropy(x, c, t, softcap=cap, reduction="none", filter_eps=None)
    loss.sum().backward()
    assert torch.equal(loss.detach().cpu(), torch.zeros(4))
    assert torch.equal(x.grad.cpu(), torch.zeros(4, 1))


def test_shard_gradients(device):
    # The vocabulary-parallel shard op is differentiable on its own (gradcheck in float64).
    h, c, t, b = make_inputs((6,), 4, 9, torch.float64, device, bias=True)
    t = torch.tensor([1, 8, IGNORE, 0, 3, 12], device=device)  # 12: outside this shard
    for cap, smoothing in ((0.0, 0.0), (3.0, 0.1)):
        def shard(h, c, b):
            return torch.ops.fastloss.linear_cross_entropy_shard(h, c, t, b, IGNORE, cap, smoothing, 3, 20)
        assert torch.autograd.gradcheck(shard, (h.requires_grad_(), c.requires_grad_(), b.requires_grad_()))


def test_meta_tensors():
    h, c, t, b = make_inputs((4,), 3, 5, torch.float32, "cpu", bias=True)
    loss = fastloss.linear_cross_entropy(h.to("meta"), c.to("meta"), t.to("meta"), b.to("meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    # One argument on meta picks the fake kernel, which checks devices like the real ones.
    with pytest.raises(RuntimeError, match="'classifier' must be on the device of 'hidden' \\(cpu\\), got meta"):
        fastloss.linear_cross_entropy(h, c.to("meta"), t)
    with pytest.raises(RuntimeError, match="'bias' must be on the device of 'hidden'"):
        fastloss.linear_cross_entropy(h, c, t, b.to("meta"))


def test_errors():
    h, c, t, b = make_inputs((4,), 8, 20, torch.float32, "cpu", ignore_frac=0.0)
    t_bad = t.clone()
    t_bad[2] = 20
    with pytest.raises(IndexError, match=r"'targets' must be in \[0, 20\) or equal ignore_index \(-100\), got 20 "
                                         r"at position 2"):
        fastloss.linear_cross_entropy(h, c, t_bad)
    t_bad[2] = -1
    with pytest.raises(IndexError, match="got -1 at position 2"):
        fastloss.linear_cross_entropy(h, c, t_bad)
    # With shift the position is the user's, not that of the shifted targets.
    h3, t3 = h.reshape(2, 2, 8), t.reshape(2, 2).clone()
    t3[1, 1] = 99
    with pytest.raises(IndexError, match=r"got 99 at position 3 \(index \(1, 1\)\)"):
        fastloss.linear_cross_entropy(h3, c, t3, shift=True)
    # Where that check is skipped (torch.compile, vmap), the op's message names both positions.
    compiled = torch.compile(lambda h_, t_: fastloss.linear_cross_entropy(h_, c, t_, shift=True), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(IndexError, match=r"got 99 at position 2 of the flattened targets \(the caller's position 3 if "):
        compiled(h3, t3)
    t3[1, 1], t3[1, 0] = t[3], 99  # the first position of a sequence is never a target
    fastloss.linear_cross_entropy(h3, c, t3, shift=True)
    with pytest.raises(TypeError, match="'process_group' must be a torch.distributed ProcessGroup"):
        fastloss.linear_cross_entropy(h, c, t, process_group=object())
    if torch.distributed.is_available():  # new_group's marker for a rank outside the group
        with pytest.raises(ValueError, match="not a member of 'process_group'"):
            fastloss.linear_cross_entropy(h, c, t, process_group=torch.distributed.GroupMember.NON_GROUP_MEMBER)
    with pytest.raises(RuntimeError, match="'classifier' must be \\(V, D\\) with D = 8"):
        fastloss.linear_cross_entropy(h, c[:, :7], t)
    with pytest.raises(RuntimeError, match="'classifier' must have the dtype of 'hidden'"):
        fastloss.linear_cross_entropy(h, c.double(), t)
    with pytest.raises(RuntimeError, match="'bias' must have shape \\(20\\)"):
        fastloss.linear_cross_entropy(h, c, t, torch.zeros(19))
    with pytest.raises(RuntimeError, match="'bias' must have the dtype of 'hidden'"):
        fastloss.linear_cross_entropy(h, c, t, torch.zeros(20, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="'targets' must be an int64 or int32 tensor"):
        fastloss.linear_cross_entropy(h, c, t.float())
    with pytest.raises(RuntimeError, match="'hidden' to be a float32"):
        fastloss.linear_cross_entropy(h.long(), c.long(), t)
    with pytest.raises(RuntimeError, match="'classifier' must have at least one row"):
        fastloss.linear_cross_entropy(h, c[:0], t)
    with pytest.raises(ValueError, match="'targets' must have hidden's leading shape"):
        fastloss.linear_cross_entropy(h, c, t[:3])
    with pytest.raises(ValueError, match="'reduction'"):
        fastloss.linear_cross_entropy(h, c, t, reduction="avg")
    with pytest.raises(ValueError, match="'softcap'"):
        fastloss.linear_cross_entropy(h, c, t, softcap=0.0)
    with pytest.raises(ValueError, match="'label_smoothing' must be in"):
        fastloss.linear_cross_entropy(h, c, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="'filter_eps'"):
        fastloss.linear_cross_entropy(h, c, t, filter_eps="fast")
    for bad in (-1.0, 1.0):
        with pytest.raises(ValueError, match="'filter_eps' must be in \\[0, 1\\), got"):
            fastloss.linear_cross_entropy(h, c, t, filter_eps=bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'z_loss' must be a finite float, got"):
            fastloss.linear_cross_entropy(h, c, t, z_loss=bad)
    with pytest.raises(ValueError, match="'ignore_index' must fit in int64"):
        fastloss.linear_cross_entropy(h, c, t, ignore_index=2**70)
    with pytest.raises(TypeError, match="'classifier' to be a torch.Tensor"):
        fastloss.linear_cross_entropy(h, None, t)
    with pytest.raises(ValueError, match="'shift' needs"):
        fastloss.linear_cross_entropy(h[0], c, t[0], shift=True)
    ops = torch.ops.fastloss
    with pytest.raises(RuntimeError, match="'lse' must be a Float tensor of shape \\(4\\)"):
        ops.linear_cross_entropy_backward(torch.ones(4), None, h, c, t, None, torch.ones(3), IGNORE, 0.0, 0.0,
                                          0.0, 0.0, [True, True, True])
    with pytest.raises(RuntimeError, match="must lie in the vocabulary"):
        ops.linear_cross_entropy_shard(h, c, t, None, IGNORE, 0.0, 0.0, 5, 20)
    with pytest.raises(RuntimeError, match="'filter_eps' must be in \\[0, 1\\)"):
        ops.linear_cross_entropy_backward(torch.ones(4), None, h, c, t, None, torch.ones(4), IGNORE, 0.0, 0.0,
                                          0.0, 2.0, [True, True, True])
    # A cap outside float32's normal range would narrow to a subnormal (NaN losses), to 0 (no cap)
    # or to inf in the float32 kernels; float64 applies it as given.
    compiled = torch.compile(lambda h_, c_, cap: fastloss.linear_cross_entropy(h_, c_, t, softcap=cap),
                             fullgraph=True, backend="aot_eager")
    for cap in (1e-40, 1e-50, 1e39):
        for dtype in (torch.float32, torch.bfloat16):
            for run in (fastloss.linear_cross_entropy, lambda h_, c_, t_, softcap: compiled(h_, c_, softcap)):
                with pytest.raises(RuntimeError, match="'softcap' must be a normal float32 value"):
                    run(h.to(dtype), c.to(dtype), t, softcap=cap)
    h64, c64 = h.double(), c.double()
    capped = torch.tanh((h64 @ c64.T) / 1e-40) * 1e-40
    torch.testing.assert_close(fastloss.linear_cross_entropy(h64, c64, t, softcap=1e-40),
                               torch.nn.functional.cross_entropy(capped, t), rtol=1e-12, atol=0)
    fastloss.linear_cross_entropy(h, c, t, softcap=float(torch.finfo(torch.float32).tiny))


def test_device_mismatch_is_named(device):
    if device == "cpu":
        pytest.skip("needs a second device")
    h, c, t, _ = make_inputs((4,), 8, 20, torch.float32, device)
    with pytest.raises(RuntimeError, match="'classifier' must be on the device of 'hidden'"):
        torch.ops.fastloss.linear_cross_entropy(h, c.cpu(), t, None, IGNORE, 0.0, 0.0, 0.0, 0.0)


def test_memcheck_subset(device):
    # Small cases of every path, for compute-sanitizer on a GPU machine.
    for dtype in (torch.float32, torch.bfloat16):
        check = fastloss.linear_cross_entropy
        h, c, t, b = make_inputs((3, 70), 32, 1500, dtype, device, bias=True)
        out, grads = grads_of(lambda *a: check(a[0], a[1], t, a[2], softcap=5.0, label_smoothing=0.1, z_loss=1e-3),
                              [h, c, b])
        assert torch.isfinite(out) and all(torch.isfinite(g.float()).all() for g in grads)


# --------------------------------------------------------------------------------------------
# CUDA tensor-core kernels (float16 / bfloat16, D a multiple of 8). Skipped without a GPU.

cuda_only = pytest.mark.cuda


def rel_err(a, r):
    return ((a.double() - r.double()).norm() / r.double().norm().clamp(min=1e-30)).item()


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [50257, 151936])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cuda_kernels_within_twice_torch_error(dtype, v, option):
    """Loss, LSE and gradients against float64, at most 2x the error of torch's own half-precision
    logits + F.cross_entropy; 300 tokens (not a multiple of the 128-token tile), 20% ignored.
    Without filtering: these near-uniform softmaxes over 50k-150k entries sit below the auto
    threshold in every tile without a target, so the filter would drop most of d hidden's
    probability-weighted sum by design (filtering: test_half_within_twice_torch_error, peaked)."""
    options = dict(OPTIONS[option])
    h, c, t, b = make_inputs((3, 100), 64, v, dtype, "cuda", bias=options.pop("bias", False), seed=7)
    kw = dict(options)
    out, grads = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2] if b is not None else None,
                                                                   filter_eps=None, **kw), [h, c, b])
    torch_out, torch_grads = grads_of(lambda *a: reference(a[0], a[1], t, a[2] if b is not None else None, **kw),
                                      [h, c, b])
    ref, ref_grads = grads_of(lambda *a: reference(a[0], a[1], t, a[2] if b is not None else None, **kw),
                              [h.double(), c.double(), None if b is None else b.double()])
    outs = zip(out, torch_out, ref) if isinstance(out, tuple) else [(out, torch_out, ref)]
    for a, tq, r in outs:
        assert rel_err(a, r) <= 2 * rel_err(tq, r) + 1e-6
    for name, a, tg, r in zip("hidden classifier bias".split(), grads, torch_grads, ref_grads):
        assert a.dtype == dtype
        assert rel_err(a, r) <= 2 * rel_err(tg, r), name


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_lead, v", [((5,), 151936), ((1, 300), 50257), ((2, 129), 1000)])
def test_cuda_kernels_match_the_float32_path(dtype, n_lead, v):
    """The kernels against the cuBLAS path on the same values upcast to float32 (both accumulate
    in float32): the forward to float32 rounding, the gradients (whose logit gradient the kernel
    rounds to 16 bits) to half-precision rounding. Few tokens x a large vocabulary exercises
    the vocabulary split."""
    h, c, t, b = make_inputs(n_lead, 72, v, dtype, "cuda", bias=True, seed=11)
    kw = dict(softcap=15.0, label_smoothing=0.1, z_loss=1e-3, return_lse=True, reduction="sum", filter_eps=None)
    (loss, lse), grads = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], **kw), [h, c, b])
    (loss32, lse32), grads32 = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], **kw),
                                        [h.float(), c.float(), b.float()])
    torch.testing.assert_close(loss, loss32, rtol=2e-5, atol=1e-3)
    torch.testing.assert_close(lse, lse32, rtol=2e-5, atol=2e-5)
    for name, a, r in zip("hidden classifier bias".split(), grads, grads32):
        assert rel_err(a, r) < 2e-2, name


@cuda_only
def test_cuda_classifier_gradient_over_several_vocabulary_chunks():
    """Enough tokens that d classifier accumulates in float32 one vocabulary chunk (16 tiles of
    128 rows) at a time, over four chunks, the last one partial."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tokens = 128 * (-(-8 * sms // 16) + 1)
    h, c, t, b = make_inputs((tokens,), 64, 3 * 2048 + 77, torch.bfloat16, "cuda", bias=True, seed=12)
    kw = dict(softcap=20.0, reduction="sum", filter_eps=None)
    _, grads = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], **kw), [h, c, b])
    _, grads32 = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], **kw),
                          [h.float(), c.float(), b.float()])
    for name, a, r in zip("hidden classifier bias".split(), grads, grads32):
        assert rel_err(a, r) < 2e-2, name
    # every chunk's rows were written (a missed chunk would leave them empty or stale)
    row_norms = grads[1].float().norm(dim=1)
    assert torch.isfinite(row_norms).all() and (row_norms > 0).float().mean() > 0.99


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_shard_statistics(dtype):
    h, c, t, b = make_inputs((333,), 64, 50257, dtype, "cuda", bias=True, seed=2)
    ops = torch.ops.fastloss
    for start, stop in ((0, 50257), (100, 20100), (20100, 50257)):
        lse, linear = ops.linear_cross_entropy_shard(h, c[start:stop], t, b[start:stop], IGNORE, 10.0, 0.1, start,
                                                     50257)
        lse32, linear32 = ops.linear_cross_entropy_shard(h.float(), c[start:stop].float(), t, b[start:stop].float(),
                                                         IGNORE, 10.0, 0.1, start, 50257)
        assert lse.dtype == torch.float32 and linear.dtype == torch.float32
        torch.testing.assert_close(lse, lse32, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(linear, linear32, rtol=2e-5, atol=2e-4)


@cuda_only
def test_cuda_kernels_output_mask_and_filter():
    h, c, t, b = make_inputs((260,), 64, 5000, torch.bfloat16, "cuda", bias=True, seed=4)
    loss, lse = fastloss.linear_cross_entropy(h, c, t, b, reduction="none", return_lse=True)
    g = torch.randn_like(loss)
    ops = torch.ops.fastloss
    full = ops.linear_cross_entropy_backward(g, None, h, c, t, b, lse, IGNORE, 0.0, 0.0, 0.0, 0.0,
                                             [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [True, False, True]):
        part = ops.linear_cross_entropy_backward(g, None, h, c, t, b, lse, IGNORE, 0.0, 0.0, 0.0, 0.0, mask)
        for want, got, ref in zip(mask, part, full):
            if want:
                torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-6)
            else:
                assert got.numel() == 0
    # filter_eps "auto" (2^-12 for bfloat16) drops only what bfloat16 gradients would not carry.
    auto = ops.linear_cross_entropy_backward(g, None, h, c, t, b, lse, IGNORE, 0.0, 0.0, 0.0, 2.0 ** -12,
                                             [True, True, True])
    for a, r in zip(auto, full):
        assert rel_err(a, r) < 1e-2


@cuda_only
def test_cuda_kernels_unaligned_and_strided_inputs():
    h, c, t, b = make_inputs((200,), 80, 3000, torch.bfloat16, "cuda", bias=True, seed=6)
    kw = dict(softcap=20.0, reduction="none")
    ref = fastloss.linear_cross_entropy(h[:, 8:72], c[:, 8:72].contiguous(), t, b, **kw)
    wide = fastloss.linear_cross_entropy(h[:, 8:72], c[:, 8:72], t, b, **kw)          # row stride 80, aligned
    shifted = fastloss.linear_cross_entropy(h[:, 1:65], c[:, 1:65], t, b, **kw)       # misaligned: copied
    transposed = fastloss.linear_cross_entropy(h[:, 8:72].t().contiguous().t(), c[:, 8:72], t, b[::1], **kw)
    assert torch.equal(wide, ref) and torch.equal(transposed, ref)
    ref_shifted = fastloss.linear_cross_entropy(h[:, 1:65].contiguous(), c[:, 1:65].contiguous(), t, b, **kw)
    assert torch.equal(shifted, ref_shifted)
    # D not a multiple of 8 takes the cuBLAS path.
    odd = fastloss.linear_cross_entropy(h[:, :60], c[:, :60], t, b, **kw)
    odd32 = fastloss.linear_cross_entropy(h[:, :60].float(), c[:, :60].float(), t, b.float(), **kw)
    torch.testing.assert_close(odd, odd32, rtol=2e-2, atol=2e-2)


@cuda_only
def test_cuda_deterministic_gradients_are_bitwise_reproducible():
    h, c, t, b = make_inputs((3, 100), 64, 20000, torch.bfloat16, "cuda", bias=True, seed=8)
    kw = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4, deterministic=True)
    runs = [grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], **kw), [h, c, b]) for _ in range(2)]
    (out0, g0), (out1, g1) = runs
    assert torch.equal(out0, out1)
    for a, r in zip(g0, g1):
        assert torch.equal(a, r)
    # The default (atomic) kernel gives the same gradients up to rounding.
    _, g = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], softcap=30.0,
                                                             label_smoothing=0.1, z_loss=1e-4), [h, c, b])
    for a, r in zip(g, g0):
        assert rel_err(a, r) < 2e-2


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernels_memcheck_tile_edges(dtype):
    # 130 tokens, V = 300, D = 40: partial token, vocabulary and k tiles in every kernel; int32
    # targets; the shard op; every output_mask.
    h, c, t, b = make_inputs((130,), 40, 300, dtype, "cuda", bias=True, seed=9)
    (loss, lse), grads = grads_of(
        lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t.int(), a[2], softcap=4.0, label_smoothing=0.1,
                                                 z_loss=1e-3, return_lse=True, reduction="none"), [h, c, b])
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g.float()).all() for g in grads)
    ops = torch.ops.fastloss
    s_lse, s_lin = ops.linear_cross_entropy_shard(h, c[50:170], t, b[50:170], IGNORE, 4.0, 0.1, 50, 300)
    assert torch.isfinite(s_lse).all() and torch.isfinite(s_lin).all()
    g = torch.ones_like(loss)
    for mask in ([True, True, True], [False, True, False], [True, False, False], [False, False, True]):
        out = ops.linear_cross_entropy_backward(g, lse, h, c, t, b, lse, IGNORE, 4.0, 0.1, 1e-3, 1e-3, mask)
        assert all(torch.isfinite(x.float()).all() for x in out)


# --------------------------------------------------------------------------------------------
# Hugging Face causal LMs (tiny random models from configs; no downloads)

HF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 3.0,
                                                     "attn_logit_softcapping": 50.0, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 3.0,
                                                         "sliding_window": 8}),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", {"head_dim": 16, "sliding_window": 8}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # the head has a bias
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", {"head_dim": 16, "pad_token_id": 0}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": 0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
}


def tiny_causal_lm(family, vocab=600):
    transformers = pytest.importorskip("transformers")
    config_name, model_name, extra = HF_FAMILIES[family]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).float().eval()


def hf_loss_and_grads(model, **kw):
    model.zero_grad()
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_transformers_patch_matches_unpatched(family):
    import fastloss.integrations.transformers as fl_transformers

    model = tiny_causal_lm(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 600, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE
    ref_out, ref_grads = hf_loss_and_grads(model, input_ids=ids, labels=labels)
    ref_num, ref_num_grads = hf_loss_and_grads(model, input_ids=ids, labels=labels,
                                               num_items_in_batch=torch.tensor(17))
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 3.0

    assert fl_transformers.patch(model) is model
    fl_transformers.patch(model)  # idempotent
    out, grads = hf_loss_and_grads(model, input_ids=ids, labels=labels)
    assert out.logits is None  # nothing of size tokens x vocabulary
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Trainer's num_items_in_batch: a sum divided by the count.
    out_num, grads_num = hf_loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(17))
    torch.testing.assert_close(out_num.loss, ref_num.loss, rtol=1e-5, atol=1e-6)
    for name in grads_num:
        torch.testing.assert_close(grads_num[name], ref_num_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Without labels the model is unchanged (logits returned).
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 12, 600)


def test_transformers_patch_return_dict_and_logits_to_keep():
    import fastloss.integrations.transformers as fl_transformers

    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(2))
    ref_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    ref_keep = model(input_ids=ids, labels=ids[:, -4:], logits_to_keep=4).loss
    fl_transformers.patch(model)
    out = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref_tuple[0], rtol=1e-5, atol=1e-6)
    # The logits keep their place (None, not computed): out[1] is not the cache.
    assert len(out) == len(ref_tuple) and out[1] is None and type(out[2]) is type(ref_tuple[2])
    keep = model(input_ids=ids, labels=ids[:, -4:], logits_to_keep=4).loss
    torch.testing.assert_close(keep, ref_keep, rtol=1e-5, atol=1e-6)
    # Evaluation (no autograd) keeps transformers' behaviour: logits for the metrics.
    with torch.no_grad():
        ev = model(input_ids=ids, labels=ids)
    assert ev.logits is not None and ev.logits.shape == (2, 12, 600)
    torch.testing.assert_close(ev.loss, ref_tuple[0].detach(), rtol=1e-5, atol=1e-6)
    # A head with hooks (LoRA, FSDP, tensor parallel wrap it) runs as a module, unchanged.
    scaled = model.lm_head.register_forward_hook(lambda mod, inp, out: out * 2)
    hooked = model(input_ids=ids, labels=ids)
    assert hooked.logits is not None
    scaled.remove()


def test_transformers_patch_passes_arguments_as_given():
    """Positional arguments keep their meaning, the cache goes in and out under the name the
    installed transformers uses, and the patch passes no argument the caller did not (5.25
    warns when the deprecated `past_key_values` is passed, even as None)."""
    import dataclasses
    import warnings

    pytest.importorskip("transformers")
    import fastloss.integrations.transformers as fl_transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ref = model(ids, mask, labels=ids, use_cache=True)
    fl_transformers.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(ids, mask, labels=ids, use_cache=True)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    cache_field = "cache" if "cache" in fields else "past_key_values"
    assert getattr(out, cache_field) is not None
    assert getattr(out, cache_field).get_seq_length() == getattr(ref, cache_field).get_seq_length() == 12


def test_transformers_patch_keeps_the_forward_signature():
    """transformers reads the forward's parameter names: generate() builds the attention mask of
    left-padded input and passes logits_to_keep=1 (one position through the head at the prefill)
    only where the forward names them."""
    import inspect

    import fastloss.integrations.transformers as fl_transformers

    model = tiny_causal_lm("llama")
    ids = torch.randint(1, 600, (2, 10), generator=torch.Generator().manual_seed(8))
    ids[1, :4] = 0  # left padding, no attention mask given
    head_inputs = []
    model.lm_head.register_forward_pre_hook(lambda mod, args: head_inputs.append(tuple(args[0].shape)))
    ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref_heads, head_inputs[:] = list(head_inputs), []
    expected = inspect.signature(model.forward)
    fl_transformers.patch(model)
    assert inspect.signature(model.forward) == expected
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), ref)
    assert head_inputs == ref_heads and head_inputs[0] == (2, 1, 32)


def test_transformers_patch_compiles_fullgraph():
    import fastloss.integrations.transformers as fl_transformers

    model = tiny_causal_lm("llama").train()
    ids = torch.randint(0, 600, (2, 12), generator=torch.Generator().manual_seed(9))
    ref, ref_grads = hf_loss_and_grads(model, input_ids=ids, labels=ids)
    fl_transformers.patch(model)
    step = torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    loss = step(ids, ids)
    loss.backward()
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_transformers_patch_uses_fastloss(monkeypatch):
    import fastloss.integrations.transformers as fl_transformers

    model = tiny_causal_lm("llama")
    calls = []
    real = fl_transformers.linear_cross_entropy
    monkeypatch.setattr(fl_transformers, "linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    fl_transformers.patch(model)
    ids = torch.randint(0, 600, (1, 8))
    model(input_ids=ids, labels=ids)
    assert len(calls) == 1


def test_transformers_patch_logits_to_keep_tensors():
    """Every form of logits_to_keep the installed transformers accepts: 1-D positions, and
    (where it has slice_logits_to_keep) per-sequence positions and a boolean mask whose kept
    positions are flattened (packed sequences; labels or shift_labels of the kept length)."""
    import fastloss.integrations.transformers as fl_transformers
    transformers = pytest.importorskip("transformers")

    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 600, (2, 12), generator=g)
    calls = [dict(logits_to_keep=torch.tensor([1, 4, 7, 8]), labels=ids[:, [1, 4, 7, 8]])]
    if hasattr(transformers.modeling_utils, "slice_logits_to_keep"):
        positions = torch.tensor([[1, 4, 7], [0, 2, 9]])
        mask = torch.rand(2, 12, generator=g) < 0.5
        kept = ids[mask]
        calls += [dict(logits_to_keep=positions, labels=torch.take_along_dim(ids, positions, 1)),
                  dict(logits_to_keep=mask, labels=kept),
                  dict(logits_to_keep=mask, labels=kept, shift_labels=kept.roll(-1))]
    refs = [hf_loss_and_grads(model, input_ids=ids, **kw) for kw in calls]
    fl_transformers.patch(model)
    for kw, (ref, ref_grads) in zip(calls, refs):
        out, grads = hf_loss_and_grads(model, input_ids=ids, **kw)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_transformers_patch_keeps_what_it_does_not_reproduce():
    """A softcap key in a config whose model ignores it is ignored; a head whose instance forward
    was replaced (as accelerate's hooks do) and a user-assigned loss_function run unchanged."""
    import types

    import fastloss.integrations.transformers as fl_transformers
    transformers = pytest.importorskip("transformers")

    config = transformers.LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits far beyond the cap: a softcap would show
    ids = torch.randint(0, 600, (2, 10), generator=torch.Generator().manual_seed(7))
    ref = model(input_ids=ids, labels=ids).loss
    fl_transformers.patch(model)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)

    plain = model.lm_head.forward
    model.lm_head.forward = types.MethodType(lambda self, x: plain(x) * 0.5, model.lm_head)
    doubled = model(input_ids=ids, labels=ids)
    assert doubled.logits is not None and not torch.allclose(doubled.loss, ref)
    del model.lm_head.forward

    if hasattr(type(model), "loss_function"):
        model.loss_function = lambda logits, labels, vocab_size, **kw: torch.zeros((), requires_grad=True)
        custom = model(input_ids=ids, labels=ids)
        assert custom.logits is not None and custom.loss.item() == 0.0


# --------------------------------------------------------------------------------------------
# Vocabulary parallelism: 2 processes, gloo, against the single-process result


def _vocab_parallel_worker(rank, world, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _vocab_parallel_checks(rank)
    finally:
        dist.destroy_process_group()
    # Passed: leave without interpreter finalization. A gloo worker thread still alive then (the
    # group outlives destroy_process_group while anything references it) can release a finished
    # collective's tensors during finalization, where taking the GIL ends the thread inside a
    # destructor: std::terminate, SIGABRT, a failed test (1 run in 5 here).
    os._exit(0)


def _vocab_parallel_checks(rank):
    import torch.distributed as dist

    torch.set_num_threads(1)
    split = [250, 350]  # unequal slices; the second crosses a vocabulary block
    start = sum(split[:rank])
    for options in ({"reduction": "mean"},
                    {"reduction": "none", "softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-2,
                     "return_lse": True}):
        h, c, t, b = make_inputs((3, 9), 16, sum(split), torch.float64, "cpu", bias=True, seed=4)
        t[0, 0], t[0, 1] = 3, split[0] + 3  # a target in each shard
        (loss, grads) = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], filter_eps=None,
                                                                          **options), [h, c, b])
        c_local, b_local = c[start:start + split[rank]], b[start:start + split[rank]]
        (loss_p, grads_p) = grads_of(
            lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], filter_eps=None,
                                                     process_group=dist.group.WORLD, **options),
            [h, c_local, b_local])
        for a, r in zip(loss_p if isinstance(loss_p, tuple) else (loss_p,), loss if isinstance(loss, tuple)
                        else (loss,)):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
        dh, dc, db = grads
        torch.testing.assert_close(grads_p[0], dh, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grads_p[1], dc[start:start + split[rank]], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grads_p[2], db[start:start + split[rank]], rtol=1e-12, atol=1e-13)
    # bfloat16 (the bfloat16 products on CPUs with AVX512-BF16): the shards combine to the
    # single-process result up to float32 sums and the final bfloat16 rounding.
    h16, c16, t16, b16 = make_inputs((3, 9), 16, sum(split), torch.bfloat16, "cpu", bias=True, seed=5)
    lce16 = lambda *a, **kw: fastloss.linear_cross_entropy(a[0], a[1], t16, a[2], filter_eps=None, **kw)  # noqa: E731
    (loss16, grads16) = grads_of(lce16, [h16, c16, b16])
    own = slice(start, start + split[rank])
    (loss16_p, grads16_p) = grads_of(lambda *a: lce16(*a, process_group=dist.group.WORLD), [h16, c16[own], b16[own]])
    torch.testing.assert_close(loss16_p, loss16, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads16_p, (grads16[0], grads16[1][own], grads16[2][own])):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-5)
    # A first derivative with create_graph=True works; a second one raises (the all-reduce of
    # the hidden gradient is not differentiable).
    leaf = h.clone().requires_grad_()
    loss_p = fastloss.linear_cross_entropy(leaf, c_local, t, b_local, filter_eps=None, process_group=dist.group.WORLD)
    (g,) = torch.autograd.grad(loss_p, leaf, create_graph=True)
    torch.testing.assert_close(g, torch.autograd.grad(fastloss.linear_cross_entropy(leaf, c, t, b, filter_eps=None),
                                                      leaf)[0], rtol=1e-12, atol=1e-13)
    with pytest.raises(NotImplementedError, match="process_group"):
        torch.autograd.grad(g.sum(), leaf)
    # A batched backward runs the all-reduce under vmap, which has no rule for it: an error that
    # names the op (torch's named neither it nor the process group).
    loss_p = fastloss.linear_cross_entropy(leaf, c_local, t, b_local, reduction="none", filter_eps=None,
                                           process_group=dist.group.WORLD)
    with pytest.raises(NotImplementedError, match="fastloss.linear_cross_entropy: batched backward"):
        torch.autograd.grad(loss_p, leaf, torch.ones((2,) + loss_p.shape, dtype=loss_p.dtype), is_grads_batched=True)
    # Heads split differently over one group, one after another (a rank's own slice size
    # recurs with other splits), and an empty slice on a rank.
    for split in ([15, 22], [10, 30], [15, 30], [0, 37], [37, 0]):
        h, c, t, b = make_inputs((2, 5), 8, sum(split), torch.float64, "cpu", bias=True, seed=sum(split))
        start, size = sum(split[:rank]), split[rank]
        options = {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3, "filter_eps": None}
        (loss, grads) = grads_of(lambda *a: fastloss.linear_cross_entropy(a[0], a[1], t, a[2], **options), [h, c, b])
        (loss_p, grads_p) = grads_of(lambda *a: fastloss.linear_cross_entropy(
            a[0], a[1], t, a[2], process_group=dist.group.WORLD, **options), [h, c[start:start + size],
                                                                             b[start:start + size]])
        torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grads_p[0], grads[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grads_p[1], grads[1][start:start + size], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(grads_p[2], grads[2][start:start + size], rtol=1e-12, atol=1e-13)
    # A rank whose arguments its own checks refuse raises that error, and the others raise too
    # rather than wait for it in the next all-reduce.
    bad = [((c[:20, :5], b[:20]), "'classifier'"), ((c[:20], b[:19]), "'bias' must have shape"),
           ((c[:20].float(), None), "'classifier' must have the dtype of 'hidden'"),
           ((c[0, 0], None), r"'classifier' must be \(V, D\)")]
    for (c_, b_), message in bad:
        if rank == 0:
            with pytest.raises(RuntimeError, match=r"1 other rank\(s\) of the process group refused"):
                fastloss.linear_cross_entropy(h, c[20:], t, b[20:], process_group=dist.group.WORLD)
        else:
            with pytest.raises(RuntimeError, match=message):
                fastloss.linear_cross_entropy(h, c_, t, b_, process_group=dist.group.WORLD)
    # The wrapper's own refusals (before the op's first all-reduce) reach the other ranks too.
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"1 other rank\(s\) of the process group refused"):
            fastloss.linear_cross_entropy(h, c[20:], t, process_group=dist.group.WORLD)
    else:
        with pytest.raises(ValueError, match="'targets' must have hidden's leading shape"):
            fastloss.linear_cross_entropy(h, c[:20], t[:, 1:], process_group=dist.group.WORLD)
    # Ranks that disagree on what must match (tokens, dtype, options) all raise: a different token
    # count crashed gloo in a later all-reduce, different options mixed them into one loss.
    for other in ({"h": h[:, 1:], "t": t[:, 1:]}, {"h": h.float(), "c": c.float()}, {"label_smoothing": 0.1},
                  {"reduction": "sum"}, {"ignore_index": 3}):
        h_, c_, t_ = other.get("h", h), other.get("c", c), other.get("t", t)
        options = {k: v for k, v in other.items() if k not in ("h", "c", "t")}
        with pytest.raises(RuntimeError, match="disagree on arguments that must match"):
            if rank == 0:
                fastloss.linear_cross_entropy(h, c[20:], t, process_group=dist.group.WORLD)
            else:
                fastloss.linear_cross_entropy(h_, c_[:20], t_, process_group=dist.group.WORLD, **options)
    # Ranks given different targets (each a valid token) all raise: their losses would pair one
    # token's target logit with another token's normalizer. One changed target is enough, also
    # with shift=True (the shifted targets are compared) and int32 targets.
    for shift, dtype in ((False, torch.int64), (True, torch.int32)):
        t_rank = t.to(dtype, copy=True)
        if rank == 1:
            t_rank[1, 4] = (t_rank[1, 4] + 1) % 37
        with pytest.raises(RuntimeError, match="hold different target values"):
            fastloss.linear_cross_entropy(h, c[20:] if rank == 0 else c[:20], t_rank, shift=shift,
                                          process_group=dist.group.WORLD)
    # A target beyond the vocabulary raises on every rank, the one with an empty slice too.
    t[0, 0] = 37
    with pytest.raises(IndexError, match=r"must be in \[0, 37\)"):
        fastloss.linear_cross_entropy(h, c[:37] if rank else c[:0], t, process_group=dist.group.WORLD)


def test_vocab_parallel_gloo_two_processes(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


# --------------------------------------------------------------------------------------------
# Memory: the logits are never materialized

_RSS_SCRIPT = r"""
import sys, torch, fastloss
torch.set_num_threads(1)
n, v, d = 4096, 32768, 8
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g).requires_grad_()
c = torch.randn(v, d, generator=g).requires_grad_()
t = torch.randint(0, v, (n,), generator=g)
fastloss.linear_cross_entropy(h[:4], c[:600], t[:4] % 600).backward()  # load and warm up
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS restarts from the current RSS
base = status("VmRSS:")
loss, lse = fastloss.linear_cross_entropy(h, c, t, softcap=10.0, return_lse=True, reduction="none")
(loss.sum() + lse.sum()).backward()
print(status("VmHWM:") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_far_below_the_logits():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    logits = 4096 * 32768 * 4  # 512 MiB
    gradients = (4096 + 32768) * 8 * 4
    # Gradients, one tile buffer and per-token statistics; well under a tenth of the logits.
    assert extra < logits / 10, f"peak extra RSS {extra / 2**20:.1f} MiB (gradients {gradients / 2**20:.1f} MiB)"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_second_derivatives_and_forward_mode_match_torch(name, reduction, monkeypatch):
    # Hessian-vector products by double backward (eager) and by forward over reverse, and
    # directional derivatives by forward mode, against the eager formula in float64. Vocabulary
    # blocks of a few entries, so that several are merged.
    monkeypatch.setattr(lce_derivatives, "_BLOCK_ENTRIES", 40)
    options = dict(OPTIONS[name])
    h, c, t, b = make_inputs((2, 5), 6, 37, torch.float64, "cpu", bias=options.pop("bias", False), seed=3)
    weight = torch.randn(t.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    lse_weight = torch.randn(t.shape, dtype=torch.float64)

    def loss(fn):
        def objective(*a):
            out = fn(a[0], a[1], t, a[2] if len(a) > 2 else None, reduction=reduction, **options)
            if not isinstance(out, tuple):
                return (out * weight).sum()
            # return_lse: the LSE's gradient flows into the second derivative too.
            return (out[0] * weight).sum() + (out[1] * lse_weight).sum() + 0.1 * out[1].square().sum()
        return objective

    ours, ref = loss(fastloss.linear_cross_entropy), loss(reference)
    args = (h, c) if b is None else (h, c, b)
    argnums = tuple(range(len(args)))
    direction = tuple(torch.randn_like(a) for a in args)
    expected = torch.func.jvp(torch.func.grad(ref, argnums=argnums), args, direction)[1]
    forward_over_reverse = torch.func.jvp(torch.func.grad(ours, argnums=argnums), args, direction)[1]
    leaves = [a.clone().requires_grad_() for a in args]
    first = torch.autograd.grad(ours(*leaves), leaves, create_graph=True)
    reverse_over_reverse = torch.autograd.grad(first, leaves, grad_outputs=direction)
    for got in (forward_over_reverse, reverse_over_reverse):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    tangent = torch.func.jvp(ref, args, direction)[1]
    torch.testing.assert_close(torch.func.jvp(ours, args, direction)[1], tangent, rtol=1e-10, atol=1e-12)
    with fwAD.dual_level():
        dual = ours(*(fwAD.make_dual(a, d) for a, d in zip(args, direction)))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, tangent, rtol=1e-10, atol=1e-12)
    if name == "everything":
        torch.testing.assert_close(torch.func.hessian(ours, argnums=1)(*args),
                                   torch.func.hessian(ref, argnums=1)(*args), rtol=1e-10, atol=1e-12)


def test_hessian_vector_products_in_bfloat16(monkeypatch):
    # Computed in float32 from bfloat16 operands, and summed over the vocabulary blocks in
    # float32 (75 blocks here; a bfloat16 sum of the d hidden parts was 5x further off).
    monkeypatch.setattr(lce_derivatives, "_BLOCK_ENTRIES", 24 * 4)
    h, c, t, b = make_inputs((4, 6), 16, 300, torch.float64, "cpu", bias=True, seed=8)
    direction = tuple(torch.randn_like(a) for a in (h, c, b))

    def hvp(fn, dtype):
        args = tuple(a.to(dtype).requires_grad_() for a in (h, c, b))
        first = torch.autograd.grad(fn(*args, t, softcap=5.0), args, create_graph=True)
        return torch.autograd.grad(first, args, grad_outputs=tuple(d.to(dtype) for d in direction))

    ours = hvp(lambda h_, c_, b_, t_, **kw: fastloss.linear_cross_entropy(h_, c_, t_, b_, **kw), torch.bfloat16)
    expected = hvp(lambda h_, c_, b_, t_, **kw: reference(h_, c_, t_, b_, **kw), torch.float64)
    for got, e in zip(ours, expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), e, rtol=0, atol=1e-2 * e.abs().max().item())


def test_forward_mode_through_the_output_gradient():
    # autograd.grad(loss, h, grad_outputs=dual): the tangent of the gradient (a Hessian-vector
    # product in the output gradient's direction) used to be dropped silently.
    h, c, t, b = make_inputs((5,), 6, 40, torch.float64, "cpu", bias=True, seed=2)
    direction = torch.randn(5, dtype=torch.float64)

    def tangent_of_gradient(fn):
        leaf = h.clone().requires_grad_()
        out = fn(leaf, c, t, b, reduction="none", softcap=3.0)
        with fwAD.dual_level():
            (g,) = torch.autograd.grad(out, leaf, grad_outputs=fwAD.make_dual(torch.ones(5, dtype=torch.float64),
                                                                               direction))
            return fwAD.unpack_dual(g).tangent

    got = tangent_of_gradient(fastloss.linear_cross_entropy)
    assert got is not None
    torch.testing.assert_close(got, tangent_of_gradient(reference), rtol=1e-10, atol=1e-12)



def test_third_derivatives_match_torch(monkeypatch):
    # The second derivatives are torch ops on the saved tensors, so autograd and torch.func go
    # one order further through them.
    monkeypatch.setattr(lce_derivatives, "_BLOCK_ENTRIES", 6)
    h, c, t, _ = make_inputs((3,), 2, 5, torch.float64, "cpu", seed=6, ignore_frac=0.0)
    t[2] = IGNORE
    kw = dict(softcap=3.0, label_smoothing=0.1, z_loss=0.01, reduction="sum")
    ours = lambda a: fastloss.linear_cross_entropy(a, c, t, **kw)  # noqa: E731
    ref = lambda a: reference(a, c, t, **kw)  # noqa: E731
    expected = torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(ref)))(h)
    for transform in (lambda f: torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(f))),
                      lambda f: torch.func.jacrev(torch.func.hessian(f))):
        torch.testing.assert_close(transform(ours)(h), expected, rtol=1e-10, atol=1e-13)


def test_output_gradient_tangent_is_not_filtered():
    # autograd.grad(loss, grad_outputs=dual(v, d)): the gradient's tangent is the backward of d,
    # unfiltered (a filtered backward is not linear in the output gradient, and the
    # forward-mode rules do not filter); the gradient itself is filtered as usual.
    # V = 1100 with every target below 512: the CPU's later 512-column blocks hold no target
    # and only probabilities ~1e-3, below filter_eps, so the filter skips them.
    gen = torch.Generator().manual_seed(7)
    h = (0.1 * torch.randn(6, 8, generator=gen)).requires_grad_()
    c = torch.randn(1100, 8, generator=gen, requires_grad=True)
    t = torch.randint(0, 512, (6,), generator=gen)
    v, d = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    loss = fastloss.linear_cross_entropy(h, c, t, reduction="none", filter_eps=0.05)
    filtered = torch.autograd.grad(loss, [h, c], grad_outputs=v, retain_graph=True)
    exact = fastloss.linear_cross_entropy(h, c, t, reduction="none", filter_eps=None)
    expected = torch.autograd.grad(exact, [h, c], grad_outputs=d, retain_graph=True)
    with fwAD.dual_level():
        grads = torch.autograd.grad(loss, [h, c], grad_outputs=fwAD.make_dual(v, d))
        for g, f, e in zip(grads, filtered, expected):
            primal, tangent = fwAD.unpack_dual(g)
            torch.testing.assert_close(primal, f, rtol=0, atol=0)
            torch.testing.assert_close(tangent, e, rtol=1e-5, atol=1e-6)
    # the filter did drop something here, so the check above can tell the two apart
    assert not torch.allclose(filtered[1], torch.autograd.grad(exact, [c], grad_outputs=v)[0], rtol=0, atol=1e-7)


def test_paths_of_cpus_without_avx512():
    # The float32 row kernels of the vocabulary blocks (forward statistics, logit gradients)
    # have an AVX-512 form and portable lanes: this file's tests again on the lanes.
    rerun_without_avx512(__file__, "paths_of_cpus_without_avx512")
