"""Cut cross-entropy (Wijmans et al., ICLR 2025): the LM head fused with cross-entropy.
Wrapper, fake kernels and autograd for ``torch.ops.fastloss.linear_cross_entropy``, and the
vocabulary-parallel variant over a ``torch.distributed`` process group."""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
from typing import List, Literal, Optional, Tuple, Union, overload

import torch

from . import _lce_derivatives as lce_derivatives
from ._double_backward import refuse_second_derivative
from ._func import (batch_front, forbid_transforms, host_values_readable, loop_rule, transform_function,
                    transforms_active)
from ._guards import (check_bool, check_dtype, check_floating, check_same_device, check_shape, check_tensor,
                      check_value)

_REDUCTIONS = ("mean", "sum", "none")


def _check_real(arg: str, v, low: float, high: float, interval: str) -> float:
    """A float with low <= v <= high; `interval` is how the error states the allowed range."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fastloss.linear_cross_entropy: '{arg}' must be a float, got {type(v).__name__}")
    v = float(v)
    if not low <= v <= high:
        raise ValueError(f"fastloss.linear_cross_entropy: '{arg}' must be {interval}, got {v}")
    return v


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float:
    """``"auto"``: finfo(dtype).eps / 32 (2^-12 for bfloat16); None or 0: no filtering."""
    if filter_eps is None:
        return 0.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"fastloss.linear_cross_entropy: 'filter_eps' must be 'auto', None or a float in "
                             f"[0, 1), got {filter_eps!r}")
        return torch.finfo(dtype).eps / 32 if dtype.is_floating_point else 0.0
    return _check_real("filter_eps", filter_eps, 0.0, math.nextafter(1.0, 0.0), "in [0, 1)")


def check_process_group(process_group) -> None:
    if (torch.distributed.is_available() and isinstance(process_group, int)
            and process_group == torch.distributed.GroupMember.NON_GROUP_MEMBER):
        raise ValueError("fastloss.linear_cross_entropy: this rank is not a member of 'process_group' (new_group "
                         "returns that marker to ranks outside the group): call it only on the group's ranks")
    if not (torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup)):
        raise TypeError("fastloss.linear_cross_entropy: 'process_group' must be a torch.distributed "
                        f"ProcessGroup or None, got {type(process_group).__name__}")


def check_options(reduction, ignore_index, softcap, label_smoothing, z_loss, filter_eps, shift, process_group,
                  deterministic):
    """The non-tensor options, checked (also by nn.LinearCrossEntropy when built); returns the
    softcap (0: none), label_smoothing and z_loss as floats, shift and deterministic as bools."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastloss.linear_cross_entropy: 'reduction' must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    # cut-cross-entropy's shift=1 / 0 (an int there): anything else must be a bool.
    if isinstance(shift, numbers.Integral) and not isinstance(shift, bool) and shift in (0, 1):
        shift = bool(shift)
    shift = check_bool("linear_cross_entropy", "shift", shift)
    deterministic = check_bool("linear_cross_entropy", "deterministic", deterministic)
    if process_group is not None:
        check_process_group(process_group)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"fastloss.linear_cross_entropy: 'ignore_index' must be an int, got "
                        f"{type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"fastloss.linear_cross_entropy: 'ignore_index' must fit in int64, got {ignore_index}")
    cap = 0.0
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 < float(softcap) < float("inf"):
            raise ValueError(f"fastloss.linear_cross_entropy: 'softcap' must be a finite float > 0 or None, "
                             f"got {softcap!r}")
        cap = float(softcap)
    label_smoothing = _check_real("label_smoothing", label_smoothing, 0.0, 1.0, "in [0, 1]")
    # Comparisons rather than math.isfinite, which breaks torch.compile's graph; NaN fails them.
    z_loss = _check_real("z_loss", z_loss, -sys.float_info.max, sys.float_info.max, "a finite float")
    resolve_filter_eps(filter_eps, torch.float32)  # its form; the value depends on the dtype
    return cap, label_smoothing, z_loss, shift, deterministic


def _autocast(hidden: torch.Tensor, classifier: torch.Tensor, bias: Optional[torch.Tensor]):
    """Under ``torch.autocast`` the LM head runs in the autocast dtype, as ``F.linear`` would
    (float64 stays float64, like autocast's own casts); the cast is differentiable, so
    gradients reach float32 master weights in float32."""
    device_type = hidden.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # meta has no autocast
        return hidden, classifier, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.dtype == dtype:
            return t
        return t.to(dtype)

    return cast(hidden), cast(classifier), cast(bias)


def _check_unshifted_targets(targets: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """With shift=True the op checks the shifted targets, so its error would name position i for
    the user's i + 1: the user's tensor is checked first (eager, CPU)."""
    t = targets.long()
    predicted = torch.arange(t.shape[-1], device=t.device) > 0  # the first position of each sequence is nobody's target
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab)) & predicted
    if bool(bad.any()):
        flat = int(bad.flatten().nonzero()[0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), targets.shape))
        raise IndexError(f"fastloss.linear_cross_entropy: 'targets' must be in [0, {vocab}) or equal ignore_index "
                         f"({ignore_index}), got {int(targets[index])} at position {flat} (index {index})")


