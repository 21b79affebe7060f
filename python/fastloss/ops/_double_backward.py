"""Backward computations whose own derivative fastloss does not implement.

Differentiating through them (a gradient taken with ``create_graph=True``, then differentiated
again) must raise, not treat them as constants: that would make the second derivative
silently wrong.
"""

import torch


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
