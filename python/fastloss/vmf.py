"""von Mises-Fisher helpers on the unit sphere S^(p-1) in R^p, built on log I_v(x), so they
work at any dimension (p = 32768 included) and concentration, without overflow:

    log C_p(kappa) = (p/2 - 1) log kappa - (p/2) log(2 pi) - log I_(p/2-1)(kappa)
    A_p(kappa)     = I_(p/2)(kappa) / I_(p/2-1)(kappa) = -d/dkappa log C_p(kappa)
"""

from __future__ import annotations

import math
from typing import Union

import torch

from .ops.log_bessel import log_bessel_iv

TensorOrNumber = Union[torch.Tensor, float]


def _check_p(name: str, p) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or p < 2:
        raise ValueError(f"fastloss.{name}: expected the dimension 'p' to be an int >= 2, got {p!r}")
    return p


def _as_float_tensor(value: TensorOrNumber) -> torch.Tensor:
    t = torch.as_tensor(value)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def vmf_log_normalizer(kappa: TensorOrNumber, p: int) -> torch.Tensor:
    """log C_p(kappa), the log normalizing constant of the vMF density on S^(p-1) in R^p
    (differentiable in kappa, twice: d/dkappa = -A_p(kappa); kappa = 0 gives the uniform
    density's -log |S^(p-1)|)."""
    p = _check_p("vmf_log_normalizer", p)
    return _LogNormalizer.apply(_as_float_tensor(kappa), p)


class _LogNormalizer(torch.autograd.Function):
    # The gradient is -A_p(kappa) itself, not nu / kappa - d/dkappa log I_nu(kappa): those two
    # nearly cancel where A_p is small (20% off at p = 32768, kappa = 10 in float32).
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, p: int) -> torch.Tensor:
        ctx.save_for_backward(kappa)
        ctx.p = p
        return _log_normalizer_value(kappa, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kappa,) = ctx.saved_tensors
        return -grad * vmf_mean_resultant(kappa, ctx.p), None


def _log_normalizer_value(kappa: torch.Tensor, p: int) -> torch.Tensor:
    nu = p / 2 - 1
    log_area = math.log(2.0) + (p / 2) * math.log(math.pi) - math.lgamma(p / 2)
    # The limits: kappa = 0, the uniform density's -log |S^(p-1)| (the two logs alone are -inf
    # there); kappa = inf, -inf (the density concentrates at loc); negative or NaN kappa, NaN.
    finite = (kappa > 0) & (kappa < math.inf)
    safe = torch.where(finite, kappa, torch.ones_like(kappa))
    value = nu * torch.log(safe) - (p / 2) * math.log(2 * math.pi) - log_bessel_iv(nu, safe)
    at_inf = torch.where(kappa == math.inf, torch.full_like(value, -math.inf), torch.full_like(value, math.nan))
    limit = torch.where(kappa == 0, torch.full_like(value, -log_area), at_inf)
    return torch.where(finite, value, limit)


# I_(v+1)(x) / I_v(x) by Gauss's continued fraction x / (2(v+1) + x^2 / (2(v+2) + x^2 / ...)):
# every term positive (no cancellation); 30 terms reach full precision while x <= v + 20, and
# 40 leave a margin.
_RATIO_CF_MAX_EXCESS = 20.0
_RATIO_CF_TERMS = 40