def _shift_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # Position t predicts token t + 1; the last position has nothing to predict. int32 targets
    # cannot hold an ignore_index beyond int32 (their comparison with it is done in int64).
    if targets.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31:
        targets = targets.long()
    # Rolled and masked rather than sliced and concatenated: the slice of T - 1 entries put a
    # guard on T that export with a dynamic sequence length refused.
    last = torch.arange(targets.shape[-1], device=targets.device) == targets.shape[-1] - 1
    return torch.where(last, ignore_index, targets.roll(-1, -1))


@overload
def linear_cross_entropy(hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = ..., *, ignore_index: int = ..., reduction: str = ...,
                         softcap: Optional[float] = ..., label_smoothing: float = ..., z_loss: float = ...,
                         shift: bool = ..., filter_eps: Union[str, float, None] = ...,
                         return_lse: Literal[False] = ..., process_group=..., deterministic: bool = ...
                         ) -> torch.Tensor: ...
@overload
def linear_cross_entropy(hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = ..., *, ignore_index: int = ..., reduction: str = ...,
                         softcap: Optional[float] = ..., label_smoothing: float = ..., z_loss: float = ...,
                         shift: bool = ..., filter_eps: Union[str, float, None] = ...,
                         return_lse: Literal[True], process_group=..., deterministic: bool = ...
                         ) -> Tuple[torch.Tensor, torch.Tensor]: ...
@overload
def linear_cross_entropy(hidden: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = ..., *, ignore_index: int = ..., reduction: str = ...,
                         softcap: Optional[float] = ..., label_smoothing: float = ..., z_loss: float = ...,
                         shift: bool = ..., filter_eps: Union[str, float, None] = ...,
                         return_lse: bool = ..., process_group=..., deterministic: bool = ...
                         ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]: ...
