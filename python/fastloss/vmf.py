"""von Mises-Fisher helpers on the unit sphere S^(p-1) in R^p, built on the log-Bessel
methods, so they work at any dimension (p = 32768 included) and concentration, without overflow:

    log C_p(kappa) = (p/2 - 1) log kappa - (p/2) log(2 pi) - log I_(p/2-1)(kappa)
    A_p(kappa)     = I_(p/2)(kappa) / I_(p/2-1)(kappa) = -d/dkappa log C_p(kappa)

log C_p, A_p and its derivatives, 1 - A_p, the entropy and the maximum-likelihood concentration
are C++/CUDA ops (torch.ops.fastloss.vmf_*, csrc/common/vmf_math.h); this module validates the
arguments and calls them.
"""

from __future__ import annotations

import numbers
from typing import Dict, Type, Union

import torch

from .ops._func import batch_front, transform_function, transforms_active
from .ops._guards import check_floating, check_same_device, check_tensor, check_value

TensorOrNumber = Union[torch.Tensor, float]


def _check_p(name: str, p) -> int:
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 2:
        raise ValueError(f"fastloss.{name}: expected the dimension 'p' to be an int >= 2, got {p!r}")
    return int(p)


def _as_float_tensor(name: str, arg: str, value: TensorOrNumber) -> torch.Tensor:
    """value as a float tensor: integers and bools promoted to the default dtype, as
    torch.special does; complex refused (casting would drop the imaginary part)."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"fastloss.{name}: expected '{arg}' to be a tensor or a number, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        check_tensor(name, arg, value)
    t = torch.as_tensor(value)
    if t.is_complex():
        raise TypeError(f"fastloss.{name}: expected '{arg}' to be real, got {t.dtype}")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _call(name: str, t: torch.Tensor, *args) -> torch.Tensor:
    if transforms_active(t):
        return _TRANSFORM_FUNCTIONS[name].apply(t, *args)
    return getattr(torch.ops.fastloss, name).default(t, *args)


def vmf_log_normalizer(kappa: TensorOrNumber, p: int) -> torch.Tensor:
    """log C_p(kappa), the log normalizing constant of the vMF density on S^(p-1) in R^p
    (differentiable in kappa three times: d/dkappa = -A_p(kappa), computed as A_p itself, not
    as nu / kappa - d/dkappa log I_nu(kappa), two terms that nearly cancel where A_p is small);
    kappa = 0 gives the uniform density's -log |S^(p-1)|, kappa = inf -inf, negative or NaN
    kappa NaN. Evaluated in float64 for every dtype; small kappa through the power series of
    I_nu, so no nu log kappa terms cancel."""
    p = _check_p("vmf_log_normalizer", p)
    kappa = _as_float_tensor("vmf_log_normalizer", "kappa", kappa)
    return _call("vmf_log_normalizer", kappa, p)


def _mean_resultant(kappa: torch.Tensor, p: int, derivative: int = 0) -> torch.Tensor:
    """A_p(kappa) or its first or second derivative (differentiable up to A_p''), any kappa:
    negative and NaN give NaN."""
    return _call("vmf_mean_resultant", kappa, p, derivative)


def vmf_mean_resultant(kappa: TensorOrNumber, p: int) -> torch.Tensor:
    """A_p(kappa) = I_(p/2)(kappa) / I_(p/2-1)(kappa), the mean resultant length E[mu . x]
    (differentiable in kappa, twice, also at kappa = 0), to a few ulps at any p and kappa, and
    its derivatives to ~1e-14 relative (computed in float64 for every dtype)."""
    p = _check_p("vmf_mean_resultant", p)
    return _mean_resultant(_as_float_tensor("vmf_mean_resultant", "kappa", kappa), p)


def _mean_resultant_slope(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """A_p'(kappa), the variance of mu . x (1 / p at kappa = 0)."""
    return _mean_resultant(kappa, p, 1)


