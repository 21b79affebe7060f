"""Probability distributions built on fastloss special functions."""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints

from .vmf import vmf_kappa_mle, vmf_log_normalizer, vmf_mean_resultant

__all__ = ["VonMisesFisher"]


class VonMisesFisher(Distribution):
    """The von Mises-Fisher distribution on the unit sphere S^(p-1) in R^p:
    density C_p(kappa) exp(kappa mu . x) for unit mean direction ``loc`` (mu, last dim p) and
    ``concentration`` kappa >= 0. Works at any p (e.g. 32768) through log I_v(x).

    ``rsample`` (Wood 1994) is differentiable with respect to ``loc``; the concentration
    enters through a rejection step, so samples carry no gradient with respect to it (use
    log_prob for that).
    """

    arg_constraints = {"loc": constraints.real_vector, "concentration": constraints.nonnegative}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, concentration, validate_args=None):
        loc = torch.as_tensor(loc)
        if not loc.is_floating_point() or loc.dim() < 1 or loc.shape[-1] < 2:
            raise ValueError(f"VonMisesFisher: expected 'loc' to be a float tensor with a last dim >= 2, got {loc.dtype} {tuple(loc.shape)}")
        concentration = torch.as_tensor(concentration, dtype=loc.dtype, device=loc.device)
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self.concentration = concentration.expand(batch_shape)
        self.p = loc.shape[-1]
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)
        if self._validate_args:
            norm = self.loc.norm(dim=-1)
            if not torch.allclose(norm, torch.ones_like(norm), atol=1e-5):
                raise ValueError("VonMisesFisher: expected 'loc' to have unit norm along its last dim")

    @property
    def mean(self) -> torch.Tensor:
        return vmf_mean_resultant(self.concentration, self.p).unsqueeze(-1) * self.loc

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return vmf_log_normalizer(self.concentration, self.p) + self.concentration * (self.loc * value).sum(-1)

    def entropy(self) -> torch.Tensor:
        kappa = self.concentration
        return -vmf_log_normalizer(kappa, self.p) - kappa * vmf_mean_resultant(kappa, self.p)

    def _sample_w(self, shape: torch.Size, max_rounds: int = 64) -> torch.Tensor:
        """Wood's rejection sampler for w = mu . x (acceptance is high at every p and kappa)."""
        kappa = self.concentration.detach().expand(shape)
        m1 = self.p - 1.0
        # b = (-2 kappa + sqrt(4 kappa^2 + m1^2)) / m1, written without cancellation.
        b = m1 / (2 * kappa + torch.sqrt(4 * kappa * kappa + m1 * m1))
        x0 = (1 - b) / (1 + b)
        c = kappa * x0 + m1 * torch.log1p(-x0 * x0)
        beta = torch.distributions.Beta(torch.full_like(kappa, m1 / 2), torch.full_like(kappa, m1 / 2))
        w = torch.empty_like(kappa)
        done = torch.zeros_like(kappa, dtype=torch.bool)
        for _ in range(max_rounds):
            z = beta.sample()
            proposal = (1 - (1 + b) * z) / (1 - (1 - b) * z)
            u = torch.rand_like(kappa).clamp(min=torch.finfo(kappa.dtype).tiny)
            accept = (kappa * proposal + m1 * torch.log1p(-x0 * proposal) - c >= torch.log(u)) & ~done
            w = torch.where(accept, proposal, w)
            done = done | accept
            if bool(done.all()):
                return w
        raise RuntimeError("VonMisesFisher: the rejection sampler did not converge (non-finite concentration?)")

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        w = self._sample_w(shape[:-1]).unsqueeze(-1)
        # A uniform direction orthogonal to e1, then x = w e1 + sqrt(1 - w^2) v.
        v = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        v[..., 0] = 0
        v = v / v.norm(dim=-1, keepdim=True)
        x = torch.cat([w, torch.sqrt((1 - w) * (1 + w)) * v[..., 1:]], dim=-1)
        # Householder reflection taking e1 to loc.
        e1 = torch.zeros_like(self.loc)
        e1[..., 0] = 1
        u = e1 - self.loc
        u_norm = u.norm(dim=-1, keepdim=True)
        u = torch.where(u_norm > 1e-12, u / u_norm.clamp(min=1e-30), torch.zeros_like(u))
        return x - 2 * (x * u).sum(-1, keepdim=True) * u

    @classmethod
    def fit(cls, samples: torch.Tensor, iterations: int = 40) -> "VonMisesFisher":
        """Maximum-likelihood fit to unit vectors ``samples`` of shape (n, p):
        mu = mean / |mean|, kappa solves A_p(kappa) = |mean|."""
        if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.shape[0] < 1:
            raise ValueError("VonMisesFisher.fit: expected 'samples' to be a tensor of shape (n, p) with n >= 1")
        mean = samples.mean(dim=0)
        rbar = mean.norm()
        kappa = vmf_kappa_mle(rbar, samples.shape[1], iterations=iterations)
        return cls(mean / rbar, kappa)