def linear_cross_entropy(
    hidden: torch.Tensor,
    classifier: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: bool = False,
    filter_eps: Union[str, float, None] = "auto",
    return_lse: bool = False,
    process_group=None,
    deterministic: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Cross-entropy of ``softcap(hidden @ classifier.T + bias)`` against ``targets`` without
    materializing the logits (cut cross-entropy): the vocabulary is processed in blocks whose
    log-sum-exp is merged online, and the backward recomputes each block.

    Args:
        hidden: (..., D) float32, float64, float16 or bfloat16 embeddings, any strides.
        classifier: (V, D) in hidden's dtype (the LM head's weight). With ``process_group``, this
            rank's contiguous slice of the vocabulary (rank order).
        targets: int64 or int32 of hidden's leading shape, in [0, V) or ``ignore_index``.
        bias: optional (V,) in hidden's dtype.
        ignore_index: targets with this value contribute no loss and no gradient.
        reduction: ``"mean"`` (over non-ignored tokens; 0 when every token is ignored),
            ``"sum"`` or ``"none"`` (per-token losses of hidden's leading shape, 0 at ignored
            tokens).
        softcap: ``s`` for ``s * tanh(logits / s)`` (Gemma 2's final_logit_softcapping).
        label_smoothing: as in ``F.cross_entropy``.
        z_loss: adds ``z_loss * lse**2`` per non-ignored token.
        shift: position t predicts ``targets[..., t + 1]`` (causal LM labels); the last position
            of the last leading dimension is ignored.
        filter_eps: the backward skips a (tokens x vocabulary) tile in which every entry of the
            logit gradient is below ``filter_eps`` times its token's output-gradient scale
            (for plain cross-entropy: every probability below ``filter_eps``, no target in the
            tile). Tiles: 1024 x 512 on the CPU, 128 x 128 in the CUDA tensor-core backward (the
            CUDA cuBLAS path does not filter). ``"auto"``: ``finfo(hidden.dtype).eps / 32``; None
            or 0: exact gradients. With ``label_smoothing`` > 0 nothing is skipped (every entry
            then carries ``-label_smoothing / V``: each is tiny, their sum is not). The skipped
            entries are each small, not their sum: near-uniform softmaxes (an LM head at
            initialization) lose more gradient accuracy than trained, peaked ones.
        return_lse: also return the per-token log-sum-exp (hidden's leading shape, 0 at
            ignored tokens); gradients flow through it.
        process_group: vocabulary-parallel training: the ranks of this ``torch.distributed``
            group each hold a slice of the classifier (and bias); hidden and targets are the
            same on every rank. The loss and d hidden are all-reduced; d classifier is this
            rank's slice.
        deterministic: bitwise-reproducible gradients. The CPU always is; on CUDA the float16 /
            bfloat16 tensor-core backward adds tile products into float32 buffers with atomics
            (last bits vary between runs), and ``deterministic=True`` (or
            ``torch.use_deterministic_algorithms(True)``) runs the fixed-order blocked cuBLAS
            backward instead (float32 matmuls: slower, no ``filter_eps`` skipping).

    Returns the loss in float32 (float64 for float64 inputs), and the LSE if ``return_lse``.

    Under ``torch.autocast``, hidden, classifier and bias are first cast to the autocast dtype
    (float64 excepted), as ``F.linear`` would cast them.

    CUDA: float16 and bfloat16 inputs whose D is a multiple of 8 run hand-written tensor-core
    kernels (mma.sync, float32 accumulation; the logits stay in registers, the backward
    recomputes them tile by tile); other dtypes and shapes run cuBLAS matmuls plus ATen ops per
    1024-row vocabulary block.

    Targets outside ``[0, V)`` that are not ``ignore_index``: IndexError naming the position on
    the CPU; on CUDA an asynchronous device-side assert (no host synchronization), and the
    tensor-core kernels write NaN for that token's loss and LSE (so its gradients are NaN).
    """
    if process_group is not None:
        check_process_group(process_group)  # (a rank that cannot reach the group cannot tell it of errors)
    refused = None
    try:
        prepared = _prepare(hidden, classifier, targets, bias, ignore_index, reduction, softcap, label_smoothing,
                            z_loss, shift, filter_eps, return_lse, process_group, deterministic)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        # (Under a torch.func transform, NotImplementedError: every rank raises it alike, and no
        # collective could run there.)
        if process_group is None or isinstance(error, NotImplementedError):
            raise
        refused = error
    if refused is not None:
        # Vocab-parallel, refused before the first all-reduce: the other ranks learn of it there
        # (one rank raising alone would leave them waiting in it until the collective's
        # timeout). _vocab_range raises it here, outside the except clause: its own traceback.
        device = hidden.device if isinstance(hidden, torch.Tensor) else _group_device(process_group)
        _vocab_range(None, process_group, device, refused)
    h2, classifier, t1, bias, lead, cap, label_smoothing, z_loss, shift, eps, return_lse, deterministic = prepared
    if process_group is None:
        args = (h2, classifier, t1, bias, int(ignore_index), cap, label_smoothing, z_loss, eps, deterministic)
        if transforms_active(h2, classifier, bias):
            loss, lse = _TRANSFORM_FN.apply(*args)
        else:
            loss, lse = torch.ops.fastloss.linear_cross_entropy.default(*args)
    else:
        # What every rank must agree on (checked in the first all-reduce: _vocab_range).
        signature = (h2.shape[0], h2.shape[1], str(h2.dtype), bias is not None, int(ignore_index), reduction, cap,
                     label_smoothing, z_loss, shift, eps)
        loss, lse = _VocabParallel.apply(h2, classifier, t1, bias, int(ignore_index), cap, label_smoothing, z_loss,
                                         eps, process_group, deterministic, signature)
    if reduction == "none":
        loss = loss.view(lead)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        # Compared in int64: int32 targets against an ignore_index beyond int32 would wrap.
        count = (t1.long() != ignore_index).sum().clamp(min=1)
        loss = loss.sum() / count
    if return_lse:
        return loss, lse.view(lead)
    return loss


def _group_device(group) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _prepare(hidden, classifier, targets, bias, ignore_index, reduction, softcap, label_smoothing, z_loss, shift,
             filter_eps, return_lse, process_group, deterministic):
    """The checked arguments, hidden and targets flattened to (tokens, D) and (tokens,)."""
    check_tensor("linear_cross_entropy", "hidden", hidden)
    check_tensor("linear_cross_entropy", "classifier", classifier)
    check_tensor("linear_cross_entropy", "targets", targets)
    if bias is not None:
        check_tensor("linear_cross_entropy", "bias", bias)
    cap, label_smoothing, z_loss, shift, deterministic = check_options(
        reduction, ignore_index, softcap, label_smoothing, z_loss, filter_eps, shift, process_group, deterministic)
    return_lse = check_bool("linear_cross_entropy", "return_lse", return_lse)
    if hidden.dim() < 1:
        raise ValueError("fastloss.linear_cross_entropy: 'hidden' must have at least one dimension (D)")
    lead = hidden.shape[:-1]
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"fastloss.linear_cross_entropy: 'targets' must have hidden's leading shape "
                         f"{tuple(lead)}, got {tuple(targets.shape)}")
    if process_group is not None:
        forbid_transforms("linear_cross_entropy", "with a process_group (vocabulary-parallel)", hidden, classifier,
                          bias)
    hidden, classifier, bias = _autocast(hidden, classifier, bias)
    eps = resolve_filter_eps(filter_eps, hidden.dtype)
    if shift:
        if hidden.dim() < 2:
            raise ValueError("fastloss.linear_cross_entropy: 'shift' needs hidden of shape (..., T, D)")
        if process_group is None and host_values_readable(targets):
            _check_unshifted_targets(targets, ignore_index, classifier.shape[0])
        targets = _shift_targets(targets, ignore_index)
    tokens = 1
    for size in lead:
        tokens *= size
    h2 = hidden.reshape(tokens, hidden.shape[-1])  # (-1, D) is ambiguous when D = 0
    t1 = targets.reshape(tokens)
    return h2, classifier, t1, bias, lead, cap, label_smoothing, z_loss, shift, eps, return_lse, deterministic


# --------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only)


def _check_args(op, hidden, classifier, targets, bias, softcap, label_smoothing, z_loss, vocab_start=0,
                vocab_total=-1, allow_empty=False):
    """The ops' argument checks (csrc/common/linear_cross_entropy_op.h); allow_empty admits a
    classifier without rows (a rank's empty vocabulary slice)."""
    check_floating(op, "hidden", hidden)
    check_value(hidden.dim() == 2, op, f"'hidden' must be 2-d (tokens, D), got {hidden.dim()}-d of shape "
                f"{tuple(hidden.shape)}")
    n, d = hidden.shape
    check_value(classifier.dim() == 2, op, f"'classifier' must be (V, D), got shape {tuple(classifier.shape)}")
    check_shape(op, "classifier", classifier, (classifier.shape[0], d), f"(V, {d}) (D: the last dimension of 'hidden')")
    check_value(classifier.dtype == hidden.dtype, op,
                f"'classifier' must have the dtype of 'hidden' ({hidden.dtype}), got {classifier.dtype}")
    check_value(targets.dtype in (torch.int64, torch.int32), op,
                f"'targets' must be an int64 or int32 tensor, got {targets.dtype}")
    check_shape(op, "targets", targets, (n,), f"({n},) (one per row of 'hidden')")
    vocab = classifier.shape[0]
    if bias is not None:
        check_shape(op, "bias", bias, (vocab,), f"({vocab},) (one per row of 'classifier')")
        check_value(bias.dtype == hidden.dtype, op, f"'bias' must have the dtype of 'hidden' ({hidden.dtype}), "
                    f"got {bias.dtype}")
    check_value(math.isfinite(softcap) and softcap >= 0.0, op,
                f"'softcap' must be a finite value > 0 (or 0 for no cap), got {softcap}")
    f32 = torch.finfo(torch.float32)
    check_value(hidden.dtype == torch.float64 or softcap == 0.0 or f32.tiny <= softcap <= f32.max, op,
                f"'softcap' must be a normal float32 value ({f32.tiny} to {f32.max}) for {hidden.dtype} 'hidden' "
                f"(applied in float32), got {softcap}")
    check_value(0.0 <= label_smoothing <= 1.0, op, f"'label_smoothing' must be in [0, 1], got {label_smoothing}")
    check_value(math.isfinite(z_loss), op, f"'z_loss' must be finite, got {z_loss}")
    torch._check(allow_empty or vocab > 0, lambda: f"fastloss.{op}: 'classifier' must have at least one row, got "
                 f"shape {tuple(classifier.shape)}")
    total = vocab if vocab_total < 0 else vocab_total
    torch._check(vocab_start >= 0, lambda: f"fastloss.{op}: 'vocab_start' must be >= 0, got {vocab_start}")
    torch._check(vocab_start + vocab <= total, lambda: f"fastloss.{op}: the classifier's {vocab} rows from "
                 f"'vocab_start' = {vocab_start} must lie in the vocabulary [0, {total}) ('vocab_total')")


def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastloss::linear_cross_entropy")
def _forward_fake(hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss, filter_eps,
                  deterministic=False):
    _check_args("linear_cross_entropy", hidden, classifier, targets, bias, softcap, label_smoothing, z_loss)
    check_same_device("linear_cross_entropy", hidden=hidden, classifier=classifier, targets=targets, bias=bias)
    check_value(0.0 <= filter_eps < 1.0, "linear_cross_entropy",
                f"'filter_eps' must be in [0, 1) (0: no filtering), got {filter_eps}")
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=_acc_dtype(hidden)), hidden.new_empty((n,), dtype=_acc_dtype(hidden))


@torch.library.register_fake("fastloss::linear_cross_entropy_shard")
def _shard_fake(hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, vocab_start, vocab_total):
    _check_args("linear_cross_entropy_shard", hidden, classifier, targets, bias, softcap, label_smoothing, 0.0,
                vocab_start, vocab_total)
    check_same_device("linear_cross_entropy_shard", hidden=hidden, classifier=classifier, targets=targets, bias=bias)
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=_acc_dtype(hidden)), hidden.new_empty((n,), dtype=_acc_dtype(hidden))


