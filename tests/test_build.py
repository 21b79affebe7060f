"""The package's build information and the `python -m fastloss info` command."""

import subprocess
import sys

import torch

import fastloss


def test_build_info():
    info = fastloss.build_info()
    assert info["version"] == fastloss.__version__
    assert isinstance(info["cuda"], bool)
    assert info["num_threads"] == torch.get_num_threads()
    assert info["cpu_isa"]
    if info["cuda"]:
        assert info["cuda_archs"]


def test_ops_registered():
    for name in ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward"):
        assert hasattr(torch.ops.fastloss, name)


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastloss", "info"], capture_output=True, text=True, check=True)
    assert "CUDA kernels built" in out.stdout and fastloss.__version__ in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fastloss", "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
