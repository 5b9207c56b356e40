"""Test configuration: gpu-marked tests skip cleanly without a CUDA build and GPU; uninitialised outputs are
poisoned with NaN so a kernel that leaves an element unwritten fails its test."""
from __future__ import annotations

import pytest
import torch

import swiftlora


def pytest_collection_modifyitems(config, items):
    if swiftlora.cuda_available():
        return
    reason = (
        "needs a CUDA GPU and a CUDA build of swiftlora"
        f" (cuda_built={swiftlora.cuda_built()}, torch.cuda.is_available()={torch.cuda.is_available()})"
    )
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty (and at::empty inside our kernels) returns NaN-filled memory while this is on."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
