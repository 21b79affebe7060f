"""The CUDA kernels (csrc/kernels) run on the CPU emulator (tests/cuda_emu): results against
float64 references, every launch path, both thread orders between barriers (a missing
barrier changes the results), shared memory and cp.async reads of unwritten data (0xff fill:
NaN), out-of-bounds accesses (guard pages), deadlocks and launch limits (launch errors).

It checks what the kernels compute, not how fast; it needs g++ and the CUDA headers, not a GPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from cuda_emu import build
from cuda_emu.device import Emulator, schedule

pytestmark = pytest.mark.skipif(
    build.cuda_include_dir() is None or shutil.which("g++") is None,
    reason="the CUDA emulator needs g++ and the CUDA toolkit's headers",
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def emu() -> Emulator:
    out = Path(os.environ.get("FASTLOSS_EMU_BUILD_DIR", ROOT / "build" / "cuda_emu"))
    out.mkdir(parents=True, exist_ok=True)
    return Emulator(build.load(out))


def both_orders(fn):
    """fn() under both thread orders; the results must be bitwise equal (no races)."""
    with schedule("forward"):
        a = fn()
    with schedule("reverse"):
        b = fn()
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
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
    ((24, 10000), -1), ((16, 70000), -1),
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
    yd, gd = y32.double(), g32.double()
    if log:
        ref_dx = gd - yd.exp() * gd.sum(dim, keepdim=True)
    else:
        ref_dx = yd * (gd - (gd * yd).sum(dim, keepdim=True))
    err = (dx.double() - ref_dx).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref_dx.abs().max().item()), f"backward max error {err:.3g}"


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, None), (torch.float16, None), (torch.bfloat16, None),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["f64", "f16", "bf16", "f16-f32", "bf16-f32"])
@pytest.mark.parametrize("shape,dim", [((9, 100), -1), ((3, 3000), -1), ((2, 70000), -1), ((4, 9, 6), 1)],
                         ids=lambda v: str(v))
def test_softmax_dtypes(emu, dtype, out_dtype, shape, dim):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 5).to(dtype)
    y = emu.softmax(x, dim, out_dtype=out_dtype)
    assert y.dtype == (out_dtype or dtype)
    close(y, torch.softmax(x.double(), dim), out_dtype or dtype, "forward")
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(y.dtype)
    dx = emu.softmax_backward(grad, y, dim, in_dtype=dtype)
    assert dx.dtype == dtype
    yd, gd = y.double(), grad.double()
    ref = yd * (gd - (gd * yd).sum(dim, keepdim=True))
    err = (dx.double() - ref).abs().max().item()
    assert err <= 4 * TOL[dtype] * max(1.0, ref.abs().max().item()), f"backward max error {err:.3g}"


def test_softmax_special_rows(emu):
    x = torch.randn(6, 3000)
    x[0] = float("-inf")
    x[1, 17] = float("inf")
    x[2, 5] = float("nan")
    x[3, :100] = float("-inf")
    x[4] *= 1e6
    for xs in (x, x[:, :500], x[:, :20]):  # block, warp and small-warp paths
        close(emu.softmax(xs), torch.softmax(xs.double(), -1), torch.float32, "special rows")