@torch.library.register_fake("fastloss::linear_cross_entropy_backward")
def _backward_fake(grad_loss, grad_lse, hidden, classifier, targets, bias, lse, ignore_index, softcap,
                   label_smoothing, z_loss, filter_eps, output_mask, vocab_start=0, vocab_total=-1,
                   deterministic=False):
    op = "linear_cross_entropy_backward"
    _check_args(op, hidden, classifier, targets, bias, softcap, label_smoothing, z_loss, vocab_start, vocab_total)
    n, acc = hidden.shape[0], _acc_dtype(hidden)
    for arg, t in (("grad_loss", grad_loss), ("grad_lse", grad_lse), ("lse", lse)):
        if t is not None:
            check_shape(op, arg, t, (n,), f"({n},)")
            check_dtype(op, arg, t, acc)
    check_value(0.0 <= filter_eps < 1.0, op, f"'filter_eps' must be in [0, 1) (0: no filtering), got {filter_eps}")
    check_same_device(op, hidden=hidden, classifier=classifier, targets=targets, bias=bias, lse=lse,
                      grad_loss=grad_loss, grad_lse=grad_lse)
    # Gradients not asked for (and d bias without a bias) are empty.
    dh = hidden.new_empty(hidden.shape if output_mask[0] else (0,))
    dc = classifier.new_empty(classifier.shape if output_mask[1] else (0,))
    dbias = (bias.new_empty(bias.shape if output_mask[2] else (0,)) if bias is not None
             else hidden.new_empty((0,)))
    return dh, dc, dbias


