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