def _mean_resultant_complement(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """1 - A_p(kappa) to full relative precision (1 - A itself loses it as A -> 1)."""
    return _call("vmf_mean_resultant_complement", kappa, p)


def _vmf_entropy(kappa: torch.Tensor, p: int) -> torch.Tensor:
    """-log C_p(kappa) - kappa A_p(kappa), differentiable (-kappa A_p'). Both terms grow like
    kappa: the op sums the expansion in which they cancel exactly, so the entropy keeps its
    precision at any kappa (the plain difference is 0 at kappa = 1e18, p = 3)."""
    return _call("vmf_entropy", kappa, p)


def vmf_kappa_mle(rbar: TensorOrNumber, p: int, iterations: int = 10) -> torch.Tensor:
    """The maximum-likelihood concentration: the root of A_p(kappa) = rbar, 0 <= rbar < 1
    (NaN outside), differentiable in rbar (d kappa / d rbar = 1 / A_p'(kappa)).

    Newton's method from Banerjee et al.'s start rbar (p - rbar^2) / (1 - rbar^2), kept inside
    Sra's bracket [rbar (p-2), rbar p] / (1 - rbar^2) (a step that leaves the bracket bisects
    it), in float64 for every dtype, one element per thread, no host sync. A_p is increasing
    and concave, so the steps converge from either side; each element stops once A_p(kappa)
    is within rounding of rbar (at most 5 steps for 99.7% of rbar uniform in (0.01, 0.99) at
    p = 3, 64, 2048), and ``iterations`` (an int in [1, 1000], default 10) bounds them.
    """
    p = _check_p("vmf_kappa_mle", p)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or not 1 <= iterations <= 1000:
        raise ValueError(f"fastloss.vmf_kappa_mle: expected 'iterations' to be an int in [1, 1000], got {iterations!r}")
    rbar = _as_float_tensor("vmf_kappa_mle", "rbar", rbar)
    return _call("vmf_kappa_mle", rbar, p, int(iterations))


def _check_op_args(op: str, arg: str, t: torch.Tensor, p: int) -> None:
    """The ops' checks of every vMF op's tensor and p (csrc/common/vmf_op.h)."""
    check_floating(op, arg, t)
    check_value(p >= 2, op, f"expected the dimension 'p' to be >= 2, got {p}", ValueError)


def _elementwise_fake(name: str, arg: str):
    def fake(t: torch.Tensor, p: int, *extra) -> torch.Tensor:
        # The ops check their extra argument first (`derivative`, `iterations`).
        if name == "vmf_mean_resultant" and extra:
            check_value(0 <= extra[0] <= 2, name, f"expected 'derivative' to be 0, 1 or 2, got {extra[0]}", ValueError)
        if name == "vmf_kappa_mle" and extra:
            check_value(1 <= extra[0] <= 1000, name, f"expected 'iterations' in [1, 1000], got {extra[0]}", ValueError)
        _check_op_args(name, arg, t, p)
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return fake


@torch.library.register_fake("fastloss::vmf_sample_w_derivative")
def _sample_w_derivative_fake(w: torch.Tensor, kappa: torch.Tensor, p: int) -> torch.Tensor:
    op = "vmf_sample_w_derivative"
    _check_op_args(op, "w", w, p)
    check_floating(op, "kappa", kappa)
    torch._check_value(w.shape == kappa.shape, lambda: f"fastloss.{op}: expected 'w' and 'kappa' of one shape, got "
                       f"{tuple(w.shape)} and {tuple(kappa.shape)}")
    check_value(w.dtype == kappa.dtype, op, f"expected 'w' and 'kappa' of one dtype, got {w.dtype} and {kappa.dtype}",
                ValueError)
    check_same_device(op, w=w, kappa=kappa)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _sample_w_derivative_backward(ctx, grad):
    raise NotImplementedError("fastloss.vmf_sample_w_derivative: the derivative of dw/dkappa is not implemented (it is "
                              "rsample's reparameterization gradient, a constant of the backward)")


torch.library.register_autograd("fastloss::vmf_sample_w_derivative", _sample_w_derivative_backward,
                                setup_context=lambda ctx, inputs, output: None)


@torch.library.register_vmap("fastloss::vmf_sample_w_derivative")
def _sample_w_derivative_vmap(info, in_dims, w, kappa, p):
    w, kappa = (batch_front(t, d, info.batch_size) for t, d in zip((w, kappa), in_dims))
    return torch.ops.fastloss.vmf_sample_w_derivative.default(w, kappa, p), 0


for _name, _arg in (("vmf_mean_resultant", "kappa"), ("vmf_mean_resultant_complement", "kappa"),
                    ("vmf_entropy", "kappa"), ("vmf_log_normalizer", "kappa"), ("vmf_kappa_mle", "rbar")):
    torch.library.register_fake(f"fastloss::{_name}")(_elementwise_fake(_name, _arg))
# Autograd is registered in C++ (csrc/autograd.cpp); under torch.func transforms and forward-mode
# AD the wrappers use the functions below (see ops/_func.py), with the same derivatives.


def _slope(kappa: torch.Tensor, p: int) -> torch.Tensor:
    return _TRANSFORM_FUNCTIONS["vmf_mean_resultant"].apply(kappa, p, 1)


def _mean_resultant_derivative(kappa, p, derivative):
    if derivative >= 2:
        raise NotImplementedError("fastloss.vmf_mean_resultant: the third derivative of A_p is not implemented "
                                  "(A_p, A_p' and A_p'' are differentiable up to there)")
    return _TRANSFORM_FUNCTIONS["vmf_mean_resultant"].apply(kappa, p, derivative + 1)


def _entropy_derivative(kappa, p):
    # -kappa A_p', as the C++ backward forms it: in float64, and its limit -(p - 1) / (2 kappa)
    # from kappa = 2^500 (A_p' underflows float32 from kappa ~ 1e19, float64 from ~1e154).
    k64 = kappa.double()
    far = k64 > 2.0**500
    return -torch.where(far, 0.5 * (p - 1) / k64, k64 * _slope(k64, p)).to(kappa.dtype)


# name -> (derivative in the op's tensor argument, whether that derivative is a function of
# the op's output rather than its input)
_DERIVATIVES = {
    "vmf_mean_resultant": (_mean_resultant_derivative, False),
    "vmf_mean_resultant_complement": (lambda kappa, p: -_slope(kappa, p), False),
    "vmf_entropy": (_entropy_derivative, False),
    "vmf_log_normalizer": (lambda kappa, p: -_TRANSFORM_FUNCTIONS["vmf_mean_resultant"].apply(kappa, p, 0), False),
    "vmf_kappa_mle": (lambda kappa, p, _iterations: 1 / _slope(kappa, p), True),  # implicit function theorem
}


def _make_transform_function(name: str):
    derivative, of_output = _DERIVATIVES[name]

    def setup(ctx, inputs, output):
        ctx.args = inputs[1:]
        saved = output if of_output else inputs[0]
        ctx.save_for_backward(saved)
        ctx.save_for_forward(saved)

    def backward(ctx, grad):
        return (grad * derivative(ctx.saved_tensors[0], *ctx.args),) + (None,) * len(ctx.args)

    def jvp(ctx, tangent, *_args):
        return tangent * derivative(ctx.saved_tensors[0], *ctx.args)

    return transform_function(name, getattr(torch.ops.fastloss, name).default, setup, backward, jvp)


_TRANSFORM_FUNCTIONS: Dict[str, Type[torch.autograd.Function]] = {
    name: _make_transform_function(name) for name in _DERIVATIVES
}


def _elementwise_vmap(op):
    def rule(info, in_dims, t, *args):
        return op(t, *args), in_dims[0]
    return rule


for _name in _DERIVATIVES:
    torch.library.register_vmap(f"fastloss::{_name}")(_elementwise_vmap(getattr(torch.ops.fastloss, _name).default))
