"""Two-pass softmax / log-softmax against torch in float64, on fresh random inputs."""

import math

import numpy as np
import pytest
import torch

import fastloss
from conftest import CUDA, ran_in_place, rerun_without_avx512

OPS = [
    pytest.param(fastloss.softmax, torch.softmax, id="softmax"),
    pytest.param(fastloss.log_softmax, torch.log_softmax, id="log_softmax"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def reference(ref_fn, x, dim):
    """softmax / log_softmax in extended precision (numpy longdouble), as float64."""
    xs = x.detach().double().cpu().numpy().astype(np.longdouble)
    shifted = xs - xs.max(axis=dim, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=dim, keepdims=True))
    out = shifted - log_sum if ref_fn is torch.log_softmax else np.exp(shifted - log_sum)
    return torch.from_numpy(out.astype(np.float64)).to(x.device)


def torch_error(ref_fn, x, dim, out_dtype=None):
    """torch's own max error at x's precision: the yardstick for our tolerance."""
    ref = reference(ref_fn, x, dim)
    ours_torch = ref_fn(x, dim, dtype=out_dtype) if out_dtype else ref_fn(x, dim)
    return (ours_torch.double() - ref).abs().max().item()


def assert_close_to_reference(fn, ref_fn, x, dim, out_dtype=None):
    y = fn(x, dim, dtype=out_dtype) if out_dtype else fn(x, dim)
    expected_dtype = out_dtype or x.dtype
    assert y.dtype == expected_dtype and y.shape == x.shape and y.device == x.device
    ref = reference(ref_fn, x, dim)
    err = (y.double() - ref).abs().max().item()
    # Within 2x torch's own error at this precision, plus a few ulps of the output scale:
    # fp32 accumulation rounds differently from torch but is not less accurate.
    eps = torch.finfo(expected_dtype).eps
    scale = max(1.0, ref.abs().max().item()) if fn is fastloss.log_softmax else 1.0
    tol = 2 * torch_error(ref_fn, x, dim, out_dtype) + 4 * eps * scale
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e}"


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("cols", [1, 7, 1000, 4096, 131072])
@pytest.mark.parametrize("dtype", DTYPES)
def test_last_dim(device, fn, ref_fn, cols, dtype):
    rows = 3 if cols == 131072 else 17
    x = (torch.randn(rows, cols, dtype=torch.float64, device=device) * 4).to(dtype)
    assert_close_to_reference(fn, ref_fn, x, -1)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dim", [0, 1, 2, -2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_other_dims(device, fn, ref_fn, dim, dtype):
    x = (torch.randn(5, 37, 70, dtype=torch.float64, device=device) * 3).to(dtype)
    assert_close_to_reference(fn, ref_fn, x, dim)


@pytest.mark.parametrize("fn,ref_fn", OPS)
def test_long_strided_rows(device, fn, ref_fn):
    x = torch.randn(2, 40000, 3, device=device) * 5
    assert_close_to_reference(fn, ref_fn, x, 1)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dim", [-1, 0])
