"""The CUDA row kernels on vocabulary-wide rows (csrc/cuda/softmax_row.cuh's walk_row): rows wide enough that every
thread runs the batched main loop (8 vectors at once in cross_entropy_fused_'s statistics pass, 4 elsewhere) and
then its batched remainder, aligned and unaligned (single-element path), against float64 references."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import cross_entropy, cross_entropy_reference, softmax_stats_reference
from tests.helpers import DTYPES, assert_close, randn
from tests.ops.ce_helpers import IGNORE, labels

ops = torch.ops.swiftlora
pytestmark = pytest.mark.gpu

# 128256: Llama 3 (bf16 rows of 16032 vectors: 2 rounds of 8 per thread at 1024 threads); 131075: odd, a tail of
# scalars after the vectors; 61441: one round of 8 for no thread (only the batched remainder runs)
WIDTHS = [128256, 131075, 61441]


def _rows(n, v, dtype, aligned):
    """(base [n, W], column slice): W a multiple of 16, so rows of base[:, :v] start 16-byte aligned (vectors, then a
    tail of scalars when v is odd) and rows of base[:, 1:v + 1] do not (the single-element path)."""
    base = randn(n, -(-(v + 1) // 16) * 16, dtype=dtype, device="cuda", scale=3.0)
    base[1, 6] = 80.0  # a row whose max is far above the rest
    return base, slice(0, v) if aligned else slice(1, v + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", WIDTHS)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_fused_op_on_wide_rows(dtype, v, aligned):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n = 5
    base, cols = _rows(n, v, dtype, aligned)
    y = labels(n, v, "cuda", ignored=0.2)
    gs = torch.rand(n, device="cuda") + 0.5
    grads = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        xr = base[:, cols].detach().to(dt).requires_grad_()
        loss = cross_entropy_reference(xr, y, ignore_index=IGNORE, reduction="none")
        (loss * gs.to(dt)).sum().backward()
        grads[name] = loss.detach(), xr.grad
    lse_ref = softmax_stats_reference(base[:, cols].double(), None, IGNORE, 0.0, 1.0)[0]
    buf = base[:, cols]  # written in place through the strided view
    loss, lse = ops.cross_entropy_fused_(buf, y, IGNORE, 0.0, 0.0, 0.0, 1.0, gs)
    assert_close(loss, grads["64"][0], what=f"loss {v}")
    assert_close(buf, grads["64"][1], grads["lowp"][1], what=f"grad {v} {dtype}")
    valid = y != IGNORE
    assert_close(lse[valid], lse_ref[valid], what="lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_stats_and_inplace_cross_entropy_on_wide_rows(dtype, aligned):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n, v = 4, 131075
    base, cols = _rows(n, v, dtype, aligned)
    y = labels(n, v, "cuda", ignored=0.0)
    x = base[:, cols]
    got = ops.softmax_stats(x, y, IGNORE, 30.0, 0.9, True)
    ref = softmax_stats_reference(x.double(), y, IGNORE, 30.0, 0.9, True)
    for name, a, b in zip(("lse", "z_label", "z_sum", "pz_sum"), got, ref):
        assert (a.double() - b).abs().max().item() <= 2e-5 * (1 + b.abs().max().item()), name
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        xr = x.detach().to(dt).requires_grad_()
        loss = cross_entropy_reference(xr, y, softcap=30.0)
        loss.backward()
        refs[name] = loss.detach(), xr.grad
    leaf = base.detach().clone().requires_grad_()
    loss = cross_entropy((leaf * 1)[:, cols], y, inplace_backward=True, softcap=30.0)
    loss.backward()
    assert_close(loss, refs["64"][0], what="loss")
    assert_close(leaf.grad[:, cols], refs["64"][1], refs["lowp"][1], what=f"grad {dtype}")
