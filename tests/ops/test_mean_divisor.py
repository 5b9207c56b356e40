"""mean_divisor (cross-entropy's mean divisor and its reciprocal from the labels, one launch) against its plain
PyTorch reference: bit-equal on every device, all-ignored and empty batches, int32/int64 labels, more labels than
one block's threads, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops.cross_entropy import mean_divisor, mean_divisor_reference
from tests.helpers import DEVICES

ops = torch.ops.swiftlora


def _labels(n, ignored_share, dtype, device, ignore=-100):
    y = torch.randint(0, 50_000, (n,), device=device)
    y[torch.rand(n, device=device) < ignored_share] = ignore
    return y.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("n,share", [(1, 0.0), (7, 0.5), (1000, 0.3), (5000, 0.9), (70_000, 0.25)])
def test_matches_reference(device, dtype, n, share):
    y = _labels(n, share, dtype, device)
    out = ops.mean_divisor(y, -100)
    assert out.dtype == torch.float32 and out.shape == (2,) and out.device == y.device
    assert torch.equal(out, mean_divisor_reference(y, -100)), (out, mean_divisor_reference(y, -100))


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_and_empty_give_one(device):
    for y in (torch.full((33,), 7, device=device), torch.empty(0, dtype=torch.long, device=device)):
        assert ops.mean_divisor(y, 7).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_and_strided(device):
    y = _labels(3001, 0.4, torch.int64, device, ignore=0)[::3]  # non-contiguous view
    assert torch.equal(ops.mean_divisor(y, 0), mean_divisor_reference(y, 0))
    d, inv = mean_divisor(y, 0, None, with_inverse=True)
    assert d.item() == float((y != 0).sum()) and torch.equal(inv, d.reciprocal())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(ops.mean_divisor, (_labels(100, 0.3, torch.int64, device), -100))


def test_bad_input():
    with pytest.raises(ValueError, match="mean_divisor: labels must be 1-D"):
        ops.mean_divisor(torch.zeros(2, 3, dtype=torch.long), -100)
    with pytest.raises(TypeError, match="mean_divisor: labels must be int64 or int32"):
        ops.mean_divisor(torch.zeros(3), -100)
