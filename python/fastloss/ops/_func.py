"""torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, jvp, vmap) and forward-mode AD.

On the eager path fastloss differentiates through autograd kernels written in C++
(csrc/autograd.cpp) or registered with ``torch.library.register_autograd``; torch.func's grad
and jvp transforms accept neither, and neither has a forward-mode rule. So while a transform is
running, or an argument carries a forward-mode tangent, a wrapper calls its op through a
``torch.autograd.Function`` built by :func:`transform_function` instead: it has a
``setup_context``, a backward written with functions that are themselves transformable, a
``jvp`` where the op has one, and a vmap rule that torch generates from the ops' batching rules
(registered with ``torch.library.register_vmap`` next to each op). Outside transforms nothing
here runs but :func:`transforms_active`.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Type

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._C import _get_dispatch_mode, _TorchDispatchModeKey
from torch._subclasses.fake_tensor import FakeTensor

from ._guards import wrap_dim


def _has_tangent(tensors) -> bool:
    if fwAD._current_level < 0:
        return False
    if torch.compiler.is_compiling():
        # Traced values carry no tangents, but the compiled code will run on the dual tensors
        # (torch.compile of torch ops keeps forward AD): with a forward-AD level open, assume
        # they do (the transform path then breaks the graph and runs eagerly).
        return True
    return any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _running_transforms() -> list:
    """The kinds of the running torch.func transforms (none outside them)."""
    if not torch._C._are_functorch_transforms_active():
        return []
    return [i.key() for i in retrieve_all_functorch_interpreters()]


def transforms_active(*tensors) -> bool:
    """Whether a torch.func transform is running or an argument is a forward-AD dual tensor:
    then the op must go through its transform function. (torch.compile folds the first test
    to a constant, so torch.compile(torch.func.grad(f)) takes the transform path too.)"""
    if torch._C._are_functorch_transforms_active():
        if torch.compiler.is_compiling():
            return True
        keys = set(_running_transforms())
        # torch.func.functionalize has no rule for autograd.Function, and needs none: the ops
        # do not mutate their inputs. Under vmap alone the ops' own batching rules serve,
        # without the Function's layers (~0.3 ms per call), unless autograd records the call.
        if keys <= {TransformType.Vmap, TransformType.Functionalize}:
            recorded = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
            return recorded or _has_tangent(tensors)
        return True
    return fwAD._current_level >= 0 and _has_tangent(tensors)


def all_true(t: torch.Tensor) -> bool:
    """Whether every entry of a bool tensor is true, for a loop's stopping test, also inside
    torch.func transforms: under vmap the test reads the tensor under the batching wrappers
    (every batch entry at once), where bool() of the batched tensor would raise."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return bool(t.all())


def vmap_active() -> bool:
    """Whether a torch.func.vmap transform is running (values cannot be branched on)."""
    return TransformType.Vmap in _running_transforms()


# The dispatch modes that trace rather than run: fake tensors, make_fx's proxies, functionalization.
_TRACING_MODES = (_TorchDispatchModeKey.FAKE, _TorchDispatchModeKey.PROXY, _TorchDispatchModeKey.FUNCTIONAL)


def host_values_readable(*tensors: torch.Tensor) -> bool:
    """Whether an eager check may read these tensors' values on the host: CPU tensors, and not
    while torch.compile traces, under vmap (batched values), with fake tensors, or while
    make_fx or functionalization traces the calls (a read is a data-dependent branch there).
    Eager dispatch modes (FlopCounterMode, selective checkpointing) keep the checks."""
    return (all(t.device.type == "cpu" and not isinstance(t, FakeTensor) for t in tensors)
            and not torch.compiler.is_compiling() and not vmap_active()
            and all(_get_dispatch_mode(key) is None for key in _TRACING_MODES))


