"""When a wrapper may call its op through ``fastloss._C``'s direct entry point.

``torch.ops.fastloss.X(...)`` spends about 2 us in Python before it reaches the dispatcher,
more than the kernel itself on a small tensor; the direct entry points call the same
dispatcher entry from C++. They are used outside torch.compile (which must see the torch.ops
call) and only when no argument has ``__torch_function__`` handling, a tensor subclass or
an active TorchFunctionMode, which torch.ops calls honour and the direct calls would skip.
"""

from __future__ import annotations

import torch
from torch.overrides import has_torch_function


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and not has_torch_function(tensors)
