"""Probability distributions built on fastloss special functions."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from torch.distributions import Distribution, constraints
from torch.distributions.kl import register_kl

from .ops._func import all_true, transforms_active
from .ops._guards import check_dense
from .vmf import _mean_resultant_slope, _vmf_entropy, vmf_kappa_mle, vmf_log_normalizer, vmf_mean_resultant

__all__ = ["VonMisesFisher"]


def w_kappa_derivative(w: torch.Tensor, kappa: torch.Tensor, p: int) -> torch.Tensor:
    """dw/dkappa at a fixed CDF value of w = mu . x (rsample's reparameterization gradient), for
    w and kappa of one shape, in w's dtype: a 256-node quadrature of the tail of w's density
    beyond w (p = 3: its closed form), elementwise in C++/CUDA
    (torch.ops.fastloss.vmf_sample_w_derivative)."""
    return torch.ops.fastloss.vmf_sample_w_derivative.default(w.double(), kappa.double(), p).to(w.dtype)


def _per_row(concentration: torch.Size, loc: torch.Size) -> bool:
    """Whether a concentration of this shape is one per row of loc, (..., 1) beside (..., p) (a
    network's (B, 1) output): loc's number of dims, a last dim of 1, the others broadcasting
    with loc's batch shape (otherwise it broadcasts as it is, as torch's distributions do)."""
    if len(concentration) != len(loc) or concentration[-1] != 1:
        return False
    try:
        torch.broadcast_shapes(concentration[:-1], loc[:-1])
    except RuntimeError:
        return False
    return True


class _UnitSphere(constraints.Constraint):
    """Vectors of unit norm along the last dim (to a tolerance fit for the dtype)."""

    is_discrete = False
    event_dim = 1

    def check(self, value):
        return _has_unit_norm(value)


def _has_unit_norm(value: torch.Tensor) -> torch.Tensor:
    """Whether each vector along the last dim has norm 1 to within its dtype's rounding: half
    types' norm in float32 (a bfloat16 norm rounds unit vectors to 0.996 or 1.008), against
    max(1e-5, 10 eps) of the dtype (a unit vector rounded to bfloat16 is off by up to ~4 eps)."""
    tol = max(1e-5, 10 * torch.finfo(value.dtype).eps)
    wide = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    return (wide.norm(dim=-1) - 1).abs() <= tol


class _RealVector(constraints.Constraint):
    """Vectors along the last dim with no NaN entry: torch's real_vector, which also holds for an
    empty batch (real_vector's check reshapes to (0, -1) there and raises)."""

    is_discrete = False
    event_dim = 1

    def check(self, value):
        return (value == value).all(dim=-1)


class VonMisesFisher(Distribution):
    """The von Mises-Fisher distribution on the unit sphere S^(p-1) in R^p:
    density C_p(kappa) exp(kappa mu . x) for unit mean direction ``loc`` (mu, last dim p) and
    ``concentration`` kappa >= 0 (finite). Works at any p (e.g. 32768) through log I_v(x).
    The batch shape is that of ``loc[..., 0]`` broadcast with ``concentration``; a concentration
    with loc's number of dims and a last dim of 1 whose other dims broadcast with
    ``loc.shape[:-1]`` (one per row, as a network's (B, 1) output) is read without that dim,
    not broadcast to (B, B).

    ``rsample`` (Wood 1994; at p = 3 by inverting w's CDF) is differentiable with respect to
    ``loc`` and ``concentration``. It depends on ``loc`` only through its direction
    loc / |loc|, so its gradient in ``loc`` is tangent to the sphere (no radial part). The
    concentration enters through a rejection step (or the inverse CDF), so its gradient is the
    implicit reparameterization gradient (Figurnov et al. 2018) of w = mu . x at a fixed value
    of its CDF: dw/dkappa = -(dF/dkappa) / f(w), by quadrature in float64 (closed form at p = 3).

    With ``validate_args=False``, a negative or NaN concentration gives NaN everywhere (log_prob,
    entropy, mean, samples), and an infinite one samples the point mass at ``loc``.
    """

    arg_constraints = {"loc": _RealVector(), "concentration": constraints.nonnegative}
    support = _UnitSphere()
    has_rsample = True

    def __init__(self, loc: torch.Tensor, concentration, validate_args=None):
        loc = torch.as_tensor(loc)
        check_dense("VonMisesFisher", "loc", loc)
        if isinstance(concentration, torch.Tensor):
            check_dense("VonMisesFisher", "concentration", concentration)
        if not loc.is_floating_point() or loc.dim() < 1 or loc.shape[-1] < 2:
            raise ValueError(f"VonMisesFisher: expected 'loc' to be a float tensor with a last dim >= 2, got {loc.dtype} {tuple(loc.shape)}")
        # (A cast would drop the imaginary part. Numbers are not made tensors first: a Python
        # float would pass through float32 on its way to loc's dtype.)
        if concentration is None or isinstance(concentration, (str, bytes)):
            raise TypeError("VonMisesFisher: expected 'concentration' to be a tensor or a number, got "
                            f"{type(concentration).__name__}")
        if (concentration.is_complex() if isinstance(concentration, torch.Tensor)
                else np.iscomplexobj(concentration)):
            got = getattr(concentration, "dtype", type(concentration).__name__)
            raise TypeError(f"VonMisesFisher: expected 'concentration' to be real, got {got}")
        concentration = torch.as_tensor(concentration, dtype=loc.dtype, device=loc.device)
        if _per_row(concentration.shape, loc.shape):
            concentration = concentration.squeeze(-1)
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self.concentration = concentration.expand(batch_shape)
        self.p = loc.shape[-1]
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)
        if self._validate_args:
            # all_true: these checks also run under vmap (bool() of a batched tensor raises).
            if not all_true(torch.isfinite(self.concentration)):
                raise ValueError("VonMisesFisher: expected 'concentration' to be finite (a point mass has no density)")
            if not all_true(_has_unit_norm(self.loc)):
                raise ValueError("VonMisesFisher: expected 'loc' to have unit norm along its last dim")

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(VonMisesFisher, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape)
        new.p = self.p
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = A_p(kappa) loc: inside the ball, of length the mean resultant length."""
        return vmf_mean_resultant(self.concentration, self.p).unsqueeze(-1) * self.loc

    @property
    def mode(self) -> torch.Tensor:
        """loc where the concentration is positive; NaN where it is 0 (the uniform sphere has no
        mode)."""
        return torch.where((self.concentration > 0).unsqueeze(-1), self.loc, torch.nan)

    @property
    def variance(self) -> torch.Tensor:
        """The variance of each coordinate: the diagonal of the covariance
        (A / kappa) I + (A' - A / kappa) mu mu^T, A = A_p(kappa), A' = dA/dkappa (1/p at kappa = 0,
        the uniform sphere's)."""
        kappa = self.concentration.double()
        a = vmf_mean_resultant(kappa, self.p)
        # Below 1e-4, A / kappa from its series (1 / p) (1 - kappa^2 / (p (p + 2)) + ...): A of a
        # subnormal kappa has lost its digits (0 at 5e-324).
        small = kappa < 1e-4
        series = (1 - kappa * kappa / (self.p * (self.p + 2.0))) / self.p
        a_over_kappa = torch.where(small, series, a / torch.where(small, 1.0, kappa))
        slope = _mean_resultant_slope(kappa, self.p)
        mu2 = self.loc.double() ** 2
        var = a_over_kappa.unsqueeze(-1) * (1 - mu2) + slope.unsqueeze(-1) * mu2
        return var.to(self.loc.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log C_p(kappa) + kappa loc . value for unit vectors ``value`` (..., p), with the
        normalizer from the log-Bessel kernels (finite at any kappa and p)."""
        if self._validate_args:
            self._validate_sample(value)
        return vmf_log_normalizer(self.concentration, self.p) + self.concentration * (self.loc * value).sum(-1)

    def entropy(self) -> torch.Tensor:
        """-log C_p(kappa) - kappa A_p(kappa), in nats."""
        # Computed in float64 whatever the dtype, summed so that the two O(kappa) terms never cancel.
        return _vmf_entropy(self.concentration, self.p)

    def _sample_w(self, shape: torch.Size, max_rounds: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
        """Wood's rejection sampler for w = mu . x (acceptance is high at every p and kappa), in
        float64: w and 1 - w (accurate where w rounds to 1). p = 3 inverts the CDF instead."""
        kappa = self.concentration.detach().double().expand(shape)
        if self.p == 3:
            return self._sample_w_sphere(kappa)
        m1 = self.p - 1.0
        # b = (-2 kappa + sqrt(4 kappa^2 + m1^2)) / m1 = h / (1 + sqrt(1 + h^2)), h = m1 / (2 kappa),
        # without cancellation or overflow (1 at kappa = 0, h / 2 as kappa grows to the largest float).
        h = (0.5 * m1) / kappa.abs()  # abs: -0.0 is 0 (negative kappa is invalid, masked below)
        b = torch.where(h <= 1, h / (1 + torch.hypot(torch.ones_like(h), h)), 1 / (1 / h + torch.hypot(1 / h, torch.ones_like(h))))
        # Wood's test kappa w + m1 log(1 - x0 w) - c >= log u, c = kappa x0 + m1 log(1 - x0^2),
        # x0 = (1 - b) / (1 + b), as kappa (w - x0) + m1 log((1 - x0 w) / (1 - x0^2)) in terms of
        # 1 - x0 and 1 - w: at large kappa x0 and w round to 1 (kappa ~ 5e15 at p = 3; 1e7 in
        # float32), and the cancelling form was NaN.
        one_minus_x0 = 2 * b / (1 + b)
        x0 = (1 - b) / (1 + b)
        log_c = torch.log(one_minus_x0 * (2 - one_minus_x0))  # log(1 - x0^2)
        # Beta(m1/2, m1/2) as a ratio of gammas: torch's Beta sampler is an autograd.Function
        # that torch.func transforms refuse, even with no gradient wanted.
        gamma = torch.distributions.Gamma(torch.full_like(kappa, m1 / 2), torch.ones_like(kappa))
        # Invalid concentrations (negative, NaN: reachable with validate_args=False) sample NaN,
        # like log_prob; an infinite one samples its limit, the point mass w = 1.
        # (b = 0: kappa beyond ~1e308, the point mass as for an infinite one.)
        invalid = ~(kappa >= 0)
        point = (kappa == torch.inf) | (b == 0)
        w = torch.where(invalid, torch.full_like(kappa, torch.nan), point.to(kappa.dtype))
        one_minus_w = torch.where(invalid, torch.full_like(kappa, torch.nan), 1 - w)
        done = invalid | point
        for _ in range(max_rounds):
            if all_true(done):
                return w, one_minus_w
            g1, g2 = gamma.sample(), gamma.sample()
            z = g1 / (g1 + g2)
            proposal = (1 - (1 + b) * z) / (1 - (1 - b) * z)
            t = 2 * b * z / (1 - (1 - b) * z)  # 1 - proposal
            u = torch.rand_like(kappa).clamp(min=torch.finfo(kappa.dtype).tiny)
            test = kappa * (one_minus_x0 - t) + m1 * (torch.log(one_minus_x0 + x0 * t) - log_c)
            accept = (test >= torch.log(u)) & ~done
            w = torch.where(accept, proposal, w)
            one_minus_w = torch.where(accept, t, one_minus_w)
            done = done | accept
        if all_true(done):
            return w, one_minus_w
        raise RuntimeError("VonMisesFisher: the rejection sampler did not converge")

    @staticmethod
    def _sample_w_sphere(kappa: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """p = 3: w by inverting its CDF (1 - exp(-kappa s)) / (1 - exp(-2 kappa)) in s = 1 - w,
        one uniform per sample and no rejection: s = -log1p(v expm1(-2 kappa)) / kappa, v uniform
        in (0, 1] (s = 2 v below kappa = 1e-17, where that is 2 v to rounding). Invalid
        concentrations give NaN and an infinite one the point mass, as in Wood's sampler."""
        v = 1 - torch.rand_like(kappa)
        s = -torch.log1p(v * torch.expm1(-2 * kappa)) / torch.where(kappa > 0, kappa, 1.0)
        # v = 1 with expm1(-2 kappa) rounded to -1 is log1p(-1) = -inf: the end point s = 2.
        s = torch.where(kappa < 1e-17, 2 * v, s.clamp(max=2))
        s = torch.where(kappa == torch.inf, torch.zeros_like(s), s)
        s = torch.where(kappa >= 0, s, torch.full_like(s, torch.nan))
        return 1 - s, s

    def _concentration_differentiated(self) -> bool:
        """Whether rsample needs dw/dkappa: reverse mode (not sample()'s no_grad), or a
        torch.func transform or forward-AD tangent."""
        return (self.concentration.requires_grad and torch.is_grad_enabled()) or transforms_active(self.concentration)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Samples of shape ``sample_shape + batch_shape + (p,)`` (Wood's 1994 algorithm),
        differentiable in loc and concentration (implicit reparameterization of w = loc . x)."""
        shape = self._extended_shape(sample_shape)
        w64, one_minus_w = self._sample_w(shape[:-1])
        w = w64.to(self.concentration.dtype)
        if self._concentration_differentiated():
            kappa = self.concentration.expand(shape[:-1])
            # At the float64 w: where float32 rounds w to 1 (large kappa) the derivative is 0.
            dw = w_kappa_derivative(w64, kappa.detach(), self.p).to(w.dtype)
            # kappa - kappa is NaN at kappa = inf, whose point mass does not move (dw = 0).
            kappa = torch.where(kappa == torch.inf, torch.zeros_like(kappa), kappa)
            w = w + (kappa - kappa.detach()) * dw  # value w, gradient dw/dkappa
        w = w.unsqueeze(-1)
        # A uniform direction in the tangent space of e1 (the last p - 1 coordinates); the
        # sample in the frame of e1 is x = (w, radius t).
        # (p = 3: the angle on the circle, one uniform and no normalization.)
        if self.p == 3:
            angle = torch.rand(shape[:-1], dtype=self.loc.dtype, device=self.loc.device) * (2 * math.pi)
            t = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
        else:
            t = torch.randn(shape[:-1] + (self.p - 1,), dtype=self.loc.dtype, device=self.loc.device)
            t = t / torch.linalg.vector_norm(t, dim=-1, keepdim=True)
        # sqrt(1 - w^2) from the float64 1 - w (w may round to 1 while the radius is ~1e-8), with
        # the gradient -w / radius times w's, 0 where the radius is 0 (sqrt's infinite slope there
        # made the product NaN). w's gradient comes from the float64 w, so it is 0 where that
        # rounds to 1 (kappa beyond ~1e15 at p = 3): there the samples' spread has no gradient.
        radius_value = torch.sqrt(one_minus_w * (2 - one_minus_w)).to(w.dtype).unsqueeze(-1)
        wd = w.detach()
        slope = torch.where(radius_value > 0, -wd / torch.where(radius_value > 0, radius_value, 1.0), 0.0)
        radius = radius_value + (w - wd) * slope
        # An orthogonal map taking e1 to mu = loc / |loc|, smooth in mu: where mu[0] < 0 the
        # Householder reflection along u = e1 - mu, elsewhere minus the reflection along
        # u = e1 + mu (which takes e1 to -mu). |u|^2 = 2 + 2 |mu[0]| >= 2 either way; the single
        # reflection along e1 - mu is singular at mu = e1 (its gradient grew like 1 / |e1 - mu|).
        mu = self.loc / self.loc.norm(dim=-1, keepdim=True)
        s = torch.where(mu[..., :1] >= 0, 1.0, -1.0).to(mu.dtype)
        u = torch.cat([1 + s * mu[..., :1], s * mu[..., 1:]], dim=-1)  # e1 + s mu
        # -s (x - 2 (x . u) / |u|^2 u) in few passes over the samples: x . u from x's two parts
        # (u is per distribution, not per sample), then one fused multiply-add.
        xu = w * u[..., :1] + radius * torch.linalg.vecdot(t, u[..., 1:]).unsqueeze(-1)
        coef = xu * (2 * s / (u * u).sum(-1, keepdim=True))
        return torch.addcmul(torch.cat([-s * w, (-s * radius) * t], dim=-1), coef, u)

    @classmethod
    def fit(cls, samples: torch.Tensor, iterations: int = 10) -> "VonMisesFisher":
        """Maximum-likelihood fit to unit vectors ``samples`` of shape (n, p):
        mu = mean / |mean|, kappa solves A_p(kappa) = |mean| (:func:`fastloss.vmf_kappa_mle`,
        at most ``iterations`` Newton steps, an int in [1, 1000])."""
        if (not isinstance(samples, torch.Tensor) or not samples.is_floating_point() or samples.dim() != 2
                or samples.shape[0] < 1):
            got = (f"{samples.dtype} {tuple(samples.shape)}" if isinstance(samples, torch.Tensor)
                   else type(samples).__name__)
            raise ValueError("VonMisesFisher.fit: expected 'samples' to be a float tensor of shape (n, p) with n >= 1, "
                             f"got {got}")
        # Off the sphere the fit is silently wrong (half-length samples halve |mean| and kappa).
        if not all_true(_has_unit_norm(samples)):
            raise ValueError("VonMisesFisher.fit: expected 'samples' to be unit vectors (norm 1 along the last dim)")
        mean = samples.mean(dim=0)
        rbar = mean.norm()
        if not rbar > 0:
            raise ValueError("VonMisesFisher.fit: the samples' mean is 0 (or NaN): the mean direction is undefined")
        # (Equal samples are tested as such: their mean's norm rounds to either side of 1.)
        if not rbar < 1 or bool((samples == samples[:1]).all()):
            raise ValueError("VonMisesFisher.fit: the samples are all one point (mean resultant length 1): the "
                             "maximum-likelihood concentration is infinite")
        kappa = vmf_kappa_mle(rbar, samples.shape[1], iterations=iterations)
        return cls(mean / rbar, kappa)


@register_kl(VonMisesFisher, VonMisesFisher)
def _kl_vmf_vmf(p: VonMisesFisher, q: VonMisesFisher) -> torch.Tensor:
    """KL(p || q) = log C(kappa_p) - log C(kappa_q) + A(kappa_p) (kappa_p - kappa_q mu_p . mu_q)
    for unit locs, in float64 (the log-normalizers grow like kappa and their difference is what
    remains: absolute error ~kappa eps, clamped at 0); 0 for equal distributions,
    differentiable in both."""
    if p.p != q.p:
        raise ValueError(f"kl_divergence(VonMisesFisher, VonMisesFisher): the distributions live in different "
                         f"dimensions, p = {p.p} and {q.p}")
    dtype = torch.promote_types(p.loc.dtype, q.loc.dtype)
    kp, kq = p.concentration.double(), q.concentration.double()
    # 1 - mu_p . mu_q as |mu_p - mu_q|^2 / 2: never below 0, and exact for near directions.
    one_minus_cosine = (p.loc.double() - q.loc.double()).square().sum(-1) / 2
    kl = (vmf_log_normalizer(kp, p.p) - vmf_log_normalizer(kq, q.p)
          + vmf_mean_resultant(kp, p.p) * (kp - kq + kq * one_minus_cosine))
    return kl.clamp_min(0).to(dtype)
