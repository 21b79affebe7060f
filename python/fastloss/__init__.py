"""fastloss: fast, accurate C++/CUDA kernels for losses, normalizations and special functions.

Every kernel is a PyTorch custom op under ``torch.ops.fastloss`` with autograd, fake (meta)
kernels for torch.compile, and a typed Python wrapper re-exported here.
"""

from typing import Any, Dict

import torch  # noqa: F401  (loads torch's shared libraries before the extension)


def _check_torch_version() -> None:
    """_C links against the torch it was built with: under another version it fails to load
    (an undefined symbol) or misbehaves. Say so plainly (a source checkout has no _build.py)."""
    try:
        from . import _build
    except ImportError:
        return
    built, built_cuda = _build.TORCH_VERSION, getattr(_build, "TORCH_CUDA", "")
    rebuild = ("rebuild it against this torch (pip install --no-build-isolation --no-deps --force-reinstall "
               "<fastloss source>)")
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(f"fastloss was built against torch {built}, but torch {torch.__version__} is installed: "
                          f"{rebuild}")
    if not built_cuda:
        return
    torch_cuda = torch.version.cuda
    if torch_cuda is None:
        raise ImportError(f"fastloss was built with CUDA kernels against torch {built} (CUDA {built_cuda}), but "
                          f"torch {torch.__version__} has no CUDA: {rebuild}")
    # The CUDA runtime's soname carries the major version only: another minor loads and runs
    # (CUDA's minor-version compatibility), another major is a loader error.
    if built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        raise ImportError(f"fastloss was built with CUDA kernels against torch {built} (CUDA {built_cuda}), but "
                          f"torch {torch.__version__} has CUDA {torch_cuda}: {rebuild}")


_check_torch_version()

from . import _C  # noqa: E402, F401  (registers torch.ops.fastloss.*)
from .ops.log_bessel import log_bessel_iv, log_bessel_kv
from .ops.softmax import log_softmax, softmax
from .ops.stat_topk import stat_topk, stat_topk_gelu_mul
from .ops.sinkhorn import SinkhornResult, sinkhorn, sinkhorn_cost, sinkhorn_kd_loss
from .ops.linear_cross_entropy import linear_cross_entropy
from . import nn  # noqa: E402  (nn.Module wrappers)
from .vmf import vmf_kappa_mle, vmf_log_normalizer, vmf_mean_resultant
from . import distributions  # noqa: F401  (fastloss.distributions.VonMisesFisher)

__version__: str = _C.build_info()["version"]


def build_info() -> Dict[str, Any]:
    """How this build was configured and what it runs here: ``version``, ``cuda`` (whether the
    CUDA kernels are built), ``cuda_archs``, ``cpu_isa`` (the CPU kernels' instruction set on
    this machine), ``log_bessel_cpu`` and ``linear_cross_entropy_cpu_bf16`` (the paths those
    kernels take here), ``num_threads`` and ``parallel_backend`` (torch's thread settings)."""
    return dict(_C.build_info())


__all__ = ["softmax", "log_softmax", "stat_topk", "stat_topk_gelu_mul", "sinkhorn", "sinkhorn_cost",
           "sinkhorn_kd_loss", "SinkhornResult", "log_bessel_iv", "log_bessel_kv", "vmf_log_normalizer",
           "vmf_mean_resultant", "vmf_kappa_mle", "distributions", "linear_cross_entropy", "nn", "build_info",
           "__version__"]
