"""cross_entropy_fused_'s CUDA kernels (SWIFTLORA_CE_VARIANT, csrc/cuda/cross_entropy.cu: 0 the general kernel, 1 the
lean one) against float64 references: the lean kernel's
label fix-up, ragged vocabularies (a tail that fills no vector), more rows than resident CTAs, ignored and
out-of-range labels, int32 labels, unaligned rows, soft-cap, smoothing, z-loss and logit scale (which the lean
kernel hands to the general one, or takes), and |x| ~ 1e4."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import cross_entropy_reference, softmax_stats_reference
from tests.helpers import DTYPES, assert_close, randn, rel_err
from tests.ops.ce_helpers import IGNORE, labels

ops = torch.ops.swiftlora
pytestmark = pytest.mark.gpu
ENV = "SWIFTLORA_CE_VARIANT"
VARIANTS = range(2)  # kCeVariants

# (rows, V): 300 rows > the resident CTAs (the persistent loop); an odd V leaves a ragged tail (single elements after
# the vectors); 262147 takes many unrolled rounds; 100 and 96 leave threads
# without a vector.
SHAPES = [(300, 50257), (300, 50264), (20, 131072), (9, 131075), (5, 262147), (7, 100), (40, 96)]
# (label_smoothing, z_loss, softcap, logit_scale)
OPTIONS = [(0.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 0.7), (0.1, 1e-3, 0.0, 0.7), (0.0, 0.0, 30.0, 1.0)]


def _fused(x, y, opts, gs, variant, monkeypatch):
    monkeypatch.setenv(ENV, str(variant))
    eps, zl, cap, scale = opts
    buf = x.clone()
    loss, lse = ops.cross_entropy_fused_(buf, y, IGNORE, eps, zl, cap, scale, gs)
    return buf, loss, lse


def _references(x, y, opts, gs):
    eps, zl, cap, scale = opts
    kw = dict(ignore_index=IGNORE, label_smoothing=eps, z_loss=zl, softcap=cap, logit_scale=scale, reduction="none")
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", x.dtype)):
        xr = x.detach().to(dt).requires_grad_()
        loss = cross_entropy_reference(xr, y, **kw)
        (loss * gs.to(dt)).sum().backward()
        refs[name] = loss.detach(), xr.grad
    return refs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "scaled", "smooth_zloss_scale", "softcap"])
def test_variant_matches_reference(variant, dtype, shape, opts, monkeypatch):
    n, v = shape
    x = randn(n, v, dtype=dtype, device="cuda", scale=3.0)
    x[1, 6] = 40.0  # a row whose max is far above the rest
    y = labels(n, v, "cuda", ignored=0.2)
    y[0], y[2] = 0, v - 1  # first and last column (the last one in the ragged tail when V is odd)
    gs = torch.rand(n, device="cuda") + 0.5
    refs = _references(x, y, opts, gs)
    buf, loss, lse = _fused(x, y, opts, gs, variant, monkeypatch)
    what = f"variant {variant} {dtype} {shape} {opts}"
    assert_close(loss, refs["64"][0], what=f"loss {what}")
    assert_close(buf, refs["64"][1], refs["lowp"][1], what=f"grad {what}")
    valid = y != IGNORE
    lse_ref = softmax_stats_reference(x.double(), None, IGNORE, opts[2], opts[3])[0]
    assert_close(lse[valid], lse_ref[valid], what=f"lse {what}")
    assert (loss[~valid] == 0).all() and (buf[~valid] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("v", [50257, 50264])
def test_variant_on_extreme_logits_and_bad_labels(variant, dtype, v, monkeypatch):
    n = 40
    big = 1e4
    x = torch.randn(n, v, device="cuda").sign().mul(big).to(dtype)
    x[:, :3] = big * torch.tensor([1.0, -1.0, 0.5], device="cuda").to(dtype)
    y = labels(n, v, "cuda", ignored=0.2, dtype=torch.int32)
    y[:4] = torch.tensor([0, 1, 2, v - 1], dtype=torch.int32)
    y[5] = v  # out of range: that row becomes NaN, the others do not notice
    gs = torch.full((n,), 0.25, device="cuda")
    buf, loss, _ = _fused(x, y, (0.0, 0.0, 0.0, 1.0), gs, variant, monkeypatch)
    assert torch.isnan(loss[5]) and torch.isnan(buf[5]).all()
    keep = torch.arange(n, device="cuda") != 5
    refs = _references(x[keep], y[keep], (0.0, 0.0, 0.0, 1.0), gs[keep])
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(buf[keep]).all()
    assert rel_err(loss[keep], refs["64"][0]) < 1e-5
    # as test_cross_entropy.py's extreme-logit test: + big·2^-24 for the float32 lse's rounding
    bound = 2 * rel_err(refs["lowp"][1], refs["64"][1]) + big * 2**-24
    assert rel_err(buf[keep], refs["64"][1]) <= bound


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_on_unaligned_rows(variant, monkeypatch):
    n, v = 12, 50257
    base = randn(n, v + 1, dtype=torch.bfloat16, device="cuda", scale=3.0)
    x = base[:, 1:]  # rows that do not start 16-byte aligned: every variant takes the original kernel
    y = labels(n, v, "cuda")
    gs = torch.tensor(0.5, device="cuda")
    refs = _references(x, y, (0.0, 0.0, 0.0, 1.0), gs.expand(n))
    monkeypatch.setenv(ENV, str(variant))
    buf = base.clone()[:, 1:]
    loss, _ = ops.cross_entropy_fused_(buf, y, IGNORE, 0.0, 0.0, 0.0, 1.0, gs)
    assert_close(loss, refs["64"][0], what="loss")
    assert_close(buf, refs["64"][1], refs["lowp"][1], what="grad")


def test_what_the_lean_kernel_cannot_take_runs_the_general_one(monkeypatch):
    """With a soft-cap (or smoothing, z-loss) every variant runs the general kernel: the same bits."""
    n, v = 300, 50257
    x = randn(n, v, dtype=torch.bfloat16, device="cuda", scale=3.0)
    y = labels(n, v, "cuda")
    gs = torch.rand(n, device="cuda")
    out = [_fused(x, y, (0.1, 1e-3, 20.0, 0.8), gs, i, monkeypatch) for i in VARIANTS]
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


def test_bad_variant_is_a_clear_error(monkeypatch):
    x = randn(4, 64, dtype=torch.bfloat16, device="cuda")
    y = labels(4, 64, "cuda")
    gs = torch.tensor(1.0, device="cuda")
    for bad in ("2", "-1", "fast"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(RuntimeError, match=ENV):
            ops.cross_entropy_fused_(x.clone(), y, IGNORE, 0.0, 0.0, 0.0, 1.0, gs)
