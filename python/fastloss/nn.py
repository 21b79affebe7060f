"""``torch.nn.Module`` wrappers around fastloss ops."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .ops._guards import check_bool, check_dim
from .ops.linear_cross_entropy import check_options, linear_cross_entropy
from .ops.sinkhorn import check_kd_options, sinkhorn_kd_loss
from .ops.stat_topk import check_amount, check_mode, stat_topk


class StatTopK(torch.nn.Module):
    """Statistical top-k masking as a module: see :func:`fastloss.stat_topk`.

    Example: ``fastloss.nn.StatTopK(sparsity=0.95)(x)`` keeps about 5% of each row.
    """

    def __init__(self, *, sparsity: Optional[float] = None, k: Optional[int] = None, dim: int = -1,
                 mode: str = "soft", threshold_grad: bool = True):
        super().__init__()
        # Checked here rather than at the first forward (k < row length waits for the input).
        check_amount("nn.StatTopK", sparsity, k)
        if k is not None and k <= 0:
            raise ValueError(f"fastloss.nn.StatTopK: 'k' must be a positive int, got {k!r}")
        check_mode("nn.StatTopK", mode)
        self.sparsity: Optional[float] = sparsity
        self.k: Optional[int] = k
        self.dim: int = check_dim("nn.StatTopK", dim)
        self.mode: str = mode
        self.threshold_grad: bool = check_bool("nn.StatTopK", "threshold_grad", threshold_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` masked along ``dim``: a tensor of its shape and dtype."""
        return stat_topk(x, sparsity=self.sparsity, k=self.k, dim=self.dim, mode=self.mode,
                         threshold_grad=self.threshold_grad)

    def extra_repr(self) -> str:
        amount = f"sparsity={self.sparsity}" if self.sparsity is not None else f"k={self.k}"
        return f"{amount}, dim={self.dim}, mode={self.mode!r}, threshold_grad={self.threshold_grad}"


class SinkhornKDLoss(torch.nn.Module):
    """The SinKD distillation loss (Cui et al. 2024) as a module: see
    :func:`fastloss.sinkhorn_kd_loss`. ``forward(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 2.0, eps: float = 0.1, n_iter: int = 20, scale: float = 0.001):
        super().__init__()
        check_kd_options("nn.SinkhornKDLoss", temperature, eps, n_iter, scale)  # when built, not at the first call
        self.temperature = temperature
        self.eps = eps
        self.n_iter = n_iter
        self.scale = scale

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The loss (a 0-d tensor) of (B, C) student and teacher logits."""
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


class LinearCrossEntropy(torch.nn.Module):
    """Cut cross-entropy as a module: see :func:`fastloss.linear_cross_entropy`.

    ``fastloss.nn.LinearCrossEntropy(shift=True)(hidden, lm_head.weight, labels)`` is the
    causal-LM loss of ``hidden @ lm_head.weight.T`` without materializing the logits.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", softcap: Optional[float] = None,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, shift: bool = False,
                 filter_eps: Union[str, float, None] = "auto", process_group=None, deterministic: bool = False):
        super().__init__()
        # Checked when built, not at the first call.
        check_options(reduction, ignore_index, softcap, label_smoothing, z_loss, filter_eps, shift, process_group,
                      deterministic)
        self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap
        self.label_smoothing, self.z_loss, self.shift = label_smoothing, z_loss, shift
        self.filter_eps, self.process_group, self.deterministic = filter_eps, process_group, deterministic

    def forward(self, hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of ``hidden @ classifier.T (+ bias)`` against ``targets``: hidden (..., D),
        classifier (V, D), targets of hidden's leading shape; 0-d for reductions "mean" and
        "sum", per token for "none"."""
        return linear_cross_entropy(hidden, classifier, targets, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, softcap=self.softcap,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss, shift=self.shift,
                                    filter_eps=self.filter_eps, process_group=self.process_group,
                                    deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, softcap={self.softcap}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, shift={self.shift}, "
                f"filter_eps={self.filter_eps!r}, deterministic={self.deterministic}")
