"""von Mises-Fisher helpers on the unit sphere S^(p-1) in R^p, built on log I_v(x), so they
work at any dimension (p = 32768 included) and concentration, without overflow:

    log C_p(kappa) = (p/2 - 1) log kappa - (p/2) log(2 pi) - log I_(p/2-1)(kappa)
    A_p(kappa)     = I_(p/2)(kappa) / I_(p/2-1)(kappa) = -d/dkappa log C_p(kappa)
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import List, Tuple, Union

import torch

from .ops.log_bessel import log_bessel_iv

TensorOrNumber = Union[torch.Tensor, float]


def _check_p(name: str, p) -> int:
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 2:
        raise ValueError(f"fastloss.{name}: expected the dimension 'p' to be an int >= 2, got {p!r}")
    return int(p)


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
        ctx.save_for_backward(kappa)
        ctx.nu = nu
        return _bessel_iv_ratio(nu, kappa).to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kappa,) = ctx.saved_tensors
        return grad * _mean_resultant_slope(ctx.nu, kappa).to(grad.dtype), None


def vmf_mean_resultant(kappa: TensorOrNumber, p: int) -> torch.Tensor:
    """A_p(kappa) = I_(p/2)(kappa) / I_(p/2-1)(kappa), the mean resultant length E[mu . x]
    (differentiable in kappa, also at kappa = 0), to a few ulps at any p and kappa, and its
    derivative to ~1e-14 relative (both computed in float64)."""
    p = _check_p("vmf_mean_resultant", p)
    kappa = _as_float_tensor(kappa)
    valid = kappa >= 0
    ratio = _MeanResultant.apply(torch.where(valid, kappa, torch.zeros_like(kappa)), p / 2 - 1)
    return torch.where(valid, ratio, torch.full_like(ratio, math.nan))


# A_p' = 1 - A^2 - (2 nu + 1) A / kappa (from I_nu' = I_(nu+1) + nu / kappa I_nu) is the
# variance of mu . x: where it is small, that formula is a difference of O(1) terms (wrong sign
# at kappa = 1e8, p = 3; 1e-6 off at 1e5). Instead: for nu >= 16 or kappa >= 30, Debye's
# uniform expansion written so that no two terms of A' cancel; below, the derivative of
# Gauss's continued fraction, carried through its recurrence. (The C++ log-Bessel kernels
# carry the same expansion to first derivatives only.)
_DEBYE_NU = 16.0
_DEBYE_X = 30.0
_DEBYE_TERMS = 20


def _debye_polynomials(count: int) -> torch.Tensor:
    """Debye's U_k(t) / t^k, k < count, as a (count, count) float64 matrix of coefficients of
    powers of t^2 (exact recurrence U_(k+1) = t^2 (1 - t^2) U_k' / 2
    + int_0^t (1 - 5 s^2) U_k(s) ds / 8, rounded once)."""
    polys = [{0: Fraction(1)}]
    for _ in range(count - 1):
        nxt = {}
        for power, c in polys[-1].items():
            if power:
                nxt[power + 1] = nxt.get(power + 1, 0) + Fraction(power, 2) * c
                nxt[power + 3] = nxt.get(power + 3, 0) - Fraction(power, 2) * c
            nxt[power + 1] = nxt.get(power + 1, 0) + c / (8 * (power + 1))
            nxt[power + 3] = nxt.get(power + 3, 0) - 5 * c / (8 * (power + 3))
        polys.append(nxt)
    return torch.tensor([[float(u.get(k + 2 * j, 0)) for j in range(count)] for k, u in enumerate(polys)],
                        dtype=torch.float64)


_DEBYE_POLYNOMIALS = _debye_polynomials(_DEBYE_TERMS)


def _debye_ratio_terms(nu: float, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log I_nu(x) - x, 1 - A and A' for float64 x > 0 (A = I_(nu+1) / I_nu), each to ~1e-16
    where nu >= 16 or x >= 30, with no term that cancels: from Debye's expansion
    I_nu(x) ~ exp(r + nu log(x / (nu + r))) / sqrt(2 pi r) * Q, r = hypot(nu, x),
    Q = sum_k w^k U_k(t) / t^k in w = 1 / r and t = nu / r (so nu = 0 is no special case).
    All k at once: a handful of tensor ops per call, whatever the number of terms."""
    r = torch.hypot(torch.full_like(x, nu), x)
    w = 1 / r
    t = nu * w
    w1 = -x * w ** 3  # dw/dx, d2w/dx2
    w2 = (3 * x * x * w * w - 1) * w ** 3
    s, s1, s2 = t * t, 2 * nu * nu * w * w1, 2 * nu * nu * (w1 * w1 + w * w2)  # t^2 and its derivatives
    coeffs = _DEBYE_POLYNOMIALS.to(x.device)
    k = torch.arange(_DEBYE_TERMS, dtype=x.dtype, device=x.device)  # also the powers of s
    pw = s.unsqueeze(-1) ** k  # s^j
    pw1 = k * s.unsqueeze(-1) ** (k - 1).clamp(min=0)  # d/ds s^j
    pw2 = k * (k - 1) * s.unsqueeze(-1) ** (k - 2).clamp(min=0)
    u, us, uss = pw @ coeffs.T, pw1 @ coeffs.T, pw2 @ coeffs.T  # U_k / t^k and d/ds, d2/ds2: (..., k)
    ux, uxx = us * s1.unsqueeze(-1), uss * (s1 * s1).unsqueeze(-1) + us * s2.unsqueeze(-1)
    wc = w.unsqueeze(-1)
    wk = wc ** k
    wk1 = k * wc ** (k - 1).clamp(min=0) * w1.unsqueeze(-1)
    wk2 = k * (k - 1) * wc ** (k - 2).clamp(min=0) * (w1 * w1).unsqueeze(-1) + k * wc ** (k - 1).clamp(min=0) * w2.unsqueeze(-1)
    q = (wk * u).sum(-1)
    q1 = (wk1 * u + wk * ux).sum(-1)
    q2 = (wk2 * u + 2 * wk1 * ux + wk * uxx).sum(-1)
    dlog_q = q1 / q
    excess = nu + nu * nu / (r + x)  # nu + r - x
    log_i_scaled = nu * nu / (r + x) - nu * torch.log1p(excess / x) - 0.5 * torch.log(2 * math.pi * r) + torch.log(q)
    one_minus_a = excess / (r + nu) + x * w * w / 2 - dlog_q
    slope = t * w / (1 + t) + (x - nu) * (x + nu) * w ** 4 / 2 + (q2 / q - dlog_q * dlog_q)
    return log_i_scaled, one_minus_a, slope


