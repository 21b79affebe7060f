"""nn.Module wrappers around fastloss ops."""

from __future__ import annotations

import torch

from .ops.sinkhorn import sinkhorn_kd_loss


class SinkhornKDLoss(torch.nn.Module):
    """The SinKD distillation loss (Cui et al. 2024) as a module: see
    :func:`fastloss.sinkhorn_kd_loss`. ``forward(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 2.0, eps: float = 0.1, n_iter: int = 20, scale: float = 0.001):
        super().__init__()
        self.temperature = temperature
        self.eps = eps
        self.n_iter = n_iter
        self.scale = scale

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return sinkhorn_kd_loss(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            eps=self.eps,
            n_iter=self.n_iter,
            scale=self.scale,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, eps={self.eps}, n_iter={self.n_iter}, scale={self.scale}"
