import pytest
import torch

import fastloss  # noqa: F401  (registers the ops)

CUDA = torch.cuda.is_available() and fastloss.build_info()["cuda"]

DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and fastloss built with CUDA")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        request.applymarker(pytest.mark.cuda)
    return request.param
