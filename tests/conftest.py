import os
import subprocess
import sys
import zlib

import pytest
import torch

import fastloss  # noqa: F401  (registers the ops)

CUDA = torch.cuda.is_available() and fastloss.build_info()["cuda"]

# The cuda mark is on the parameter itself so that `pytest -m cuda` selects these cases.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and fastloss built with CUDA")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_from_the_test_name(request):
    # torch's global generator seeded from the test's own name: a test's random draws do not
    # depend on which tests ran or were skipped before it, so a failure reproduces alone and
    # on any machine.
    torch.manual_seed(zlib.crc32(f"{os.path.basename(request.node.path)}::{request.node.name}".encode()))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def ran_in_place(run) -> bool:
    """Whether run() took a CPU backward that writes over autograd's own gradient buffer
    (profiled as e.g. "fastloss::softmax_backward (in place)")."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return any(e.name.endswith("(in place)") for e in prof.events())


def rerun_without_avx512(test_file: str, skip_test: str) -> None:
    """Runs test_file's CPU tests again in a fresh process with FASTLOSS_CPU_AVX512=0, which
    makes the kernels' own dispatch take the paths of a CPU without AVX-512 (skip_test: the
    test that calls this, left out of the rerun). Skips on a CPU without AVX-512, whose
    ordinary runs take those paths."""
    env = dict(os.environ, FASTLOSS_CPU_AVX512="0")
    info = subprocess.run([sys.executable, "-m", "fastloss", "info"], env=env, capture_output=True, text=True,
                          check=True)
    if "FASTLOSS_CPU_AVX512=0" not in info.stdout:
        pytest.skip("this CPU has no AVX-512: the other tests run those paths")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k",
         f"not cuda and not {skip_test}"],
        env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(test_file),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
