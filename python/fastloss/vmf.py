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
    (differentiable in kappa; kappa = 0 gives the uniform density's -log |S^(p-1)|)."""
    p = _check_p("vmf_log_normalizer", p)
    kappa = _as_float_tensor(kappa)
    nu = p / 2 - 1
    log_area = math.log(2.0) + (p / 2) * math.log(math.pi) - math.lgamma(p / 2)
    # At kappa = 0 the two logs are -inf (nu > 0); a safe kappa keeps the gradient finite there.
    safe = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
    value = nu * torch.log(safe) - (p / 2) * math.log(2 * math.pi) - log_bessel_iv(nu, safe)
    limit = torch.where(kappa == 0, torch.full_like(value, -log_area), torch.full_like(value, math.nan))
    return torch.where(kappa > 0, value, limit)


def vmf_mean_resultant(kappa: TensorOrNumber, p: int) -> torch.Tensor:
    """A_p(kappa) = I_(p/2)(kappa) / I_(p/2-1)(kappa), the mean resultant length E[mu . x]
    (differentiable in kappa). Computed as exp of a difference of two accurate logs: relative
    error about 1e-16 * |log I|."""
    p = _check_p("vmf_mean_resultant", p)
    kappa = _as_float_tensor(kappa)
    nu = p / 2 - 1
    safe = torch.where(kappa > 0, kappa, torch.ones_like(kappa))  # A_p(0) = 0
    ratio = torch.exp(log_bessel_iv(nu + 1, safe) - log_bessel_iv(nu, safe))
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
        inside = (step > lo) & (step < hi) & torch.isfinite(step)
        kappa = torch.where(inside, step, (lo + hi) / 2)
    # rbar = 0: the uniform distribution; rbar >= 1 or outside [0, 1): no finite MLE.
    kappa = torch.where(rbar == 0, torch.zeros_like(kappa), kappa)
    return torch.where((rbar >= 0) & (rbar < 1), kappa, torch.full_like(kappa, math.nan))