def forbid_transforms(op: str, case: str, *tensors) -> None:
    """For a case without transform rules (``case`` says which): a clear error under torch.func
    transforms and with forward-AD dual tensors, where torch's own error would not name the op
    (or, for forward AD through a Python autograd registration, torch would drop the tangents
    and return zero derivatives without a word)."""
    active = any(key != TransformType.Functionalize for key in _running_transforms())
    if active or _has_tangent(tensors):
        raise NotImplementedError(
            f"fastloss.{op}: torch.func transforms and forward-mode AD are not supported {case}; use reverse "
            "mode (loss.backward() or torch.autograd.grad)")


def no_derivative(public_name: str, what: str) -> Callable:
    """A backward or jvp that raises: the function has no derivative of this order here."""

    def raise_not_implemented(ctx, *args):
        raise NotImplementedError(f"{public_name}: {what} is not implemented")

    return raise_not_implemented


SECOND_DERIVATIVE = "a second derivative (hessian, jacrev of jacrev, double backward)"


def derivative_function(name: str, op, public_name: str, what: str = SECOND_DERIVATIVE) -> Type[torch.autograd.Function]:
    """The transform function of a backward (derivative) op without a derivative of its own:
    differentiating it, in either mode, raises."""
    refuse = no_derivative(public_name, what)
    return transform_function(name, op, lambda ctx, inputs, output: None, refuse, refuse)


# torch.autograd.Function.apply, called with the class first: a classmethod's function up to
# torch 2.14, a C classmethod descriptor (no __func__; callable so) from 2.15.
_FUNCTION_APPLY = inspect.getattr_static(torch.autograd.Function, "apply")
_FUNCTION_APPLY = getattr(_FUNCTION_APPLY, "__func__", _FUNCTION_APPLY)


def transform_function(name: str, op, setup_context: Callable, backward: Callable,
                       jvp: Optional[Callable] = None) -> Type[torch.autograd.Function]:
    """A torch.autograd.Function that calls ``op`` below autograd, for use under transforms.
    ``backward`` and ``jvp`` must call only transformable functions (other transform functions
    and torch ops), so that the transforms nest (jacrev(jacrev), hessian, vmap(grad))."""

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def nested_forward_mode() -> bool:
        return _running_transforms().count(TransformType.Jvp) > 1

    nested_forward_mode_error = (
        f"fastloss.{name}: nested forward-mode AD (jacfwd(jacfwd(f)), jvp of jvp) is not supported; for second "
        "derivatives use jacfwd(jacrev(f)) (torch.func.hessian) or jacrev(jacrev(f))")

    def checked_jvp(ctx, *tangents):
        # torch.autograd.Function's jvp rule sees its saved tensors without an enclosing
        # forward-mode level's tangents, so forward over forward would be silently wrong.
        if nested_forward_mode():
            raise NotImplementedError(nested_forward_mode_error)
        return jvp(ctx, *tangents)

    def checked_apply(cls, *args):
        # Without a jvp rule, nested forward mode through the function (not merely inside
        # it: its arguments may carry no tangent) fails in torch's generated vmap rule, an
        # AssertionError, before the rule that raises is reached.
        try:
            return _FUNCTION_APPLY(cls, *args)
        except AssertionError as e:
            if nested_forward_mode():
                raise NotImplementedError(nested_forward_mode_error) from e
            raise

    return type(name, (torch.autograd.Function,), {
        **({} if jvp else {"apply": classmethod(checked_apply)}),
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(checked_jvp if jvp else no_derivative(f"fastloss.{name}", "forward-mode AD (jvp, jacfwd)")),
    })


# --------------------------------------------------------------------------------------------
# Batching-rule helpers: the rules move the vmapped dimension of every argument to the front.


def batch_front(t: Optional[torch.Tensor], bdim: Optional[int], batch_size: int) -> Optional[torch.Tensor]:
    """``t`` with its batch dimension first; an unbatched tensor is expanded (a view)."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(batch_size, *t.shape)
    return t.movedim(bdim, 0)


def batched_dim(op: str, dim: int, logical_rank: int) -> int:
    """The physical dimension of logical ``dim`` once the batch dimension is first (0-d rows
    have been made (B, 1) by the caller); IndexError like the op's for a bad dim."""
    return wrap_dim(op, dim, logical_rank) + 1