# --------------------------------------------------------------------------------------------
# Autograd: linear_cross_entropy has a C++ autograd kernel (csrc/autograd.cpp: the Python
# registration ran ~45 us forward and ~60 us backward per call); _setup serves its
# transform function below.


def _setup(ctx, inputs, output):
    hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss, filter_eps = inputs[:9]
    deterministic = inputs[9] if len(inputs) > 9 else False
    _loss, lse = output
    ctx.options = (ignore_index, softcap, label_smoothing, z_loss, filter_eps, deterministic)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, classifier, targets, bias, lse)


def _shard_setup(ctx, inputs, output):
    hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, vocab_start, vocab_total = inputs
    ctx.options = (ignore_index, softcap, label_smoothing, vocab_start, vocab_total)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, classifier, targets, bias, output[0])


def _shard_backward(ctx, grad_lse_local, grad_linear):
    # The backward op differentiates lse + linear (z_loss 0) with probabilities exp(logit - lse):
    # given the shard's own LSE, g_linear * d linear + g_lse * d lse_local is that derivative
    # weighted by g_linear, plus (g_lse - g_linear) * d lse_local.
    hidden, classifier, targets, bias, lse_local = ctx.saved_tensors
    ignore_index, softcap, label_smoothing, vocab_start, vocab_total = ctx.options
    zeros = torch.zeros_like(lse_local)
    g_lin = zeros if grad_linear is None else grad_linear.to(lse_local.dtype)
    g_lse = (zeros if grad_lse_local is None else grad_lse_local.to(lse_local.dtype)) - g_lin
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
    dh, dc, db = torch.ops.fastloss.linear_cross_entropy_backward.default(
        g_lin.contiguous(), g_lse.contiguous(), hidden, classifier, targets, bias, lse_local, ignore_index, softcap,
        label_smoothing, 0.0, 0.0, mask, vocab_start, vocab_total)
    return (dh if mask[0] else None), (dc if mask[1] else None), None, (db if mask[2] else None), None, None, None, \
        None, None


# Without an autograd kernel, inputs requiring grad reached the kernel's matmuls into
# preallocated outputs, which refused them.
torch.library.register_autograd("fastloss::linear_cross_entropy_shard", _shard_backward, setup_context=_shard_setup)


# The backward op's own derivative (double backward, Hessian-vector products): blockwise torch
# ops (_lce_derivatives.py).


def _mask_bits(mask) -> int:
    return sum(int(m) << i for i, m in enumerate(mask))


def _backward_op_setup(ctx, inputs, output):
    grad_loss, grad_lse, hidden, classifier, targets, bias, lse, ignore_index, softcap, label_smoothing, z_loss = \
        inputs[:11]
    output_mask = inputs[12]
    vocab_start = inputs[13] if len(inputs) > 13 else 0
    vocab_total = inputs[14] if len(inputs) > 14 else -1
    ctx.opt = lce_derivatives.Options(ignore_index, softcap, label_smoothing, z_loss, vocab_start, vocab_total)
    ctx.mask = [bool(output_mask & 1 << i) for i in range(3)] if isinstance(output_mask, int) else list(output_mask)
    ctx.save_for_backward(grad_loss, grad_lse, hidden, classifier, targets, bias, lse)
    ctx.save_for_forward(grad_loss, grad_lse, hidden, classifier, targets, bias, lse)  # for _BACKWARD_FN's jvp