def test_non_contiguous(device, fn, ref_fn, dim):
    base = torch.randn(64, 300, device=device) * 3
    for x in (base.t(), base[:, ::3], base[::2, 5:200]):
        assert not x.is_contiguous()
        assert_close_to_reference(fn, ref_fn, x, dim)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_to_float(device, fn, ref_fn, dtype):
    x = (torch.randn(9, 3001, device=device) * 4).to(dtype)
    assert_close_to_reference(fn, ref_fn, x, -1, out_dtype=torch.float32)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_output_dtype_as_torch(device, fn, ref_fn, dtype):
    # Under CUDA autocast torch computes softmax / log_softmax in float32 (half in, float32
    # out, half gradient); CPU autocast leaves them alone.
    x = torch.randn(4, 300, device=device, dtype=dtype, requires_grad=True)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        got, expected = fn(x, -1), ref_fn(x, -1)
        explicit = fn(x, -1, dtype=dtype)  # an explicit dtype is respected, as torch's
    assert got.dtype == expected.dtype
    assert explicit.dtype == dtype
    eps = torch.finfo(got.dtype).eps  # one rounding of the output apart
    torch.testing.assert_close(got, expected, rtol=2 * eps, atol=2 * eps)
    (g,) = torch.autograd.grad(got[:, :5].float().sum(), x)
    (g_ref,) = torch.autograd.grad(expected[:, :5].float().sum(), x)
    assert g.dtype == g_ref.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(g, g_ref, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("fn,ref_fn", OPS)
def test_dtype_argument_casts_first(device, fn, ref_fn):
    x = torch.randn(4, 50, device=device)
    torch.testing.assert_close(fn(x, -1, dtype=torch.float64), ref_fn(x, -1, dtype=torch.float64))
    torch.testing.assert_close(fn(x, 0, dtype=torch.bfloat16), ref_fn(x, 0, dtype=torch.bfloat16))
    xi = torch.randint(-5, 5, (3, 8), device=device)
    torch.testing.assert_close(fn(xi, -1, dtype=torch.float32), ref_fn(xi, -1, dtype=torch.float32))


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e6, 1e30])
def test_large_magnitudes(device, fn, ref_fn, scale):
    # No max pass: the pairs must not overflow however large the logits are.
    x = torch.randn(8, 513, dtype=torch.float64, device=device) * scale
    for dtype in (torch.float32, torch.float64):
        y = fn(x.to(dtype), -1)
        assert torch.isfinite(y[y != -math.inf]).all()
        torch.testing.assert_close(y.double(), ref_fn(x.to(dtype).double(), -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_entries_next_to_very_negative_maxima(device, fn, ref_fn, dtype):
    # -inf entries are clamped from below before the reduction; a row whose maximum lies just
    # above the clamp (the lowest maximum the paired path takes: -1.45e6 in float, -7.6e11 in
    # double) must still see them as 0. Short rows of such values also cover the CUDA warp
    # path's -inf padding lanes.
    low = -1453633.0 if dtype == torch.float32 else -762123384780.0
    inf = math.inf
    rows = [
        [low, -inf],
        [low, low + 30.0] + [-inf] * 40,
        [low, low, low],
        [low + 1.0, low, -inf, low + 2.0, -inf, low, low],
    ]
    for row in rows:
        x = torch.tensor(row, dtype=dtype, device=device)
        y = fn(x, -1)
        expected = ref_fn(x.double(), -1)
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(torch.isinf(y), torch.isinf(expected))


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [3, 1000])
def test_special_values(device, fn, ref_fn, dtype, cols):
    inf, nan = math.inf, math.nan
    x = torch.randn(6, cols, device=device).to(dtype)
    x[0, 0] = -inf            # masked entry: 0 / -inf
    x[1, :] = -inf            # all -inf: NaN row
    x[2, 1] = inf             # +inf: NaN row
    x[3, 2 % cols] = nan      # NaN: NaN row
    x[4, :] = 0               # constant row: uniform
    x[5, 1:] = -inf           # one finite entry: one-hot
    y = fn(x, -1)
    expected = ref_fn(x.float(), -1).to(dtype)
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=2e-2, atol=1e-3)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_columns(device, fn, ref_fn, dtype):
    # Along a non-last dim, columns of up to 32 entries keep their pairs on the CPU (a block of
    # lanes at a time: 70 columns end in a partial block); special values take the exact path.
    inf, nan = math.inf, math.nan
    for size in (2, 3, 5, 17, 31, 32, 33):
        x = (torch.randn(3, size, 70, dtype=torch.float64, device=device) * 4).to(dtype)
        assert_close_to_reference(fn, ref_fn, x, 1)
        tol = 2 * torch_error(ref_fn, x, 1) + 4 * torch.finfo(dtype).eps * (16 if fn is fastloss.log_softmax else 1)
        x[0, 1, 3] = nan
        x[0, :, 4] = -inf
        x[1, 0, 5] = inf
        x[1, size - 1, 69] = -inf
        x[2, :, 6] = -1e4  # all clamped below float32's reach of the pairs: the exact path
        x[2, 0, 7] = 1e4 if dtype != torch.float16 else 6e4
        y = fn(x, 1)
        expected = ref_fn(x.double(), 1)
        assert torch.equal(torch.isnan(y), torch.isnan(expected)), size
        assert torch.equal(torch.isinf(y), torch.isinf(expected)), size
        finite = ~torch.isnan(expected)  # (log-softmax near -1e4: a few ulps of that)
        torch.testing.assert_close(y.double()[finite], expected[finite], rtol=4 * torch.finfo(dtype).eps, atol=tol)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_rows(device, fn, ref_fn, dtype):
    # Rows of up to 256 bytes of the accumulation type are held in registers on the CPU, padded
    # to a power of two, and log-softmax takes their logs 16 rows at a time: every width up to
    # 65 (each padding, and the first width past the path), 37 rows (a partial batch), with
    # rows of the exact path in the middle of a batch; with AVX-512, rows of whole vectors up
    # to 512 bytes (80 to 128 float, 40 to 64 double) and softmax float rows of up to 256 (past
    # 64 padded to whole vectors: 100, 111, 127, 129, 150, 200, 241, 255), with widths between
    # them. Float and double log-softmax rows of up to 1 KiB past those go 16 at a time (the
    # chunked pass; float widths 127 and 255, double 127, with more than half a set of lanes
    # past the whole ones). Without AVX-512, float rows of up to 128 go eight at a time, one
    # per lane: 37 rows end in a partial block.
    inf, nan = math.inf, math.nan
    for cols in list(range(2, 66)) + [72, 80, 96, 100, 111, 112, 127, 128, 129, 150, 200, 241, 255, 256, 257]:
        x = (torch.randn(37, cols, dtype=torch.float64, device=device) * 4).to(dtype)
        assert_close_to_reference(fn, ref_fn, x, -1)
        scale = 16 if fn is fastloss.log_softmax else 1
        tol = 2 * torch_error(ref_fn, x, -1) + 4 * torch.finfo(dtype).eps * scale
        x[18, 1] = nan
        x[19, :] = -inf
        x[20, 0] = inf
        x[21, cols - 1] = -inf
        y = fn(x, -1)
        expected = ref_fn(x.double(), -1)
        assert torch.equal(torch.isnan(y), torch.isnan(expected)), cols
        assert torch.equal(torch.isinf(y), torch.isinf(expected)), cols
        finite = torch.ones(37, dtype=torch.bool, device=device)
        finite[18:21] = False
        torch.testing.assert_close(y[finite].double(), expected[finite], rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [3, 5, 8, 13, 65, 100, 200])
