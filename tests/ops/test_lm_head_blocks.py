"""The frozen-head vocabulary-block path (ops/lm_head_blocks.py): online_softmax_block_ against its reference and
opcheck (with and without the rescale of g / gz it can apply); block_plan; and fused_linear_cross_entropy /
token_logprobs through many blocks (a small memory budget) against their float64 references, with every option,
ignored and out-of-block labels, odd sizes."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops.fused_linear_cross_entropy import chunk_rows
from swiftlora.ops.lm_head_blocks import block_plan, new_stats, online_softmax_block_reference
from tests.helpers import DEVICES, DTYPES, assert_close, randn
from tests.ops.ce_helpers import IGNORE, labels
from tests.ops.test_fused_linear_cross_entropy import OPTIONS, _check as check_flce
from tests.ops.test_fused_linear_cross_entropy import _inputs as flce_inputs
from tests.ops.test_token_logprobs import _check as check_logprobs
from tests.ops.test_token_logprobs import _inputs as logprob_inputs

_op = torch.ops.swiftlora.online_softmax_block_


def _run_blocks(x, y, cols, softcap, scale, with_pz, fn):
    """Feeds x [N, V] to fn block by block; returns the final stats and the concatenated outputs."""
    stats = new_stats(x.shape[0], x.device)
    outs, pzs, rs = [], [], []
    for v0 in range(0, x.shape[1], cols):
        block = x[:, v0:v0 + cols].clone()
        pz = torch.empty_like(block) if with_pz else None
        rs.append(fn(block, stats, y, pz, v0, IGNORE, softcap, scale))
        outs.append(block)
        pzs.append(pz)
    return stats, outs, pzs, rs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [256, 1000, 4096])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
def test_lean_block_kernel_equals_general(monkeypatch, dtype, cols, label_dtype):
    """SWIFTLORA_SOFTMAX_BLOCK_VARIANT: the lean CUDA kernel (no soft-cap, no pz, 16-byte vectors) gives the general
    kernel's bits: blocks, statistics (from a fresh start and carried over), rescale factors; rows of -inf, extreme
    values, labels in and out of each block, ignored labels. cols = 1000 with fp32 / 16-bit: whole vectors (the lean
    path); the vocabulary's last block (V % cols) is narrower."""
    x = randn(300, 3 * cols + 40, dtype=torch.float32, device="cuda", scale=4.0)
    x[7] = -torch.inf
    x[11, :5] = 1e4 if dtype != torch.float16 else 6e4
    x = x.to(dtype)
    y = labels(300, x.shape[1], "cuda").to(label_dtype)
    runs = {}
    for variant in ("general", "lean"):
        monkeypatch.setenv("SWIFTLORA_SOFTMAX_BLOCK_VARIANT", variant)
        runs[variant] = _run_blocks(x, y, cols, 0.0, 0.7, False, _op)
    (sg, og, _, rg), (sl, ol, _, rl) = runs["general"], runs["lean"]
    assert _same_bits(sg, sl), _first_diffs(sg, sl)  # row 7's Σe·z is NaN (0·−inf) in both: bits, not values
    assert all(_same_bits(a, b) for a, b in zip(og, ol))
    assert all(_same_bits(a, b) for a, b in zip(rg, rl))


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _first_diffs(a, b):
    where = (_bits(a) != _bits(b)).nonzero()[:4]
    return [(tuple(i.tolist()), a[tuple(i)].item(), b[tuple(i)].item()) for i in where]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_gz", [False, True], ids=["g", "g+gz"])
def test_lean_block_kernel_equals_general_with_g_rescale(monkeypatch, dtype, with_gz):
    """With g_rescale the two CUDA kernels still agree bitwise on everything they write (block, statistics, rescale,
    and the scaled rows of g and gz), and their g and gz equal scale_rows_'s bits."""
    n, b, h = 300, 1000, 77
    x = randn(n, b, dtype=torch.float32, device="cuda", scale=4.0).to(dtype)
    y = labels(n, 2 * b, "cuda")  # about half in this block (columns b..2b)
    g0, gz0, factor = _g_inputs(n, h, "cuda")
    stats0 = new_stats(n, "cuda")
    _op(randn(n, b, dtype=dtype, device="cuda"), stats0, None, None, 0, IGNORE, 0.0, 0.7)  # a carried max
    runs = {}
    for variant in ("general", "lean"):
        monkeypatch.setenv("SWIFTLORA_SOFTMAX_BLOCK_VARIANT", variant)
        block, stats, g, gz = x.clone(), stats0.clone(), g0.clone(), gz0.clone() if with_gz else None
        r = _op(block, stats, y, None, b, IGNORE, 0.0, 0.7, g, gz, factor)
        runs[variant] = (block, stats, r, g) + ((gz,) if with_gz else ())
    for a, c in zip(runs["general"], runs["lean"]):
        assert torch.equal(a.view(torch.int8), c.view(torch.int8))
    for got, want in zip(runs["lean"][3:], (g0, gz0)):
        want = want.clone()
        torch.ops.swiftlora.scale_rows_(want, factor)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.gpu