def batch_rows(op: str, tensors: Sequence[Optional[torch.Tensor]], in_dims, batch_size: int, dim: int):
    """A row op's tensor arguments (rows along logical ``dim``) with the batch dimension first,
    and the physical dim of the rows. 0-d rows are made (B, 1); then the third result is True
    and the op's results need :func:`squeeze_rows`."""
    tensors = [batch_front(t, d, batch_size) for t, d in zip(tensors, in_dims)]
    rank = max(t.dim() for t in tensors if t is not None) - 1
    physical = batched_dim(op, dim, rank)
    if rank == 0:
        tensors = [None if t is None else t.unsqueeze(1) for t in tensors]
    return tensors, physical, rank == 0


def squeeze_rows(out):
    """A row op's results for 0-d rows (see :func:`batch_rows`)."""
    return tuple(o.squeeze(1) for o in out) if isinstance(out, tuple) else out.squeeze(1)


def row_rule(op, name: str, n_tensors: int) -> Callable:
    """The batching rule of a row op whose first ``n_tensors`` arguments are tensors (or None)
    with rows along the ``dim`` that follows them: the batch goes in front, ``dim`` moves past
    it, and the results are batched in front."""

    def rule(info, in_dims, *args, **kwargs):
        tensors, rest = args[:n_tensors], list(args[n_tensors:])
        dim = rest.pop(0) if rest else kwargs.pop("dim")
        tensors, d, zero_d = batch_rows(name, tensors, in_dims[:n_tensors], info.batch_size, dim)
        out = op(*tensors, d, *rest, **kwargs)
        if zero_d:
            out = squeeze_rows(out)
        return out, ((0,) * len(out) if isinstance(out, tuple) else 0)

    return rule


def broadcast_front(tensors: Sequence[torch.Tensor], in_dims: Sequence[Optional[int]]):
    """Elementwise arguments with their batch dimension first and the logical dimensions
    right-aligned, so that the op's own broadcasting lines them up: a batched tensor of lower
    logical rank gets size-1 dimensions after the batch dimension; unbatched ones stay."""
    rank = max(t.dim() - (d is not None) for t, d in zip(tensors, in_dims))
    out = []
    for t, d in zip(tensors, in_dims):
        if d is not None:
            t = t.movedim(d, 0)
            t = t.reshape(t.shape[0], *([1] * (rank + 1 - t.dim())), *t.shape[1:])
        out.append(t)
    return out


def loop_rule(op) -> Callable:
    """A batching rule that calls ``op`` once per batch entry and stacks the results: for the
    ops whose batch cannot be folded into their own dimensions (what torch's fallback does,
    without its warning)."""

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            return _empty_batch(op, in_dims, args)
        results = []
        for i in range(info.batch_size):
            # (in_dims mirrors the arguments: a list argument has a list of Nones)
            results.append(op(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims))))
        if isinstance(results[0], tuple):
            return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
        return torch.stack(results), 0

    return rule


def _empty_batch(op, in_dims, args):
    """A loop rule's results for a batch of none: one call's shapes and dtypes from the op's
    fake kernel (on meta tensors), with a batch dimension of size 0."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))

    def meta(a, d):
        if not isinstance(a, torch.Tensor):
            return a
        shape = a.shape[:d] + a.shape[d + 1:] if isinstance(d, int) else a.shape
        return torch.empty(shape, dtype=a.dtype, device="meta")

    out = op(*(meta(a, d) for a, d in zip(args, in_dims)))
    outs = out if isinstance(out, tuple) else (out,)
    empty = tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in outs)
    return (empty, (0,) * len(empty)) if isinstance(out, tuple) else (empty[0], 0)
