"""log I_v(x) and log K_v(x) (Plesner, Sorensen & Hauberg, ICS 2024): wrappers, fake kernels
and autograd (in v and in x) for ``torch.ops.fastloss.log_bessel_iv`` / ``log_bessel_kv``."""

from __future__ import annotations

import numbers
from typing import Tuple, Union

import torch

from .. import _C
from ._direct import direct_call_ok
from ._func import broadcast_front, derivative_function, transform_function, transforms_active
from ._guards import check_floating, check_same_device, check_tensor, check_value, layout_kind

Number = Union[int, float]
TensorOrNumber = Union[torch.Tensor, int, float]


_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _result_dtype(v: TensorOrNumber, x: TensorOrNumber) -> torch.dtype:
    """torch's promotion for two arguments of a float function, written out so that
    torch.compile traces it: floating tensors with dimensions win over 0-d ones, the wider
    floating dtype wins (float16 with bfloat16 gives float32), and anything else (numbers,
    integer or bool tensors) gives the default float dtype."""
    floats = [t for t in (v, x) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    if any(t.dim() > 0 for t in floats):
        floats = [t for t in floats if t.dim() > 0]
    if not floats:
        return torch.get_default_dtype()
    dtypes = {t.dtype for t in floats}
    if dtypes == {torch.float16, torch.bfloat16}:
        return torch.float32
    return max(dtypes, key=lambda d: _RANK.get(d, 3))


def _as_tensors(name: str, v: TensorOrNumber, x: TensorOrNumber) -> Tuple[torch.Tensor, torch.Tensor]:
    """Promote like torch.special: integers and bools to the default float dtype, Python
    numbers to the other argument's dtype and device; 0-d CPU tensors follow the other."""
    if (
        isinstance(v, torch.Tensor)
        and isinstance(x, torch.Tensor)
        and v.dtype == x.dtype
        and v.dtype.is_floating_point
        and v.device == x.device
        and layout_kind(v) is None
        and layout_kind(x) is None
    ):
        return v, x  # the common case, already promoted
    # A Python number beside a floating tensor takes its dtype and device (7.6 -> 1.4 us).
    # (Non-dense tensors go on to check_tensor's error.)
    if (isinstance(v, (float, int)) and isinstance(x, torch.Tensor) and x.dtype.is_floating_point
            and layout_kind(x) is None):
        return torch.scalar_tensor(v, dtype=x.dtype, device=x.device), x
    if (isinstance(x, (float, int)) and isinstance(v, torch.Tensor) and v.dtype.is_floating_point
            and layout_kind(v) is None):
        return v, torch.scalar_tensor(x, dtype=v.dtype, device=v.device)
    checked = []
    for arg, value in (("v", v), ("x", x)):
        if isinstance(value, torch.Tensor):
            check_tensor(name, arg, value)
            if value.is_complex():
                raise TypeError(f"fastloss.{name}: expected '{arg}' to be real, got {value.dtype}")
        elif isinstance(value, numbers.Real):
            # numpy and other real scalars count as Python numbers, as in torch.special.
            value = int(value) if isinstance(value, numbers.Integral) else float(value)
        else:
            raise TypeError(f"fastloss.{name}: expected '{arg}' to be a tensor or a real number, got "
                            f"{type(value).__name__}")
        checked.append(value)
    v, x = checked
    dtype = _result_dtype(v, x)
    tensors = [t for t in (v, x) if isinstance(t, torch.Tensor)]
    devices = {t.device for t in tensors if not (t.dim() == 0 and t.device.type == "cpu")}
    if len(devices) > 1:
        raise ValueError(f"fastloss.{name}: expected 'v' and 'x' on the same device, "
                         f"got {tensors[0].device} and {tensors[1].device}")
    device = devices.pop() if devices else (tensors[0].device if tensors else torch.device("cpu"))
    v = torch.as_tensor(v, dtype=dtype, device=device)
    x = torch.as_tensor(x, dtype=dtype, device=device)
    return v, x


def log_bessel_iv(v: TensorOrNumber, x: TensorOrNumber) -> torch.Tensor:
    """log I_v(x), the log of the modified Bessel function of the first kind.

    Elementwise, broadcasting ``v`` against ``x`` (either may be a tensor or a number).
    Accurate to about machine precision (relative; absolute where |log I| < 1) for v >= 0 and
    x >= 0 of any size, with the exact limits at x = 0 and x = inf; v < 0, x < 0 and NaN give
    NaN. float32 and float64 (float16 / bfloat16 computed in float32); differentiable twice in
    both ``v`` and ``x`` (d/dx log I_v(x) = v/x + I_(v+1)(x)/I_v(x)), each derivative from the
    same expansions as the value.
    """
    v, x = _as_tensors("log_bessel_iv", v, x)
    if transforms_active(v, x):
        return _TRANSFORM_FUNCTIONS["iv"].apply(v, x)
    if direct_call_ok(v, x):
        return _C.log_bessel_iv(v, x)
    return torch.ops.fastloss.log_bessel_iv.default(v, x)


def log_bessel_kv(v: TensorOrNumber, x: TensorOrNumber) -> torch.Tensor:
    """log K_v(x), the log of the modified Bessel function of the second kind.

    As :func:`log_bessel_iv`, for any real v (K_(-v) = K_v); x = 0 gives +inf, x < 0 NaN.
    d/dx log K_v(x) = v/x - K_(v+1)(x)/K_v(x).
    """
    v, x = _as_tensors("log_bessel_kv", v, x)
    if transforms_active(v, x):
        return _TRANSFORM_FUNCTIONS["kv"].apply(v, x)
    if direct_call_ok(v, x):
        return _C.log_bessel_kv(v, x)
    return torch.ops.fastloss.log_bessel_kv.default(v, x)


def _checked_shape(op: str, v: torch.Tensor, x: torch.Tensor):
    """The ops' checks (csrc/common/log_bessel_op.h); the broadcast shape."""
    check_floating(op, "v", v)
    check_floating(op, "x", x)
    check_value(v.dtype == x.dtype, op, f"expected 'v' and 'x' to have the same dtype, got {v.dtype} and {x.dtype}")
    check_same_device(op, x=x, v=v)
    try:
        return torch.broadcast_shapes(v.shape, x.shape)
    except RuntimeError:
        raise RuntimeError(f"fastloss.{op}: 'v' of shape {list(v.shape)} and 'x' of shape {list(x.shape)} do not "
                           "broadcast together") from None


def _forward_fake(op: str):
    return lambda v, x: x.new_empty(_checked_shape(op, v, x))


def _derivatives_fake(op: str, count: int):
    def fake(v: torch.Tensor, x: torch.Tensor):
        shape = _checked_shape(op, v, x)
        return tuple(x.new_empty(shape) for _ in range(count))
    return fake


for _name in ("log_bessel_iv", "log_bessel_kv"):
    torch.library.register_fake(f"fastloss::{_name}")(_forward_fake(_name))
    torch.library.register_fake(f"fastloss::{_name}_grad")(_derivatives_fake(f"{_name}_grad", 2))
    torch.library.register_fake(f"fastloss::{_name}_hess")(_derivatives_fake(f"{_name}_hess", 3))
# Autograd is registered in C++ (csrc/autograd.cpp); under torch.func transforms and forward-mode
# AD the wrappers use the functions below (see _func.py).


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.save_for_forward(*inputs)
    # Gradients and tangents that were never given stay None: as zeros they would meet infinite
    # derivatives (d/dv log I_0 at x = 0 is -inf) and give 0 * inf = NaN.
    ctx.set_materialize_grads(False)


def _weighted_sum(*pairs):
    """The sum of g * d over the pairs whose g is given (not None); None when none is."""
    terms = [g * d for g, d in pairs if g is not None]
    return None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _sum_to(t, like, needed):
    return t.sum_to_size(like.shape) if needed and t is not None else None


def _widened(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _make_grad_transform_function(name: str):
    """The transform function of the derivative op (d/dv, d/dx): its own derivatives are the
    second derivatives (d_vv, d_vx, d_xx); the second-derivative op has none."""
    grad_op = getattr(torch.ops.fastloss, f"{name}_grad").default
    hess_op = getattr(torch.ops.fastloss, f"{name}_hess").default
    hess_fn = derivative_function(f"{name}_hess", hess_op, f"fastloss.{name}",
                                  "a third derivative (jacrev of hessian, triple backward)")

    def backward(ctx, grad_dv, grad_dx):
        v, x = ctx.saved_tensors
        if grad_dv is None and grad_dx is None:
            return None, None
        d_vv, d_vx, d_xx = hess_fn.apply(v, x)
        return (_sum_to(_weighted_sum((grad_dv, d_vv), (grad_dx, d_vx)), v, ctx.needs_input_grad[0]),
                _sum_to(_weighted_sum((grad_dv, d_vx), (grad_dx, d_xx)), x, ctx.needs_input_grad[1]))

    def jvp(ctx, tangent_v, tangent_x):
        v, x = ctx.saved_tensors
        d_vv, d_vx, d_xx = hess_fn.apply(v, x)  # jvp runs only when v or x has a tangent
        return _weighted_sum((tangent_v, d_vv), (tangent_x, d_vx)), _weighted_sum((tangent_v, d_vx), (tangent_x, d_xx))

    return transform_function(f"{name}_grad", grad_op, _save_inputs, backward, jvp)


def _make_transform_function(kind: str):
    name = f"log_bessel_{kind}"
    op = getattr(torch.ops.fastloss, name).default
    grad_fn = _make_grad_transform_function(name)

    def backward(ctx, grad):
        v, x = ctx.saved_tensors
        if grad is None:
            return None, None
        # Half inputs: the derivatives in float32, rounded once with the gradient (as in C++;
        # also for the tangents below).
        d_dv, d_dx = grad_fn.apply(_widened(v), _widened(x))
        dv, dx = _sum_to(grad * d_dv, v, ctx.needs_input_grad[0]), _sum_to(grad * d_dx, x, ctx.needs_input_grad[1])
        return None if dv is None else dv.to(v.dtype), None if dx is None else dx.to(x.dtype)

    def jvp(ctx, tangent_v, tangent_x):
        v, x = ctx.saved_tensors
        d_dv, d_dx = grad_fn.apply(_widened(v), _widened(x))  # jvp runs only when v or x has a tangent
        return _weighted_sum((tangent_v, d_dv), (tangent_x, d_dx)).to(torch.promote_types(v.dtype, x.dtype))

    return transform_function(name, op, _save_inputs, backward, jvp)


_TRANSFORM_FUNCTIONS = {"iv": _make_transform_function("iv"), "kv": _make_transform_function("kv")}


def _elementwise_vmap(op):
    def rule(info, in_dims, v, x):
        out = op(*broadcast_front((v, x), in_dims))
        return out, (0,) * len(out) if isinstance(out, tuple) else 0
    return rule


for _name in ("log_bessel_iv", "log_bessel_kv", "log_bessel_iv_grad", "log_bessel_kv_grad", "log_bessel_iv_hess",
              "log_bessel_kv_hess"):
    torch.library.register_vmap(f"fastloss::{_name}")(_elementwise_vmap(getattr(torch.ops.fastloss, _name).default))
