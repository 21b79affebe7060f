"""Softmax family: fastloss.softmax against torch.softmax, torch.compile'd softmax, the eager
three-pass formulation and, on a GPU, liger-kernel's softmax when it is installed."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

import fastloss

from .harness import (
    MODES,
    Case,
    Compiled,
    Result,
    Roofline,
    Target,
    Unavailable,
    forward_backward,
    loss_forward_backward,
)

FAMILY = "softmax"

SHAPES = [(4096, 1024), (4096, 32768), (4096, 131072), (8, 151936), (32, 256000), (65536, 128)]
QUICK_SHAPES = [(4096, 1024), (8, 151936)]
DTYPES = [torch.float32, torch.bfloat16]
# Forward, a weighted-sum loss and backward: the gradient reaches the softmax from the loss, as
# in training (not in the grid; its six tensors of 4096 x 131072 would not fit in RAM).
LOSS_MODE = "fwd+loss+bwd"
LOSS_SHAPES = [s for s in SHAPES if s != (4096, 131072)]


# --------------------------------------------------------------------------------------------
# Implementations (each a function of x, softmax over the last dim)


def fastloss_softmax(x: torch.Tensor) -> torch.Tensor:
    return fastloss.softmax(x, -1)


def torch_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


def three_pass_softmax(x: torch.Tensor) -> torch.Tensor:
    # max pass, exp pass, sum pass + divide; the backward is autograd's
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(-1, keepdim=True)


def _softmax_for_compile(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


def _liger_softmax():
    """liger-kernel's softmax (triton, GPU only) if installed, else the reason it is not."""
    try:
        from liger_kernel.transformers.functional import liger_softmax  # type: ignore

        return liger_softmax
    except Exception:
        pass
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction  # type: ignore

        return LigerSoftmaxFunction.apply
    except ImportError:
        return "liger-kernel: not installed (optional peer)"
    except Exception as exc:
        return f"liger-kernel: import failed ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------
# Cases


def _make_inputs(shape, dtype, device, mode):
    def make(seed: int):
        g = torch.Generator(device=device)
        g.manual_seed(1234 + seed)
        x = torch.empty(shape, dtype=dtype, device=device).uniform_(-6.0, 6.0, generator=g)
        if mode == "fwd":
            return (x,)
        grad = torch.empty(shape, dtype=dtype, device=device).uniform_(-1.0, 1.0, generator=g)
        return (x.requires_grad_(True), grad)

    return make


def _make_check(shape, dtype, device, mode):
    """fastloss against torch.softmax on the first rows of the case (same row length)."""

    def check() -> Optional[str]:
        rows = min(shape[0], 64)
        g = torch.Generator(device=device)
        g.manual_seed(99)
        x = torch.empty((rows, *shape[1:]), dtype=dtype, device=device).uniform_(-6.0, 6.0, generator=g)
        # A sanity check (the tests own correctness): a broken kernel is off by O(1); fp32
        # summation order alone moves results by ~1e-5 of the largest value on long rows.
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        pairs = []
        if mode == "fwd":
            pairs.append(("y", fastloss_softmax(x), torch_softmax(x)))
        else:
            grad = torch.empty_like(x).uniform_(-1.0, 1.0, generator=g)
            xa = x.clone().requires_grad_(True)
            xb = x.clone().requires_grad_(True)
            wrap = loss_forward_backward if mode == LOSS_MODE else forward_backward
            ya, dxa = wrap(fastloss_softmax)(xa, grad)
            yb, dxb = wrap(torch_softmax)(xb, grad)
            pairs += [("y", ya, yb), ("dx", dxa, dxb)]
        bad = []
        for name, a, b in pairs:
            scale = b.detach().float().abs().max().clamp_min(1e-30)
            err = ((a.detach().float() - b.detach().float()).abs().max() / scale).item()
            if not err <= tol:  # also catches NaN
                bad.append(f"{name} max err {err:.2e} (relative to max |ref|) > {tol:g}")
        return "MISMATCH vs torch.softmax: " + "; ".join(bad) if bad else None

    return check