def _bessel_iv_ratio(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """I_(nu+1)(kappa) / I_nu(kappa), kappa > 0, in float64 to a few ulps: the continued fraction
    for kappa <= nu + 20, beyond it d/dkappa log I_nu(kappa) - nu / kappa (the Bessel methods'
    own accurate ratio; there nu / kappa < 1 < 2.5 A, so the subtraction loses < 2 bits)."""
    k = kappa.double()
    x = torch.clamp(k, max=nu + _RATIO_CF_MAX_EXCESS)
    a = x * x  # underflows to 0 for tiny x, leaving the exact x / (2(nu + 1))
    tail = torch.full_like(x, 2 * (nu + _RATIO_CF_TERMS))
    for j in range(_RATIO_CF_TERMS - 1, 0, -1):  # bottom up: each step damps the error below it
        tail = 2 * (nu + j) + a / tail
    from_fraction = x / tail
    k_far = torch.clamp(k, min=nu + _RATIO_CF_MAX_EXCESS)
    _, d_dx = torch.ops.fastloss.log_bessel_iv_grad(torch.full_like(k_far, nu), k_far)
    from_derivative = d_dx - nu / k_far
    return torch.where(k <= nu + _RATIO_CF_MAX_EXCESS, from_fraction, from_derivative)


class _MeanResultant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, nu: float) -> torch.Tensor:
        a = _bessel_iv_ratio(nu, kappa)
        ctx.save_for_backward(kappa, a)
        ctx.nu = nu
        return a.to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kappa, a = ctx.saved_tensors
        # A' = 1 - A^2 - (2 nu + 1) A / kappa (from I_nu' = I_(nu+1) + nu / kappa I_nu)
        slope = 1 - a * a - (2 * ctx.nu + 1) * a / kappa.double()
        return grad * slope.to(grad.dtype), None


def vmf_mean_resultant(kappa: TensorOrNumber, p: int) -> torch.Tensor:
    """A_p(kappa) = I_(p/2)(kappa) / I_(p/2-1)(kappa), the mean resultant length E[mu . x]
    (differentiable in kappa), to a few ulps at any p and kappa (computed in float64)."""
    p = _check_p("vmf_mean_resultant", p)
    kappa = _as_float_tensor(kappa)
    nu = p / 2 - 1
    safe = torch.where(kappa > 0, kappa, torch.ones_like(kappa))  # A_p(0) = 0
    ratio = _MeanResultant.apply(safe, nu)
    return torch.where(kappa > 0, ratio, torch.where(kappa == 0, torch.zeros_like(ratio), torch.full_like(ratio, math.nan)))


def vmf_kappa_mle(rbar: TensorOrNumber, p: int, iterations: int = 40) -> torch.Tensor:
    """The maximum-likelihood concentration: the root of A_p(kappa) = rbar, 0 <= rbar < 1.

    Newton's method (A_p' = 1 - A_p^2 - (p-1)/kappa A_p) from Banerjee et al.'s start
    rbar (p - rbar^2) / (1 - rbar^2), kept inside Sra's bracket [rbar (p-2), rbar p] / (1 - rbar^2)
    (a step that leaves the bracket bisects it). A fixed number of iterations: no host sync.
    """
    p = _check_p("vmf_kappa_mle", p)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"fastloss.vmf_kappa_mle: expected 'iterations' to be a positive int, got {iterations!r}")
    rbar = _as_float_tensor(rbar)
    one_minus = (1 - rbar) * (1 + rbar)
    lo = rbar * (p - 2) / one_minus
    hi = rbar * p / one_minus
    kappa = rbar * (p - rbar * rbar) / one_minus
    for _ in range(iterations):
        a = vmf_mean_resultant(kappa.clamp(min=torch.finfo(kappa.dtype).tiny), p)
        # A_p is increasing: shrink the bracket around the root.
        lo = torch.where(a < rbar, torch.maximum(lo, kappa), lo)
        hi = torch.where(a > rbar, torch.minimum(hi, kappa), hi)
        slope = 1 - a * a - (p - 1) / kappa * a
        step = kappa - (a - rbar) / slope
        # Inclusive: at tiny rbar Sra's upper end rounds to the root itself.
        inside = (step >= lo) & (step <= hi) & torch.isfinite(step)
        kappa = torch.where(inside, step, (lo + hi) / 2)
    # rbar = 0: the uniform distribution; rbar >= 1 or outside [0, 1): no finite MLE.
    kappa = torch.where(rbar == 0, torch.zeros_like(kappa), kappa)
    return torch.where((rbar >= 0) & (rbar < 1), kappa, torch.full_like(kappa, math.nan))
