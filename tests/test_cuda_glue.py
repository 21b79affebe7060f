"""The CUDA torch glue (csrc/cuda/*.cpp) compiles even where torch has no CUDA.

The build compiles the glue only against a CUDA build of torch, so a machine with a CPU torch
(CI) would otherwise first see a glue compile error on a GPU machine. torch's CPU wheel ships
the ATen/c10 CUDA headers; the toolkit supplies the runtime headers, and nothing else: the glue
must not need the cuBLAS, cuSPARSE or cuSOLVER headers (ATen/cuda/CUDAContext.h includes them),
which a toolkit assembled from pip packages lacks.
"""

import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension

import fastloss

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
GLUE = sorted((CSRC / "cuda").glob("*.cpp"))


def _cuda_include():
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(pathlib.Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        inc = pathlib.Path(root) / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


CUDA_INCLUDE = _cuda_include()
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CUDA_INCLUDE is None or CXX is None, reason="needs the CUDA toolkit headers and a C++ compiler")
@pytest.mark.skipif(fastloss.build_info()["cuda"], reason="the build itself compiled the CUDA glue")
@pytest.mark.parametrize("source", GLUE, ids=[p.stem for p in GLUE])
def test_cuda_glue_compiles(source):
    includes = [f"-I{CSRC}"]
    for inc in [*torch.utils.cpp_extension.include_paths(), CUDA_INCLUDE, sysconfig.get_paths()["include"]]:
        includes += ["-isystem", str(inc)]
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DFASTLOSS_WITH_CUDA=1", *includes, str(source)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-6000:]
    ours = [line for line in out.stderr.splitlines() if "warning" in line and str(CSRC) in line]
    assert not ours, "\n".join(ours)


def test_cuda_glue_includes_no_aten_cuda_headers():
    """Where the toolkit has the cuBLAS/cuSPARSE headers the compile above would not notice an
    ATen/cuda include creeping back; the include lines themselves are checked here."""
    offenders = [f"{p.name}: {line}" for p in [*GLUE, *(CSRC / "cuda").glob("*.h")]
                 for line in p.read_text().splitlines() if line.startswith("#include <ATen/cuda/")]
    assert not offenders, "\n".join(offenders)