def test_short_rows_do_not_depend_on_the_split(dtype, cols):
    # On the CPU, short rows are stored as whole vectors that spill into the following rows of
    # the same call (100, 200: the last vector past the row); the last rows of each thread's
    # range, of each prefault chunk and of each staging block are masked. Forward rows that go
    # one per lane (without AVX-512) go eight at a time, the last block of a range partly
    # empty. Rows are independent, so every split of the rows must give the bits of a
    # single-thread run.
    rows = 200003 if cols <= 65 else 40009
    x = (torch.randn(rows, cols) * 4).to(dtype)
    g = torch.randn(rows, cols).to(dtype)
    ops = torch.ops.fastloss
    run = lambda: [
        ops.softmax(x, -1, False),
        ops.log_softmax(x, -1, False),
        ops.softmax_backward(g, torch.softmax(x.float(), -1).to(dtype), -1, dtype),
        ops.log_softmax_backward(g, torch.log_softmax(x.float(), -1).to(dtype), -1, dtype),
    ]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = run()
    finally:
        torch.set_num_threads(threads)
    for _ in range(2):
        for got, want in zip(run(), expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("cols", [24, 40, 48, 56, 64, 80, 96, 100, 112, 127, 128, 200, 241, 255])
def test_short_rows_of_large_magnitude(device, fn, ref_fn, cols):
    # Entries beyond the reducible range (|x| > ~1.4e6 in float, ~7.6e11 in double) send a row
    # to the exact path (row 5 in float, row 6 in both); the rows around it in the same batch
    # stay on the paired one.
    x = torch.randn(20, cols, dtype=torch.float64, device=device) * 3
    x[5] *= 1e7
    x[6] = x[6] * 1e3 + 1e30
    # and within the reducible range, the largest entry in the last vector: a maximum that
    # missed a vector would overflow the exponentials
    x[7] *= 1e4
    x[8, cols - 1] = 1e3
    x[9, (cols // 2) // 16 * 16] = 1e3  # in a middle vector (of an odd count: 80, 112)
    for dtype in (torch.float32, torch.float64):
        y = fn(x.to(dtype), -1)
        torch.testing.assert_close(y.double(), ref_fn(x.to(dtype).double(), -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn,ref_fn", OPS)
def test_special_values_other_dim(device, fn, ref_fn):
    x = torch.randn(40, 20, device=device)
    x[:, 0] = -math.inf
    x[3, 1] = math.nan
    x[:, 2] = -1e9
    y = fn(x, 0)
    torch.testing.assert_close(y, ref_fn(x, 0), equal_nan=True)


@pytest.mark.parametrize("fn,ref_fn", OPS)
def test_empty_and_scalar(device, fn, ref_fn):
    for shape, dim in [((0, 5), -1), ((5, 0), -1), ((5, 0), 0), ((2, 0, 3), 2)]:
        x = torch.randn(shape, device=device)
        y = fn(x, dim)
        assert y.shape == x.shape and y.numel() == 0
    x = torch.tensor(2.5, device=device)
    torch.testing.assert_close(fn(x, 0), ref_fn(x, 0))
    torch.testing.assert_close(fn(x, -1), ref_fn(x, -1))


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_singleton_dim_is_exact(device, fn, ref_fn, dtype):
    # Over one entry torch gives exactly 1 (log-softmax 0), and NaN for a non-finite entry;
    # the kernels' p * (1 / p) was an ulp off for about 1 in 7 inputs (6e-8 in log-softmax).
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64).reshape(4001, 1, 1)
    x[:3, 0, 0] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    x = x.expand(4001, 1, 2).to(device, dtype)
    for dim in (-2, 1):
        assert torch.equal(fn(x, dim).isnan(), ref_fn(x, dim).isnan())
        torch.testing.assert_close(fn(x, dim), ref_fn(x, dim), rtol=0, atol=0, equal_nan=True)
    if dtype in (torch.float16, torch.bfloat16):
        y = fn(x, 1, dtype=torch.float32)
        torch.testing.assert_close(y, ref_fn(x, 1, dtype=torch.float32), rtol=0, atol=0, equal_nan=True)
    xg = x[3:].detach().clone().requires_grad_()
    g = torch.randn(xg.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    (dx,) = torch.autograd.grad(fn(xg, 1), xg, g)
    assert (dx == 0).all()


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_gradcheck(device, fn, ref_fn, dim):
    x = torch.randn(4, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim), (x,))


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dim", [-1, 0])
def test_gradgradcheck(device, fn, ref_fn, dim):
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, dim), (x,))


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [5, 8, 16, 29, 32, 47, 513, 777])
def test_backward_matches_torch(device, fn, ref_fn, dtype, cols):
    # 5 to 32: rows that the CPU's backward holds in registers (float rows up to 32; bfloat16
    # staged through float), full-width (8, 16, 32) and padded; 37 rows: the last ones are
    # read and written with masks. 47 and 513: in registers on AVX-512 and AVX2 (the 16-bit
    # types, and the float log-softmax backward up to 4096 entries), 16 and 32 lanes with a
    # masked (AVX-512) or scalar (AVX2) last set.
    x64 = torch.randn(37, cols, dtype=torch.float64, device=device) * 3
    g = torch.randn_like(x64)
    x = x64.to(dtype).requires_grad_()
    (fn(x, -1) * g.to(dtype)).sum().backward()
    xr = x64.to(dtype).double().requires_grad_()
    (ref_fn(xr, -1) * g.to(dtype).double()).sum().backward()
    xt = x64.to(dtype).requires_grad_()
    (ref_fn(xt, -1) * g.to(dtype)).sum().backward()
    torch_err = (xt.grad.double() - xr.grad).abs().max().item()
    err = (x.grad.double() - xr.grad).abs().max().item()
    assert x.grad.dtype == dtype
    # dx = g - exp(y) * sum(g) (log-softmax) rounds at the scale of |sum(g)|: allow a few ulps
    # of it on top of 2x torch's own error (our exp differs from torch's by about an ulp).
    scale = max(1.0, g.to(dtype).double().sum(-1).abs().max().item())
    assert err <= 2 * torch_err + 4 * torch.finfo(dtype).eps * scale, (err, torch_err)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 50, 129), (3, 70, 513), (2, 40, 1000), (40, 9, 300)], ids=str)