def cases(device: str, quick: bool) -> List[Case]:
    shapes = QUICK_SHAPES if quick else SHAPES
    liger = _liger_softmax() if device == "cuda" else None
    out = []
    for shape in shapes:
        for dtype in DTYPES:
            compiled = Compiled(_softmax_for_compile, (shape, dtype, device))
            numel = 1
            for s in shape:
                numel *= s
            elem = torch.empty((), dtype=dtype).element_size()
            for mode in MODES + ((LOSS_MODE,) if shape in LOSS_SHAPES else ()):
                impls = {"torch": torch_softmax, "torch.compile": compiled, "three-pass": three_pass_softmax}
                if device == "cuda":
                    impls["liger"] = liger if callable(liger) else None
                    if impls["liger"] is None:
                        del impls["liger"]
                if mode == "fwd":
                    fast = fastloss_softmax
                    baselines = dict(impls)
                    moved = 2 * numel * elem  # read x, write y
                    in_bytes = numel * elem
                elif mode == LOSS_MODE:
                    fast = loss_forward_backward(fastloss_softmax)
                    baselines = {k: loss_forward_backward(v) for k, v in impls.items()}
                    # the minimum: read x and w, write y and dx (the chain's intermediates,
                    # y * w and the gradient reaching the softmax, need not reach memory)
                    moved = 4 * numel * elem
                    in_bytes = 2 * numel * elem
                else:
                    fast = forward_backward(fastloss_softmax)
                    baselines = {k: forward_backward(v) for k, v in impls.items()}
                    moved = 5 * numel * elem  # fwd + read y, read grad, write dx
                    in_bytes = 2 * numel * elem
                out.append(
                    Case(
                        family=FAMILY,
                        shape=shape,
                        dtype=dtype,
                        mode=mode,
                        device=device,
                        make_inputs=_make_inputs(shape, dtype, device, mode),
                        input_bytes=in_bytes,
                        fastloss=fast,
                        baselines=baselines,
                        bytes_moved=moved,
                        check=_make_check(shape, dtype, device, mode),
                    )
                )
    return out


def notes(device: str, _cases: Sequence[Case]) -> List[str]:
    out = [
        "baselines: `torch` = torch.softmax; `torch.compile` = torch.compile(torch.softmax, dynamic=False), "
        "compiled once per (shape, dtype); `three-pass` = eager amax, exp(x - m), e / e.sum (backward by autograd)",
        "bytes moved: fwd = read x + write y; fwd+bwd = fwd + read y + read grad + write dx; "
        f"{LOSS_MODE} = fwd, the loss (y * w).sum() and its backward, then the softmax backward: the minimum is read x "
        "and w, write y and dx (the timed chain makes 11 tensor passes, the short-lived ones often in cache)",
        f"{LOSS_MODE}: the gradient reaching the softmax's backward comes from the loss's backward, as in "
        "training; fastloss's CPU backward then writes dx over it (nothing else holds it) instead of a fresh "
        "tensor. In fwd+bwd the caller holds the gradient, so dx is a fresh tensor for every library",
        "fastloss is checked against torch.softmax before timing, on 64 rows (fewer if the case has fewer) of "
        "the case's row length drawn for the check",
    ]
    if device == "cuda":
        liger = _liger_softmax()
        if not callable(liger):
            out.append(liger)
    else:
        out.append("liger-kernel: GPU only, not run on CPU")
    return out


# --------------------------------------------------------------------------------------------
# Targets (printed next to the results, not asserted)


def _vs_torch(r: Result, _roof: Roofline) -> Optional[float]:
    return r.speedup("torch")


def _pct_copy(r: Result, roof: Roofline) -> Optional[float]:
    if r.gbps is None or not roof.copy_gbps:
        return None
    return r.gbps / roof.copy_gbps


def targets(device: str) -> List[Target]:
    if device == "cuda":
        big = lambda r: r.case.shape == (4096, 131072) and r.case.dtype == torch.float32 and r.case.mode == "fwd"
        return [
            Target("GPU: >=85% of copy bandwidth at 4096x131072 fp32 fwd", big, _pct_copy, 0.85, percent=True),
            Target("GPU: >=1.5x torch.softmax at 4096x131072 fp32 fwd", big, _vs_torch, 1.5),
            Target(
                "GPU: >=3x torch.softmax at 8x151936 fwd (each dtype)",
                lambda r: r.case.shape == (8, 151936) and r.case.mode == "fwd",
                _vs_torch,
                3.0,
            ),
            Target("GPU: never below 0.95x torch.softmax (every grid case)", lambda r: r.case.mode in MODES, _vs_torch, 0.95),
        ]
    return [
        Target(
            "CPU: >=1.2x torch.softmax for fp32 rows >= 32768 (fwd and fwd+bwd)",
            lambda r: r.case.dtype == torch.float32 and r.case.shape[-1] >= 32768 and r.case.mode in MODES,
            _vs_torch,
            1.2,
        ),
        Target("CPU: never below 0.9x torch.softmax (every grid case)", lambda r: r.case.mode in MODES, _vs_torch, 0.9),
    ]
