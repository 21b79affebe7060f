"""The CUDA torch glue (csrc/cuda/*.cpp) compiles even where torch has no CUDA.

The build compiles the glue only against a CUDA build of torch, so a machine with a CPU torch
(CI) would otherwise first see a glue compile error on a GPU machine. torch's CPU wheel ships
the ATen/c10 CUDA headers; the toolkit supplies the runtime headers. The cuBLAS, cuSPARSE and
cuSOLVER headers that ATen's CUDAContext.h includes are replaced by stubs declaring the handle
types only where the toolkit lacks them: the glue calls none of those libraries.
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

# Declarations the ATen CUDA headers need from the libraries whose headers may be missing.
STUBS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
}


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


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_stubs")
    for name, text in STUBS.items():
        if not (CUDA_INCLUDE / name).exists():
            (d / name).write_text("#pragma once\n" + text)
    return d


@pytest.mark.skipif(CUDA_INCLUDE is None or CXX is None, reason="needs the CUDA toolkit headers and a C++ compiler")
@pytest.mark.skipif(fastloss.build_info()["cuda"], reason="the build itself compiled the CUDA glue")
@pytest.mark.parametrize("source", GLUE, ids=[p.stem for p in GLUE])
def test_cuda_glue_compiles(source, stub_dir):
    includes = [f"-I{CSRC}"]
    for inc in [*torch.utils.cpp_extension.include_paths(), CUDA_INCLUDE, stub_dir, sysconfig.get_paths()["include"]]:
        includes += ["-isystem", str(inc)]
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DFASTLOSS_WITH_CUDA=1", *includes, str(source)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-6000:]
    ours = [line for line in out.stderr.splitlines() if "warning" in line and str(CSRC) in line]
    assert not ours, "\n".join(ours)