def test_backward_along_a_middle_dim_matches_torch(device, fn, ref_fn, dtype, shape):
    # The CPU's backward takes up to 4 x 32 float (4 x 16 double) adjacent columns per block,
    # narrower when blocks would be too few for the threads: full, partial and narrowed blocks.
    x64 = torch.randn(shape, dtype=torch.float64, device=device) * 3
    g = torch.randn_like(x64)
    x = x64.to(dtype).requires_grad_()
    (fn(x, 1) * g.to(dtype)).sum().backward()
    xr = x64.to(dtype).double().requires_grad_()
    (ref_fn(xr, 1) * g.to(dtype).double()).sum().backward()
    xt = x64.to(dtype).requires_grad_()
    (ref_fn(xt, 1) * g.to(dtype)).sum().backward()
    torch_err = (xt.grad.double() - xr.grad).abs().max().item()
    err = (x.grad.double() - xr.grad).abs().max().item()
    scale = max(1.0, g.to(dtype).double().sum(1).abs().max().item())
    assert err <= 2 * torch_err + 4 * torch.finfo(dtype).eps * scale, (err, torch_err)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_half_to_float(device, fn, ref_fn, dtype):
    x = (torch.randn(5, 300, device=device) * 2).to(dtype).requires_grad_()
    y = fn(x, -1, dtype=torch.float32)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xr = x.detach().double().requires_grad_()
    (ref_fn(xr, -1) * g.double()).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_backward_over_an_owned_gradient(fn, ref_fn, dtype, dim):
    # A gradient that only autograd holds (here from the multiply's backward) becomes dx: the
    # same bits as the backward into a fresh tensor. Short rows (1 to 33) also check, where the
    # CPU has AVX-512 (the register kernels run only there), that whole-vector stores do not
    # spill into the next rows' gradients before they are read.
    for cols in [1, 2, 7, 16, 17, 24, 33, 300, 777, 2500]:  # 2500: float16 by chunks of 1024
        x64 = torch.randn(37, cols, dtype=torch.float64) * 3
        w = torch.randn(37, cols, dtype=torch.float64).to(dtype)
        x = x64.to(dtype).requires_grad_()
        assert ran_in_place(lambda: (fn(x, dim) * w).sum().backward()), cols
        xh = x64.to(dtype).requires_grad_()
        (dx_held,) = torch.autograd.grad(fn(xh, dim), xh, w.clone())
        assert torch.equal(x.grad, dx_held), cols
        xr = x64.to(dtype).double().requires_grad_()
        (dx_ref,) = torch.autograd.grad(ref_fn(xr, dim), xr, w.double())
        tol = 8 * torch.finfo(dtype).eps * max(1.0, w.double().abs().sum(dim).max().item())
        assert (x.grad.double() - dx_ref).abs().max().item() <= tol, cols