def _debye_where(nu: float, kappa: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...], torch.Tensor]:
    """(mask, terms, safe): where Debye's expansion serves (nu >= 16 or kappa >= 30, kappa
    finite and > 0), and _debye_ratio_terms at kappa there (at 1 elsewhere, to be discarded)."""
    k = kappa.double()
    mask = (torch.full_like(k, nu >= _DEBYE_NU, dtype=torch.bool) | (k >= _DEBYE_X)) & (k > 0) & (k < math.inf)
    safe = torch.where(mask, k, torch.ones_like(k))
    return mask, _debye_ratio_terms(nu, safe), safe


def _fraction_slope(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """A' from Gauss's continued fraction A = x / tail, tail = 2(nu + 1) + x^2 / (2(nu + 2) + ...),
    with d tail / dx carried through the same recurrence: A' = (tail - x tail') / tail^2
    (1 / (2 nu + 2) at 0). For kappa < 30 (clamped there), where 40 terms reach ~3e-14."""
    x = torch.clamp(kappa.double(), max=_DEBYE_X)
    a = x * x
    tail, dtail = torch.full_like(x, 2 * (nu + _RATIO_CF_TERMS)), torch.zeros_like(x)
    for j in range(_RATIO_CF_TERMS - 1, 0, -1):
        tail, dtail = 2 * (nu + j) + a / tail, (2 * x * tail - a * dtail) / (tail * tail)
    return (tail - x * dtail) / (tail * tail)


def _slope_where(nu: float, kappa: torch.Tensor, debye: torch.Tensor, debye_slope: torch.Tensor) -> torch.Tensor:
    """A_p'(kappa) in float64: Debye's value where `debye`, elsewhere kappa < 30 with nu < 16
    (the fraction), kappa = 0 (1 / (2 nu + 2), which the fraction also gives: skipped where
    Debye serves every kappa > 0) and kappa = inf (0)."""
    k = kappa.double()
    other = torch.full_like(k, 1 / (2 * nu + 2)) if nu >= _DEBYE_NU else _fraction_slope(nu, k)
    other = torch.where(k == math.inf, torch.zeros_like(k), other)
    return torch.where(debye, debye_slope, other)


def _mean_resultant_complement_and_slope(nu: float, kappa: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """1 - A_p(kappa) to full relative precision (1 - A itself loses it as A -> 1) and
    A_p'(kappa), both float64, kappa >= 0."""
    debye, (_, one_minus_a, slope), _ = _debye_where(nu, kappa)
    complement = torch.where(debye, one_minus_a, 1 - _bessel_iv_ratio(nu, kappa.double()))
    return complement, _slope_where(nu, kappa, debye, slope)


def _mean_resultant_slope(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """A_p'(kappa) in float64, kappa >= 0."""
    debye, (_, _, slope), _ = _debye_where(nu, kappa)
    return _slope_where(nu, kappa, debye, slope)


def _vmf_entropy(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """-log C_p(kappa) - kappa A_p(kappa) in float64. Both terms grow like kappa; where Debye's
    expansion applies it is summed as (log I - kappa) - nu log kappa + p/2 log(2 pi) + kappa (1 - A),
    which keeps full precision at any kappa (the plain difference is 0 at kappa = 1e18, p = 3)."""
    k = kappa.double()
    nu = p / 2 - 1
    plain = -vmf_log_normalizer(k, p) - k * vmf_mean_resultant(k, p)
    debye, (log_i_scaled, one_minus_a, _), safe = _debye_where(nu, k)
    expanded = log_i_scaled - nu * torch.log(safe) + (p / 2) * math.log(2 * math.pi) + safe * one_minus_a
    return torch.where(debye, expanded, plain)


def vmf_kappa_mle(rbar: TensorOrNumber, p: int, iterations: int = 10) -> torch.Tensor:
    """The maximum-likelihood concentration: the root of A_p(kappa) = rbar, 0 <= rbar < 1.

    Newton's method from Banerjee et al.'s start
    rbar (p - rbar^2) / (1 - rbar^2), kept inside Sra's bracket [rbar (p-2), rbar p] / (1 - rbar^2)
    (a step that leaves the bracket bisects it). A fixed number of iterations: no host sync.
    A_p is increasing and concave, so Newton's steps with the exact slope converge from either
    side; from this start they reach the float64 root within at most 6 steps (measured over
    p = 2 ... 32768 and rbar from 1e-300 to 1 - 1e-16); the default 10 leaves a margin.
    """
    p = _check_p("vmf_kappa_mle", p)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
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
        slope = _mean_resultant_slope(p / 2 - 1, kappa).to(kappa.dtype)
        step = kappa - (a - rbar) / slope
        # Inclusive: at tiny rbar Sra's upper end rounds to the root itself.
        inside = (step >= lo) & (step <= hi) & torch.isfinite(step)
        kappa = torch.where(inside, step, (lo + hi) / 2)
    # Tiny rbar: A_p(kappa) = kappa / p (1 - kappa^2 / (p (p + 2)) + ...), so kappa = p rbar to
    # the last bit; there Newton's A was evaluated at a clamped kappa (a subnormal rbar gave 0).
    kappa = torch.where(rbar < 1e-100, rbar * p, kappa)
    # rbar = 0: the uniform distribution; rbar >= 1 or outside [0, 1): no finite MLE.
    kappa = torch.where(rbar == 0, torch.zeros_like(kappa), kappa)
    return torch.where((rbar >= 0) & (rbar < 1), kappa, torch.full_like(kappa, math.nan))