def test_block_variant_knob_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SWIFTLORA_SOFTMAX_BLOCK_VARIANT", "fastest")
    x = randn(4, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="SWIFTLORA_SOFTMAX_BLOCK_VARIANT must be lean or general"):
        _op(x, new_stats(4, "cuda"), None, None, 0, IGNORE, 0.0, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("with_pz", [False, True])
def test_block_op_matches_reference(device, dtype, softcap, with_pz):
    n, v, cols = 37, 1003, 264  # 4 blocks, the last one ragged; odd sizes everywhere
    x = randn(n, v, dtype=dtype, device=device, scale=3.0)
    x[3, 700] = 1e4 if dtype != torch.float16 else 6e4  # a row whose max jumps in a later block
    y = labels(n, v, device)
    y[5] = IGNORE
    got = _run_blocks(x, y, cols, softcap, 0.7, with_pz, _op)
    ref = _run_blocks(x, y, cols, softcap, 0.7, with_pz, online_softmax_block_reference)
    assert torch.isfinite(got[0]).all()
    # statistics in float32 either way, summed in another order: Σz (column 2) cancels, so its error is bounded by
    # float32's epsilon times Σ|z| (~3000 here), not by its value
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=5e-4), (got[0] - ref[0]).abs().max(0)
    for a, b in zip(got[3], ref[3]):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, b in zip(got[1] + (got[2] if with_pz else []), ref[1] + (ref[2] if with_pz else [])):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_block_op_opcheck(device):
    block = randn(6, 50, device=device)
    stats = new_stats(6, device)
    y = labels(6, 200, device)
    torch.library.opcheck(_op, (block, stats, y, torch.empty_like(block), 40, IGNORE, 0.0, 1.0))
    torch.library.opcheck(_op, (block, stats, None, None, 0, IGNORE, 2.0, 0.5))


def test_block_op_rejects_bad_input():
    block, stats = randn(4, 10), new_stats(4, "cpu")
    with pytest.raises(ValueError, match="stats must be a contiguous float32 \\[4, 6\\]"):
        _op(block, stats[:, :5], None, None, 0, IGNORE, 0.0, 1.0)
    with pytest.raises(ValueError, match="col0"):
        _op(block, stats, None, None, -1, IGNORE, 0.0, 1.0)
    with pytest.raises(TypeError, match="pz must have block's dtype"):
        _op(block, stats, None, block.double(), 0, IGNORE, 0.0, 1.0)


def _g_inputs(n, h, device):
    """(g, gz, factor): float32 [n, h] sums with a NaN and a -0.0 in rows whose factor is 1, and factors 1, 0.5, 0,
    random and 1 (most rows, as in the online softmax)."""
    g, gz = randn(n, h, device=device, scale=5.0), randn(n, h, device=device)
    factor = torch.ones(n, device=device)
    factor[1], factor[2], factor[4::7] = 0.5, 0.0, torch.rand(len(range(4, n, 7)), device=device)
    g[0, 3], gz[0, 5], g[3, 1] = torch.nan, torch.nan, -0.0
    g[2, 0] = torch.inf  # times 0: NaN, as scale_rows_ gives
    return g, gz, factor