@pytest.mark.parametrize("fn,ref_fn", OPS)
def test_backward_leaves_gradients_held_elsewhere(fn, ref_fn):
    x = torch.randn(6, 40, requires_grad=True)
    w = torch.randn(6, 40)
    expected = torch.autograd.grad(ref_fn(x, -1), x, w)[0]

    # Passed by the caller.
    g = w.clone()
    assert not ran_in_place(lambda: torch.autograd.grad(fn(x, -1), x, g))
    assert torch.equal(g, w)

    # Kept by a tensor hook; by a hook on the backward node.
    kept = []
    y = fn(x, -1)
    y.register_hook(lambda grad: kept.append(grad))
    assert not ran_in_place(lambda: (y * w).sum().backward())
    y = fn(x, -1)
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: kept.append(grad_outputs[0]))
    assert not ran_in_place(lambda: (y * w).sum().backward())
    assert len(kept) == 2 and all(torch.equal(k, w) for k in kept)

    # One gradient tensor handed to two backward nodes (an addition's backward passes it on
    # to both terms): the first must leave it intact for the second.
    x.grad = None
    x2 = torch.randn(6, 40, requires_grad=True)
    ((fn(x, -1) + fn(x2, -1)) * w).sum().backward()
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(x2.grad, torch.autograd.grad(ref_fn(x2, -1), x2, w)[0])

    # create_graph: the backward stays differentiable.
    x.grad = None
    (dx,) = torch.autograd.grad((fn(x, -1) * w).sum(), x, create_graph=True)
    torch.testing.assert_close(dx, expected)
    assert dx.requires_grad

    # Owned but not contiguous (the multiply's gradient takes the strides of a transposed
    # weight), or another dtype than the input's.
    x.grad = None
    w_t = w.t().contiguous().t()
    assert not ran_in_place(lambda: (fn(x, -1) * w_t).sum().backward())
    torch.testing.assert_close(x.grad, expected)
    xb = x.detach().bfloat16().requires_grad_()
    assert not ran_in_place(lambda: (fn(xb, -1, dtype=torch.float32) * w).sum().backward())
    assert xb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_opcheck(device, op):
    fwd = getattr(torch.ops.fastloss, op)
    bwd = getattr(torch.ops.fastloss, op + "_backward")
    samples = [
        (torch.randn(3, 5, device=device, requires_grad=True), -1, False),
        (torch.randn(4, 6, 2, device=device, requires_grad=True), 1, False),
        (torch.randn(3, 5, device=device, dtype=torch.float64, requires_grad=True), 0, False),
        (torch.randn(3, 9, device=device).half().requires_grad_(), -1, True),
        (torch.randn(3, 9, device=device).bfloat16().requires_grad_(), -1, False),
    ]
    for args in samples:
        torch.library.opcheck(fwd, args)
    y = torch.randn(4, 7, device=device).softmax(-1)
    torch.library.opcheck(bwd, (torch.randn_like(y), y, -1, torch.float32))
    torch.library.opcheck(bwd, (torch.randn_like(y), y, 0, torch.bfloat16))


def test_torch_compile_fullgraph(device):
    def loss_fn(x, w):
        logits = x @ w
        return -(fastloss.log_softmax(logits, -1)[:, 0]).mean() + fastloss.softmax(logits, 0).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = torch.randn(8, 16, device=device)
    w = torch.randn(16, 32, device=device, requires_grad=True)
    expected = loss_fn(x, w)
    (g_expected,) = torch.autograd.grad(expected, w)
    got = compiled(x, w)
    (g_got,) = torch.autograd.grad(got, w)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)


@pytest.mark.parametrize("fn", [fastloss.softmax, fastloss.log_softmax])
def test_bad_input(device, fn):
    # The public argument names (the raw op's 'self' once leaked into these messages).
    with pytest.raises(TypeError, match="'input' to be a float32, float64, float16 or bfloat16.*got torch.int64"):
        fn(torch.arange(6, device=device).view(2, 3), -1)
    with pytest.raises(TypeError, match="'input'.*got torch.bool"):
        fn(torch.ones(2, 3, dtype=torch.bool, device=device), -1)
    with pytest.raises(TypeError, match="'input'.*got torch.float8_e4m3fn"):
        fn(torch.randn(2, 3, device=device).to(torch.float8_e4m3fn), -1)
    for dtype in (torch.int64, torch.float8_e5m2):
        with pytest.raises(TypeError, match="'dtype' to be float32, float64, float16, bfloat16 or None"):
            fn(torch.randn(2, 3, device=device), -1, dtype=dtype)
    for dim in (None, 1.0, True, torch.tensor(1.0), torch.tensor([1, 1]), torch.tensor(True)):
        with pytest.raises(TypeError, match="'dim'"):
            fn(torch.randn(2, 3, device=device), dim)
    # A 0-d integer tensor is an index, as for torch.softmax.
    x = torch.randn(2, 3, device=device)
    assert torch.equal(fn(x, torch.tensor(0)), fn(x, 0))
    # An integer input with a floating dtype is cast first, as torch.softmax does.
    ints = torch.arange(6, device=device).view(2, 3)
    torch.testing.assert_close(fn(ints, np.int64(-1), dtype=torch.float64), getattr(torch, fn.__name__)(ints, -1, dtype=torch.float64))
    with pytest.raises(IndexError, match="'dim' out of range"):
        fn(torch.randn(2, 3, device=device), 2)
    with pytest.raises(IndexError, match="'dim' out of range"):
        fn(torch.randn(2, 3, device=device), -3)
    with pytest.raises(TypeError, match="'input'"):
        fn([1.0, 2.0], -1)
    with pytest.raises(TypeError, match="'dtype'"):
        fn(torch.randn(2, 3, device=device), -1, dtype="float32")
    # Python's float is torch's alias for float64 (torch.softmax takes it).
    x = torch.randn(2, 3, device=device)
    torch.testing.assert_close(fn(x, -1, dtype=float), getattr(torch, fn.__name__)(x, -1, dtype=torch.float64))


