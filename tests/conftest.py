import os
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