def _bits(t):
    return t.view(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_pz", [False, True])
@pytest.mark.parametrize("with_gz", [False, True], ids=["g", "g+gz"])
def test_block_op_rescales_g(device, dtype, with_pz, with_gz):
    """g_rescale: g (and gz) scaled per row with scale_rows_'s bits and the reference's values, rows whose factor is
    exactly 1 untouched bit for bit (a NaN, a -0.0); what the op writes otherwise is unchanged, bit for bit. On CUDA
    without pz the lean kernel runs, with pz the general one."""
    n, b, h = 37, 264, 45
    x = randn(n, b, dtype=dtype, device=device, scale=3.0)
    y = labels(n, b, device)
    g0, gz0, factor = _g_inputs(n, h, device)
    outs = {}
    for name, fn, extra in (("plain", _op, False), ("op", _op, True), ("ref", online_softmax_block_reference, True)):
        block, stats = x.clone(), new_stats(n, device)
        pz = torch.full_like(block, torch.nan) if with_pz else None
        g, gz = g0.clone(), gz0.clone() if with_gz else None
        args = (g, gz, factor) if extra else ()
        r = fn(block, stats, y, pz, 0, IGNORE, 0.0, 0.7, *args)
        outs[name] = (block, stats, pz, r, g, gz)
    plain, got, ref = outs["plain"], outs["op"], outs["ref"]
    for a, c in zip(got[:4], plain[:4]):
        assert (a is None and c is None) or torch.equal(a.view(torch.int8), c.view(torch.int8))
    for k, start in ((4, g0), (5, gz0)):
        if got[k] is None:
            assert not with_gz and k == 5
            continue
        want = start.clone()
        torch.ops.swiftlora.scale_rows_(want, factor)
        assert torch.equal(_bits(got[k]), _bits(want))
        assert torch.equal(_bits(got[k]), _bits(ref[k]))
        ones = factor == 1
        assert torch.equal(_bits(got[k][ones]), _bits(start[ones]))


@pytest.mark.parametrize("device", DEVICES)
def test_block_op_opcheck_with_g_rescale(device):
    block = randn(6, 50, device=device)
    g, gz, factor = _g_inputs(6, 9, device)
    g[0, 3] = gz[0, 5] = g[2, 0] = 1.0  # no NaN in or out: opcheck compares its runs' values
    y = labels(6, 200, device)
    torch.library.opcheck(_op, (block, new_stats(6, device), y, torch.empty_like(block), 40, IGNORE, 0.0, 1.0),
                          {"g": g, "gz": gz, "g_rescale": factor})
    torch.library.opcheck(_op, (block, new_stats(6, device), None, None, 0, IGNORE, 2.0, 0.5, g, None, factor))


def test_block_op_rejects_bad_g_rescale():
    block, stats = randn(4, 10), new_stats(4, "cpu")
    g, factor = torch.zeros(4, 7), torch.ones(4)

    def call(g=None, gz=None, g_rescale=None, stats=stats):
        _op(block, stats, None, None, 0, IGNORE, 0.0, 1.0, g, gz, g_rescale)

    with pytest.raises(ValueError, match="g and g_rescale come together .*got g alone"):
        call(g)
    with pytest.raises(ValueError, match="got g_rescale alone"):
        call(g_rescale=factor)
    with pytest.raises(ValueError, match="gz is scaled beside g"):
        call(gz=g)
    with pytest.raises(TypeError, match="g_rescale must be float32"):
        call(g, g_rescale=factor.double())
    with pytest.raises(ValueError, match="g_rescale must be a contiguous float32 \\[4\\]"):
        call(g, g_rescale=torch.ones(5))
    with pytest.raises(ValueError, match="g_rescale must be a contiguous"):
        call(g, g_rescale=torch.ones(4, 2)[:, 0])
    with pytest.raises(TypeError, match="g must be float32"):
        call(g.half(), g_rescale=factor)
    with pytest.raises(ValueError, match="g must be a contiguous float32 \\[4, H\\]"):
        call(torch.zeros(5, 7), g_rescale=factor)
    with pytest.raises(ValueError, match="g must be a contiguous"):
        call(torch.zeros(7, 4).t(), g_rescale=factor)
    with pytest.raises(TypeError, match="gz must be float32"):
        call(g, g.bfloat16(), factor)
    with pytest.raises(ValueError, match="gz must have the shape of g"):
        call(g, torch.zeros(4, 8), factor)
    with pytest.raises(ValueError, match="stats and g share memory"):
        call(stats, g_rescale=factor)
    with pytest.raises(ValueError, match="g and gz share memory"):
        call(g, g, factor)
    with pytest.raises(ValueError, match="g_rescale and g share memory"):
        call(g, g_rescale=g.view(-1)[:4])
    with pytest.raises(ValueError, match="g_rescale and stats share memory"):
        call(g, g_rescale=stats.view(-1)[4:8])


def test_block_plan_rule():
    bf16, f32 = torch.bfloat16, torch.float32
    assert block_plan(8192, 128256, bf16, 64) == (2048, 8192)  # 32 MiB blocks: they stay in L2
    assert block_plan(1000, 128256, bf16, 64) == (1000, 8192)  # CUDA's register-resident limit for 16-bit
    assert block_plan(8192, 128256, bf16, 16) == (2048, 2048)  # two 8 MiB buffers
    assert block_plan(8192, 151936, f32, 64) == (2048, 4096)
    assert block_plan(100, 151936, f32, 64) == (100, 4096)
    assert block_plan(100, 1000, f32, 64) == (100, 1000)  # one block
    assert block_plan(300, 1000, f32, 0.5) == (300, 218)  # two buffers of 218 columns (not rounded below 256)
    assert block_plan(300, 1000, f32, 1.0) == (300, 256)  # two of 436 columns, rounded down to 256
    assert block_plan(300, 1000, f32, 1.2) == (300, 1000)  # one buffer holds the whole vocabulary
    assert block_plan(5, 10, f32, 1e-9) == (5, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy_frozen_blocks(device, dtype, reduction):
    n, h, v = 29, 48, 203
    hidden, weight, bias = flce_inputs(n, h, v, dtype, device, bias=False, train_w=False)
    budget = 2 * 90 * n * dtype.itemsize / 2**20  # two 90-column buffers: 3 blocks, the last ragged
    for opts in OPTIONS + [{"label_smoothing": 0.2, "softcap": 5.0}]:  # the last: token-chunk fallback
        if reduction != "mean" and "num_items_in_batch" in opts:
            continue
        y = labels(n, v, device)
        fallback = opts.get("softcap") and opts.get("label_smoothing")  # the op's token chunks, for the reference
        rows = chunk_rows(n, v, dtype, budget, None, "test") if fallback else None
        check_flce(hidden, weight, None, y, what=f"blocks {opts}", reduction=reduction, memory_budget_mb=budget,
                   lowp_rows=rows, **opts)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_cross_entropy_frozen_blocks_with_bias_and_bad_label(device):
    n, h, v = 17, 16, 300
    hidden, weight, bias = flce_inputs(n, h, v, torch.float32, device, bias=True, train_w=False)
    y = labels(n, v, device)
    check_flce(hidden, weight, bias, y, what="frozen bias", memory_budget_mb=0.004)
    y[4] = v + 3  # outside [0, V): that row's loss (so the mean) is NaN, as in the token-chunk path
    from swiftlora.ops import fused_linear_cross_entropy
    loss = fused_linear_cross_entropy(hidden, weight, y, bias, memory_budget_mb=0.004, reduction="none")
    assert torch.isnan(loss[4]) and torch.isfinite(loss[torch.arange(n, device=device) != 4]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use", [("lp",), ("ent",), ("lp", "ent")], ids="+".join)
def test_token_logprobs_frozen_blocks(device, dtype, use):
    hidden, weight, ids = logprob_inputs((8, 16), 64, 301, dtype, device, train_w=False)
    ids[0, 2] = IGNORE
    budget = 2 * 100 * 128 * dtype.itemsize / 2**20  # two 100-column buffers: 4 blocks
    check_logprobs(hidden, weight, ids, use, what=f"blocks {use}", temperature=0.7,
                   with_entropy="ent" in use or dtype == torch.float32, memory_budget_mb=budget)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["blocks", "token_chunks", "trainable_head"])
def test_autocast_runs_the_head_in_autocast_dtype(device, path):
    """Under autocast (HF Trainer with bf16=True) float32 hidden and weight go through the GEMMs in bfloat16, as
    F.linear would, on every path, and the gradients come back in float32."""
    from swiftlora.ops import fused_linear_cross_entropy, token_logprobs
    hidden, weight, _ = flce_inputs(40, 32, 300, torch.float32, device, bias=False, train_w=path == "trainable_head")
    y = labels(40, 300, device)
    kw = {"chunk_size": 16} if path == "token_chunks" else {}
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, y, **kw)
        lp = token_logprobs(hidden, weight, y.clamp_min(0), **kw)
    ref = fused_linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), y, **kw)
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
    params = [hidden] + ([weight] if weight.requires_grad else [])
    grads = torch.autograd.grad(loss + lp.sum(), params)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