def test_bad_backward_input(device):
    y = torch.randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match="'grad_output' must have the shape"):
        torch.ops.fastloss.softmax_backward(torch.randn(3, 5, device=device), y, -1, torch.float32)
    with pytest.raises(RuntimeError, match="'grad_output' must have the dtype"):
        torch.ops.fastloss.softmax_backward(y.double(), y, -1, torch.float32)
    with pytest.raises(RuntimeError, match="'input_dtype'"):
        torch.ops.fastloss.log_softmax_backward(y, y, -1, torch.float64)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.cuda
def test_device_mismatch_cuda():
    y = torch.randn(3, 4, device="cuda")
    # The CUDA kernel's own check names the argument before the shared same-device check.
    with pytest.raises(RuntimeError, match="'grad_output' to be a CUDA tensor|same device"):
        torch.ops.fastloss.softmax_backward(y.cpu(), y, -1, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize(
    "shape", [(8, 151936), (4, 300000), (2048, 40), (1, 1), (3, 33), (1000, 2049), (64, 20000), (6, 65537)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_shape_paths(fn, ref_fn, shape, dtype):
    """Every CUDA path (warp per row, row on chip, two passes, split rows), odd sizes."""
    if not CUDA:
        pytest.skip("needs CUDA")
    x = (torch.randn(*shape, dtype=torch.float64, device="cuda") * 4).to(dtype)
    assert_close_to_reference(fn, ref_fn, x, -1)
    x[0, 0] = math.inf
    y = fn(x, -1)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(3, 5), (2, 1500), (4, 70000)])
def test_cuda_memcheck(shape):
    """Small subset run under compute-sanitizer by `make gpu-check`."""
    if not CUDA:
        pytest.skip("needs CUDA")
    x = torch.randn(*shape, device="cuda", requires_grad=True)
    for fn, ref_fn in ((fastloss.softmax, torch.softmax), (fastloss.log_softmax, torch.log_softmax)):
        y = fn(x, -1)
        y.sum().backward()
        torch.testing.assert_close(y, ref_fn(x, -1))
        torch.testing.assert_close(fn(x.detach().bfloat16(), 0).float(), ref_fn(x.detach().bfloat16(), 0).float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("fn,ref_fn", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_beyond_cache(device, fn, ref_fn, dtype):
    # Rows too long to keep in cache take the recomputing two-pass path on the CPU.
    x = (torch.randn(3, 600001, dtype=torch.float64, device=device) * 4).to(dtype)
    assert_close_to_reference(fn, ref_fn, x, -1)
    x[1, 7] = -math.inf
    x[2, 100] = math.nan
    y = fn(x, -1)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[:2]).any()
    assert (y[1, 7] == (-math.inf if fn is fastloss.log_softmax else 0)).item()


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize(
    "dtype,rows,cols",
    [(torch.float16, r, c) for r, c in [(37, 5), (37, 33), (37, 47), (37, 64), (9, 65), (37, 96), (37, 99), (37, 102),
                                         (37, 112), (37, 128), (37, 150), (9, 300), (301, 300), (23, 512), (301, 512), (9, 1000),
                                         (3, 5000), (3, 32768), (2, 40000), (1, 530001)]]
    + [(torch.bfloat16, r, c) for r, c in [(37, 5), (37, 30), (37, 33), (37, 47), (37, 64), (9, 65), (37, 96), (37, 99),
                                           (37, 102), (37, 112), (37, 128), (37, 150), (9, 300), (301, 300), (23, 512),
                                           (301, 512),
                                           (9, 1000)]],
)
def test_half_types_are_the_float_kernel_rounded_once(log, dtype, rows, cols):
    # On the CPU, short rows (float16 up to 64 entries, or 256 in the log-softmax forward;
    # bfloat16 log-softmax forward up to 1024; with AVX-512 also whole vectors up to 128
    # entries, and softmax forward rows up to 256; bfloat16 backward up to 32) go
    # through float in blocks of rows (conversions, the float kernel, one rounding back);
    # forward rows of up to 128 without AVX-512 go the same
    # way (one row per lane in the float kernel);
    # longer float16 rows go through float a 1024-entry chunk at a time (300:
    # one partial chunk; 5000, 32768, 40000: several, the last partial; 530001: past the
    # cached softmax forward), longer bfloat16 rows convert
    # element by element in the kernel, and the float16 and bfloat16 backward (softmax and
    # log-softmax) of rows over 32 converts in registers on AVX-512 and AVX2 (16 or 32 lanes,
    # partial last sets at 33, 47, 65, 99, 102, 300 and 1000 entries; 300 and 512: two rows at
    # a time, one from each half of a thread's rows, odd row counts; 301 rows: a range per
    # thread).
    # Either way: the float kernel's result rounded
    # once, to the bit, for either output type.
    fwd = torch.ops.fastloss.log_softmax if log else torch.ops.fastloss.softmax
    bwd = torch.ops.fastloss.log_softmax_backward if log else torch.ops.fastloss.softmax_backward
    x = (torch.randn(rows, cols) * 5).to(dtype)
    x[0, 1] = -math.inf
    x[-1, 2] = math.nan if rows > 2 else x[-1, 2]
    g = torch.randn(rows, cols).to(dtype)
    y = fwd(x, -1, False)
    y32 = fwd(x.float(), -1, False)
    assert torch.equal(y.isnan(), y32.isnan())
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fwd(x, -1, True), y32, rtol=0, atol=0, equal_nan=True)
    dx = bwd(g, y, -1, dtype)
    dx32 = bwd(g.float(), y.float(), -1, torch.float32)
    torch.testing.assert_close(dx, dx32.to(dtype), rtol=0, atol=0, equal_nan=True)
    # float output of a half-type input: gradient in the input's type
    dxh = bwd(g.float(), y32, -1, dtype)
    torch.testing.assert_close(dxh, bwd(g.float(), y32, -1, torch.float32).to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((300, 37), 0), ((5, 1000, 3), 1), ((2, 70000, 2), 1), ((64, 33), 0),
                                       ((7, 5, 40), 1), ((32, 70), 0)])