def _backward_op_backward(ctx, u_h, u_c, u_b):
    grad_loss, grad_lse, hidden, classifier, targets, bias, lse = ctx.saved_tensors
    d_g, d_gl, d_h, d_c, d_b, d_lse = lce_derivatives.backward_vjp(
        (u_h, u_c, u_b), grad_loss, grad_lse, hidden, classifier, targets, bias, lse, ctx.opt, ctx.mask)
    return (d_g, d_gl, d_h, d_c, None, d_b, d_lse) + (None,) * 9


def _backward_op_jvp(ctx, t_g, t_gl, t_h, t_c, _t_targets, t_b, t_lse, *_options):
    grad_loss, grad_lse, hidden, classifier, targets, bias, lse = ctx.saved_tensors
    return lce_derivatives.backward_jvp((grad_loss, grad_lse, hidden, classifier, bias, lse),
                                        (t_g, t_gl, t_h, t_c, t_b, t_lse), targets, ctx.opt, ctx.mask)


torch.library.register_autograd("fastloss::linear_cross_entropy_backward", _backward_op_backward,
                                setup_context=_backward_op_setup)


# --------------------------------------------------------------------------------------------
# torch.func transforms (see _func.py): reverse mode through the same backward op, forward mode
# and the backward op's derivatives blockwise (_lce_derivatives.py). A batch of token sets
# folds into the tokens when the classifier is shared.


def _transform_setup(ctx, inputs, output):
    _setup(ctx, inputs, output)
    hidden, classifier, targets, bias = inputs[:4]
    ctx.save_for_forward(hidden, classifier, targets, bias, output[1])


def _forward_jvp(ctx, t_hidden, t_classifier, _t_targets, t_bias, *_options):
    hidden, classifier, targets, bias, lse = ctx.saved_tensors
    ignore_index, softcap, label_smoothing, z_loss = ctx.options[:4]
    opt = lce_derivatives.Options(ignore_index, softcap, label_smoothing, z_loss, 0, -1)
    return lce_derivatives.forward_jvp(hidden, classifier, targets, bias, lse, (t_hidden, t_classifier, t_bias), opt)


def _transform_backward(ctx, grad_loss, grad_lse):
    hidden, classifier, targets, bias, lse = ctx.saved_tensors
    ignore_index, softcap, label_smoothing, z_loss, filter_eps, deterministic = ctx.options
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
    dh, dc, db = _BACKWARD_FN.apply(
        grad_loss.to(lse.dtype), None if grad_lse is None else grad_lse.to(lse.dtype), hidden, classifier, targets,
        bias, lse, ignore_index,
        softcap, label_smoothing, z_loss, filter_eps, _mask_bits(mask), 0, -1, deterministic)
    return (dh if mask[0] else None), (dc if mask[1] else None), None, (db if mask[2] else None), None, None, None, \
        None, None, None


def _backward_op_bits(*args):
    """The backward op with its output_mask as bits of an int: under vmap, torch's rule for a
    Function's jvp counts a list argument as several inputs (hessian failed)."""
    bits = args[12]
    return torch.ops.fastloss.linear_cross_entropy_backward.default(
        *args[:12], [bool(bits & 1), bool(bits & 2), bool(bits & 4)], *args[13:])


_BACKWARD_FN = transform_function("linear_cross_entropy_backward", _backward_op_bits, _backward_op_setup,
                                  _backward_op_backward, _backward_op_jvp)
_TRANSFORM_FN = transform_function("linear_cross_entropy", torch.ops.fastloss.linear_cross_entropy.default,
                                   _transform_setup, _transform_backward, _forward_jvp)

_FORWARD_LOOP = loop_rule(torch.ops.fastloss.linear_cross_entropy.default)
_BACKWARD_LOOP = loop_rule(torch.ops.fastloss.linear_cross_entropy_backward.default)


@torch.library.register_vmap("fastloss::linear_cross_entropy")
def _forward_vmap(info, in_dims, hidden, classifier, targets, bias, *options):
    if in_dims[1] is not None or in_dims[3] is not None:  # a classifier (or bias) per batch entry
        return _FORWARD_LOOP(info, in_dims, hidden, classifier, targets, bias, *options)
    h = batch_front(hidden, in_dims[0], info.batch_size)
    t = batch_front(targets, in_dims[2], info.batch_size)
    loss, lse = torch.ops.fastloss.linear_cross_entropy.default(
        h.reshape(-1, h.shape[-1]), classifier, t.reshape(-1), bias, *options)
    return (loss.view(t.shape), lse.view(t.shape)), (0, 0)


