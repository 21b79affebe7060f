"""Backward ops whose own derivative fastloss does not implement.

Without an autograd kernel, torch runs such an op under autograd when a gradient is taken with
``create_graph=True``: it then warns and treats the op as constant, so a second derivative is
silently wrong (or, where the kernel calls out= ops, the first one fails with a confusing
error). Registering an autograd kernel whose backward raises makes first derivatives with
``create_graph=True`` work and a second derivative fail with a clear message.
"""

import torch


def forbid_double_backward(op: str, public_name: str) -> None:
    """Registers an autograd kernel for ``fastloss::op`` whose backward raises."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{public_name}: a second derivative (double backward) is not implemented; first derivatives "
            "with create_graph=True work, but their graph ends at fastloss's backward")

    torch.library.register_autograd(f"fastloss::{op}", backward, setup_context=setup_context)


class _Refuse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, message, *tensors):
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(ctx.message)


def refuse_second_derivative(public_name: str, case: str, *tensors):
    """The tensors (None stays None), as inputs of a backward computation that has no derivative
    in this case: while a graph is being recorded (create_graph=True), differentiating through
    them raises, instead of giving a wrong second derivative."""
    present = [t for t in tensors if t is not None]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in present):
        return tensors
    message = (f"{public_name}: a second derivative (double backward) is not implemented {case}; first "
               "derivatives with create_graph=True work, but their graph ends at fastloss's backward")
    refused = iter(_Refuse.apply(message, *present))
    return tuple(None if t is None else next(refused) for t in tensors)