def test_half_types_along_other_dims_are_the_float_kernel_rounded_once(log, dtype, shape, dim):
    # Along a non-last dim the CPU converts float16 / bfloat16 entry by entry in the kernels:
    # still the float kernel's result rounded once, to the bit, special values included.
    fwd = torch.ops.fastloss.log_softmax if log else torch.ops.fastloss.softmax
    bwd = torch.ops.fastloss.log_softmax_backward if log else torch.ops.fastloss.softmax_backward
    x = (torch.randn(shape) * 5).to(dtype)
    x.view(-1)[1] = -math.inf
    x.view(-1)[-1] = math.nan
    g = torch.randn(shape).to(dtype)
    y = fwd(x, dim, False)
    y32 = fwd(x.float(), dim, False)
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fwd(x, dim, True), y32, rtol=0, atol=0, equal_nan=True)
    dx = bwd(g, y, dim, dtype)
    torch.testing.assert_close(dx, bwd(g.float(), y.float(), dim, torch.float32).to(dtype), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("fn,ref_fn", OPS)
def test_large_outputs_written_chunk_by_chunk(fn, ref_fn):
    # CPU outputs above 32 MiB are fresh pages, faulted in 256 KiB chunks of rows just before
    # the rows are written; 3001 columns make the chunks end mid-way through a thread's rows.
    x = torch.randn(2801, 3001) * 3
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    y = fn(xg, -1)
    (dx,) = torch.autograd.grad(y, xg, g)
    x64 = x.double().requires_grad_()
    y64 = ref_fn(x64, -1)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    eps = torch.finfo(torch.float32).eps
    assert (y.double() - y64).abs().max().item() <= 8 * eps * max(1.0, y64.abs().max().item())
    scale = max(1.0, g.double().sum(-1).abs().max().item())
    assert (dx.double() - dx64).abs().max().item() <= 8 * eps * scale * max(1.0, dx64.abs().max().item())


@pytest.mark.parametrize("dtype,low", [(torch.float32, -100.0), (torch.float64, -720.0)])
def test_probabilities_below_the_smallest_normal_are_zero(device, dtype, low):
    # Documented: such probabilities come out as 0 (torch keeps subnormals); the log-softmax
    # of the same entry is exact.
    x = torch.tensor([[0.0, low]], dtype=dtype, device=device)
    assert torch.softmax(x, -1)[0, 1].item() > 0
    assert fastloss.softmax(x, -1)[0, 1].item() == 0
    torch.testing.assert_close(fastloss.log_softmax(x, -1), torch.log_softmax(x, -1))


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 2e6), (torch.float64, 1e12)])
def test_exact_path_long_rows_accurate(dtype, offset):
    # Entries beyond the fast path's range take the max-subtracting path; its row sum is
    # compensated, so long rows stay as accurate as torch's (a plain sum: 125 ulp at n = 3000).
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 30000, generator=g, dtype=torch.float64) + offset).to(dtype)
    xd = x.double()
    ref_log = xd - xd.amax(-1, keepdim=True)
    ref_log = ref_log - ref_log.exp().sum(-1, keepdim=True).log()
    for fn, ref in ((fastloss.softmax, ref_log.exp()), (fastloss.log_softmax, ref_log)):
        torch_fn = torch.softmax if fn is fastloss.softmax else torch.log_softmax
        err = ((fn(x, -1).double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
        torch_err = ((torch_fn(x, -1).double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
        assert err <= 2 * torch_err + 8 * torch.finfo(dtype).eps, (fn.__name__, err, torch_err)


@pytest.mark.parametrize("log", [False, True])
def test_long_non_last_dim_accurate(device, log):
    # Softmax over dim 0 of a (60000, 7) tensor sums each column in levels of blocks; a single
    # running sum per column (torch's float32 error here: ~1e-4 forward and backward) lost
    # ~log2(n) bits.
    g = torch.Generator().manual_seed(11)
    xd = torch.randn(60000, 7, generator=g, dtype=torch.float64) * 3
    xd[:, 3] = 0.37  # a constant column: every term rounds the same way
    grad = torch.randn(60000, 7, generator=g, dtype=torch.float64) + 1
    ref_y = torch.log_softmax(xd, 0) if log else torch.softmax(xd, 0)
    p = torch.softmax(xd, 0)
    ref_dx = grad - p * grad.sum(0) if log else p * (grad - (grad * p).sum(0))
    x, y, gf = (t.float().to(device) for t in (xd, ref_y, grad))
    fn = fastloss.log_softmax if log else fastloss.softmax
    bwd = torch.ops.fastloss.log_softmax_backward if log else torch.ops.fastloss.softmax_backward
    torch_bwd = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    eps = torch.finfo(torch.float32).eps
    bound = 32 * eps if device == "cpu" else None

    def rel(out, ref, per_column=False):
        # The backward's entries cancel (g - sum), so its errors are measured per column.
        scale = ref.abs().amax(0) if per_column else ref.abs()
        return ((out.double().cpu() - ref).abs() / scale).max().item()

    errs = {
        "forward": (rel(fn(x, 0), ref_y), rel((torch.log_softmax if log else torch.softmax)(x, 0), ref_y)),
        "backward": tuple(rel(f(gf, y, 0, torch.float32), ref_dx, per_column=True) for f in (bwd, torch_bwd)),
    }
    for name, (err, torch_err) in errs.items():
        assert err <= (bound if bound is not None else 2 * torch_err + 32 * eps), (name, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [-1, 0])
def test_log_softmax_never_positive(device, dtype, dim):
    # A row with one finite entry has log-probability 0 there (torch's result); exp then log
    # rounds, and used to leave up to an ulp above 0 in ~40% of such rows.
    x = torch.full((2, 100000), float("-inf"), dtype=dtype, device=device)
    x[0] = torch.linspace(-80, 80, 100000, dtype=dtype, device=device)
    x = x if dim == 0 else x.t().contiguous()
    y = fastloss.log_softmax(x, dim)
    finite = y.isfinite()
    assert finite.sum().item() == 100000
    assert (y[finite] <= 0).all()
    assert y[finite].abs().max().item() <= torch.finfo(dtype).eps


def test_long_last_dim_rows_accurate(device):
    # 4e6 entries in one row: chunk sums merge in groups (one running merge over ~4000 chunks:
    # relative error 1.2e-5 on a constant row; torch's is exact there, 4e-4 on the random row).
    n = 4_000_000
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, n, generator=g, dtype=torch.float64) * 3
    x[1] = 0.37
    ref = torch.softmax(x, -1)
    err = ((fastloss.softmax(x.float().to(device), -1).double().cpu() - ref).abs() / ref).max().item()
    bound = 32 * torch.finfo(torch.float32).eps if device == "cpu" else 1e-4
    assert err <= bound, err


def test_paths_of_cpus_without_avx512():
    # FASTLOSS_CPU_AVX512=0 makes the kernels' own dispatch take the paths of a CPU without
    # AVX-512 (no register kernels for short rows: float forward rows of up to 128 entries one
    # per lane, log-softmax rows of 129 to 256 batched; float16 converted with F16C; the
    # backward of float16 and bfloat16 rows over 32, and of float log-softmax rows of 33-4096,
    # in AVX2 registers): this file's tests again, in a fresh process, on an AVX-512 machine.
    rerun_without_avx512(__file__, "paths_of_cpus_without_avx512")