@torch.library.register_vmap("fastloss::linear_cross_entropy_backward")
def _backward_vmap(info, in_dims, grad_loss, grad_lse, hidden, classifier, targets, bias, lse, *options):
    mask = options[5]
    if mask[1] or mask[2] or in_dims[3] is not None or in_dims[5] is not None:
        # d classifier per batch entry, or a classifier per batch entry: one call each.
        return _BACKWARD_LOOP(info, in_dims, grad_loss, grad_lse, hidden, classifier, targets, bias, lse, *options)
    h = batch_front(hidden, in_dims[2], info.batch_size)
    tokens = h.shape[:-1]
    flat = [None if t is None else batch_front(t, d, info.batch_size).reshape(-1)
            for t, d in zip((grad_loss, grad_lse, targets, lse), (in_dims[0], in_dims[1], in_dims[4], in_dims[6]))]
    dh, dc, db = torch.ops.fastloss.linear_cross_entropy_backward.default(
        flat[0], flat[1], h.reshape(-1, h.shape[-1]), classifier, flat[2], bias, flat[3], *options)
    batch = info.batch_size
    return (dh.view(*tokens, h.shape[-1]), dc.expand(batch, *dc.shape), db.expand(batch, *db.shape)), (0, 0, 0)


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel (Megatron-style): each rank holds a contiguous slice of the classifier.


@torch.compiler.disable  # (the checks' torch._check messages break graphs and recompile per shape)
def _local_error(hidden, classifier, targets, bias, softcap, label_smoothing) -> Optional[Exception]:
    """This rank's argument error (the shard op's checks, which would come after the first
    all-reduce), or None."""
    op = "linear_cross_entropy"
    try:
        _check_args(op, hidden, classifier, targets, bias, softcap, label_smoothing, 0.0, allow_empty=True)
        check_same_device(op, hidden=hidden, classifier=classifier, targets=targets, bias=bias)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        return error
    return None


def _signature_hash(signature) -> int:
    """A 40-bit hash of the arguments every rank must agree on (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=5).digest(), "little")


# The targets' hash: modulo the prime 2^31 - 1, each position's value times its own nonzero
# multiplier, so that any one changed target (by less than the prime) changes it.
_HASH_PRIME = 2**31 - 1


def _targets_hash(targets: torch.Tensor) -> torch.Tensor:
    """The hash of the target values, on their device (no host synchronization)."""
    t = targets.reshape(-1).long()
    multiplier = 1 + torch.arange(t.numel(), device=t.device, dtype=torch.int64) * 48271 % (_HASH_PRIME - 1)
    return (t % _HASH_PRIME * multiplier % _HASH_PRIME).sum() % _HASH_PRIME


def _vocab_range(classifier: Optional[torch.Tensor], group, hidden_device: torch.device,
                 local_error: Optional[BaseException] = None, signature=None,
                 targets: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """(first vocabulary row of this rank, vocabulary size), from every rank's slice size.

    One all-reduce of world_size + 3 int64s per call (and a host synchronization to read it).
    Not cached: a rank cannot tell from its own slice whether the others' changed (two heads
    split differently over one group), and ranks that disagreed on whether to gather would
    deadlock. The next entry counts the ranks with a local_error: every rank raises then (one
    raising alone would leave the others waiting in the next all-reduce). The last sums a hash
    of each rank's `signature`: unless every rank sees world x its own, they disagree (a
    different token count or dtype crashed gloo in a later all-reduce; different options gave
    a loss that mixed them), and every rank raises. The last but one sums a hash of the target
    values (their dtype and count are in the signature): ranks given different targets (a
    data loader sharded by rank rather than by data-parallel group) would sum one token's
    target logit from one rank with another token's normalizer from another, silently."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # Each rank's size in its own entry, summed over the ranks.
    sizes_t = torch.zeros(world + 3, dtype=torch.int64, device=hidden_device)
    sizes_t[rank] = 0 if local_error is not None or classifier is None else classifier.shape[0]
    sizes_t[world] = local_error is not None
    own_hash = 0 if local_error is not None else _signature_hash(signature)
    sizes_t[world + 1] = own_hash
    own_targets_hash = sizes_t.new_zeros(())
    if local_error is None and targets is not None:
        own_targets_hash = _targets_hash(targets).to(sizes_t.device)
        sizes_t[world + 2] = own_targets_hash
    dist.all_reduce(sizes_t, group=group)
    sizes: List[int] = torch.cat([sizes_t, own_targets_hash.view(1)]).tolist()  # one host synchronization
    own_targets = sizes.pop()
    targets_sum = sizes.pop()
    hash_sum = sizes.pop()
    failed = sizes.pop()
    if local_error is not None:
        raise local_error
    if failed:
        raise RuntimeError(f"fastloss.linear_cross_entropy: {failed} other rank(s) of the process group refused "
                           "their arguments (their errors say why)")
    if hash_sum != world * own_hash:
        tokens, dim, dtype, has_bias, ignore_index, reduction, cap, ls, zl, shift, eps = signature
        raise RuntimeError(
            "fastloss.linear_cross_entropy: the ranks of the process group disagree on arguments that must match "
            "on every rank (hidden's token count, last dim and dtype, whether there is a bias, ignore_index, "
            "reduction, softcap, label_smoothing, z_loss, shift, filter_eps); this rank has "
            f"{tokens} tokens, D={dim}, {dtype}, bias={has_bias}, ignore_index={ignore_index}, "
            f"reduction={reduction!r}, softcap={cap or None}, label_smoothing={ls}, z_loss={zl}, shift={shift}, "
            f"filter_eps={eps}")
    if targets_sum != world * own_targets:
        raise RuntimeError("fastloss.linear_cross_entropy: the ranks of the process group hold different target "
                           "values; vocabulary-parallel ranks must see the same tokens and targets (their hidden "
                           "states and targets, shards of the vocabulary only in the classifier and bias)")
    if sum(sizes) == 0:
        raise ValueError("fastloss.linear_cross_entropy: the classifier slices of the process group hold no "
                         "vocabulary rows")
    return sum(sizes[:rank]), sum(sizes)


