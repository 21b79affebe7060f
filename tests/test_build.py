"""The package's build information and the `python -m fastloss info` command."""

import os
import subprocess
import sys

import pytest
import torch

import fastloss


def test_build_info():
    info = fastloss.build_info()
    assert info["version"] == fastloss.__version__
    assert isinstance(info["cuda"], bool)
    assert info["num_threads"] == torch.get_num_threads()
    assert info["cpu_isa"]
    # The log-Bessel pack unit follows the instruction set the CPU kernels run (tests may
    # select another with FASTLOSS_LOG_BESSEL_LANES, or FASTLOSS_CPU_AVX512=0).
    # (cpu_isa: the level, then its description.)
    isa_packs = {"x86-64-v4": "packs of 8 (AVX-512)", "x86-64-v3": "packs of 4 (AVX2)"}
    if "FASTLOSS_LOG_BESSEL_LANES" not in os.environ and "FASTLOSS_CPU_AVX512" not in os.environ:
        assert info["log_bessel_cpu"] == isa_packs.get(info["cpu_isa"].split(" ")[0], "scalar")
    # Cut cross-entropy's bfloat16 products need the CPU's AVX512-BF16 instructions.
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    path = info["linear_cross_entropy_cpu_bf16"]
    assert path in ("oneDNN brgemm (AVX512-BF16)", "oneDNN brgemm (AMX-BF16)", "none (no AVX512-BF16)",
                    "none (no oneDNN micro-kernel in this ATen)",
                    "none (oneDNN disabled: torch.backends.mkldnn.enabled)")
    assert "avx512_bf16" in flags or path.startswith("none")
    assert ("AMX" in path) <= ("amx_bf16" in flags)
    if info["cuda"]:
        assert info["cuda_archs"]


def test_ops_registered():
    for name in ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward"):
        assert hasattr(torch.ops.fastloss, name)


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastloss", "info"], capture_output=True, text=True, check=True)
    assert "CUDA kernels built" in out.stdout and fastloss.__version__ in out.stdout
    for argv in (["bogus"], ["info", "extra"]):
        bad = subprocess.run([sys.executable, "-m", "fastloss", *argv], capture_output=True, text=True)
        assert bad.returncode == 2 and "usage" in bad.stderr and not bad.stdout
    help_ = subprocess.run([sys.executable, "-m", "fastloss", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: python -m fastloss info")


def python_files_called(fn):
    """fn()'s result and the source files of the Python functions it called."""
    files = []

    def profile(frame, event, arg):
        if event == "call":
            files.append(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, files


@pytest.mark.parametrize("name", ["softmax", "log_bessel_iv", "sinkhorn_kd"])
def test_autograd_of_small_ops_runs_no_python(name):
    # These ops are called on small tensors, where a Python autograd registration (~30 us per
    # call) would cost more than the kernel: their autograd is in C++ (csrc/autograd.cpp).
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.rand(6, 5, generator=g, dtype=torch.float64) + 0.5
    calls = {
        "softmax": lambda: torch.ops.fastloss.softmax.default(a, -1, False),
        "log_bessel_iv": lambda: torch.ops.fastloss.log_bessel_iv.default(a, b),
        "sinkhorn_kd": lambda: torch.ops.fastloss.sinkhorn_kd.default(a, b, 2.0, 0.1, 5, 0.001)[0],
    }

    def forward_backward():
        out = calls[name]()
        return out, torch.autograd.grad(out.sum(), a)[0]

    (out, grad), files = python_files_called(forward_backward)
    assert grad.shape == a.shape and torch.isfinite(grad).all()
    # Files of torch.library's Python registrations and of the installed package (not this test
    # file, whose lambdas run too: a checkout path containing "fastloss" matched before).
    package = os.path.dirname(fastloss.__file__)
    python_autograd = [f for f in files if os.sep + "_library" + os.sep in f or f.startswith(package)]
    assert not python_autograd, python_autograd


DIRECT_CALLS = {
    "softmax": (lambda x: fastloss.softmax(x, -1), torch.ops.fastloss.softmax.default),
    "log_softmax": (lambda x: fastloss.log_softmax(x, 0), torch.ops.fastloss.log_softmax.default),
    "log_bessel_iv": (lambda x: fastloss.log_bessel_iv(x, x), torch.ops.fastloss.log_bessel_iv.default),
    "log_bessel_kv": (lambda x: fastloss.log_bessel_kv(x, x), torch.ops.fastloss.log_bessel_kv.default),
}


@pytest.mark.parametrize("name", list(DIRECT_CALLS))
def test_direct_calls_match_torch_ops_and_honour_torch_function(name):
    """These wrappers call fastloss._C's entry points instead of torch.ops (2 us less per call);
    the result and its gradient are the op's, and __torch_function__ handling (modes and
    subclasses), which torch.ops honours, still sees the op."""
    call, op = DIRECT_CALLS[name]
    x = (torch.rand(4, 7, dtype=torch.float64) + 0.1).requires_grad_()
    y, direct_files = python_files_called(lambda: call(x))
    assert not [f for f in direct_files if f.endswith("_ops.py")], "went through torch.ops"
    y_ref = op(*((x, x) if "bessel" in name else (x, -1 if name == "softmax" else 0, False)))
    assert torch.equal(y, y_ref)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    assert torch.equal(g, g_ref)

    class Record(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        assert torch.equal(call(x), y_ref)
    assert op in mode.seen

    class Logged(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    call(x.detach().as_subclass(Logged))
    assert op in Logged.seen


def test_import_under_another_torch_version_says_rebuild():
    """The extension links against one torch version: importing under another raises an
    ImportError that says to rebuild (it was an undefined-symbol error, or worse)."""
    code = "import torch; torch.__version__ = '0.0.1'; import fastloss"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "built against torch" in run.stderr and "rebuild" in run.stderr
    assert "--no-deps" in run.stderr  # else pip's reinstall would also replace torch, and again mismatch


def test_import_of_a_cuda_build_under_a_cpu_torch_says_rebuild():
    """An extension with CUDA kernels links torch's CUDA libraries, which a CPU torch of the
    same version lacks: a clear ImportError rather than a loader error."""
    code = ("import sys, types, torch; sys.modules['fastloss._build'] = types.SimpleNamespace("
            "TORCH_VERSION=torch.__version__, TORCH_CUDA='13.0'); torch.version.cuda = None; import fastloss")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "has no CUDA" in run.stderr and "rebuild" in run.stderr


@pytest.mark.parametrize("torch_cuda,refused", [("12.8", True), ("13.2", False)])
def test_import_of_a_cuda_build_under_another_cuda_major_says_rebuild(torch_cuda, refused):
    """The CUDA runtime library is versioned by its major: a build for CUDA 13 under a torch for
    CUDA 12 gets the ImportError; another minor of the same major imports."""
    code = ("import sys, types, torch; sys.modules['fastloss._build'] = types.SimpleNamespace("
            f"TORCH_VERSION=torch.__version__, TORCH_CUDA='13.0'); torch.version.cuda = '{torch_cuda}'; import fastloss")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    if refused:
        assert run.returncode != 0
        assert "ImportError" in run.stderr and "has CUDA 12.8" in run.stderr and "rebuild" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