def _check_shard_targets(targets: torch.Tensor, ignore_index: int, vocab_total: int) -> None:
    """The shard op's target check, for a rank whose slice is empty and skips the op: every rank
    must raise alike, or the others would wait in the all-reduce."""
    t = targets.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab_total))
    message = (f"fastloss.linear_cross_entropy: 'targets' must be in [0, {vocab_total}) or equal ignore_index "
               f"({ignore_index})")
    if host_values_readable(t):
        if bool(bad.any()):
            flat = int(bad.nonzero()[0])
            raise IndexError(f"{message}, got {int(t[flat])} at position {flat} of the flattened targets (the "
                             f"caller's position {flat + 1} if called with shift=True, which passes them shifted)")
    else:
        torch._assert_async(~bad.any(), message + " (device-side check)")


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, z_loss, filter_eps,
                group, deterministic, signature):
        import torch.distributed as dist

        vocab_start, vocab_total = _vocab_range(
            classifier, group, hidden.device, _local_error(hidden, classifier, targets, bias, softcap, label_smoothing),
            signature, targets)
        if classifier.shape[0] > 0:
            lse_local, linear = torch.ops.fastloss.linear_cross_entropy_shard.default(
                hidden, classifier, targets, bias, ignore_index, softcap, label_smoothing, vocab_start, vocab_total)
        else:  # an empty slice: no exponentials (LSE -inf), no target or smoothing terms
            _check_shard_targets(targets, ignore_index, vocab_total)
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            lse_local = hidden.new_full(targets.shape, float("-inf"), dtype=acc)
            linear = hidden.new_zeros(targets.shape, dtype=acc)
        # The whole vocabulary's LSE from the shards': max, then the sum of rescaled exponentials.
        shift = lse_local.clone()
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        total = torch.exp(lse_local - shift)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(linear, op=dist.ReduceOp.SUM, group=group)
        active = targets.long() != ignore_index
        lse = torch.where(active, shift + torch.log(total), torch.zeros_like(shift))
        loss = torch.where(active, lse + z_loss * lse * lse + linear, torch.zeros_like(lse))
        ctx.options = (ignore_index, softcap, label_smoothing, z_loss, filter_eps, vocab_start, vocab_total,
                       deterministic)
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, classifier, targets, bias, lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        import torch.distributed as dist

        hidden, classifier, targets, bias, lse = ctx.saved_tensors
        ignore_index, softcap, label_smoothing, z_loss, filter_eps, vocab_start, vocab_total, deterministic = ctx.options
        # The all-reduce below is not differentiable.
        hidden, classifier, bias, lse, grad_loss, grad_lse = refuse_second_derivative(
            "fastloss.linear_cross_entropy", "with a process_group", hidden, classifier, bias, lse, grad_loss, grad_lse)
        if classifier.shape[0] > 0:
            dh, dc, db = torch.ops.fastloss.linear_cross_entropy_backward.default(
                grad_loss.to(lse.dtype).contiguous(),
                None if grad_lse is None else grad_lse.to(lse.dtype).contiguous(),
                hidden, classifier, targets, bias, lse, ignore_index, softcap, label_smoothing, z_loss, filter_eps,
                [True, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]], vocab_start, vocab_total,
                deterministic)
        else:
            dh, dc, db = torch.zeros_like(hidden), torch.zeros_like(classifier), \
                None if bias is None else torch.zeros_like(bias)
        # Every rank takes part in the all-reduce, whichever gradients it needs.
        try:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        except RuntimeError as e:
            # A batched backward (autograd.grad(is_grads_batched=True), a vectorized jacobian)
            # runs this under vmap, which has no rule for the all-reduce; torch's error would
            # not name the op.
            if "Batching rule not implemented" not in str(e):
                raise
            raise NotImplementedError(
                "fastloss.linear_cross_entropy: batched backward passes (is_grads_batched=True, a vectorized "
                "jacobian) are not supported with a process_group; take the gradients one at a time") from e
        return (dh if ctx.needs_input_grad[0] else None), (dc if ctx.needs_input_grad[1] else None), None, \
            (db if ctx.has_bias and ctx.needs_input_grad[3] else None), None, None, None, None, None, None, None, None
