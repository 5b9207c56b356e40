"""lm_head_blocks_ (csrc/cpu/lm_head_blocks.cpp): one token chunk's whole vocabulary loop in C++. Its sums must equal,
bit for bit, those of the Python loop it replaces (head_chunks_reference, the same float32 operations in the same
order on one stream, the rescales of G folded into the next block's softmax launch): every dtype, with and without
bias, labels None / with ignored rows, with Gz, one block and several, odd sizes, int32 labels, a running max that
moves in a middle and in the last block; plus opcheck, bad input, the ops per chunk and per block."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import lm_head_blocks
from swiftlora.ops.lm_head_blocks import BlockPlan, head_chunks, head_chunks_reference, new_stats
from tests.helpers import DEVICES, DTYPES, randn
from tests.ops.ce_helpers import IGNORE, labels
from tests.ops.test_lm_head_schedule import _Ops, _assert_same, _inputs, assert_ops_same_under, at_size_case

_op = torch.ops.swiftlora.lm_head_blocks_


def _sums(chunks):
    """The chunks' sums, cloned (the iterators reuse their buffers)."""
    return [(c.start, c.end, c.stats.clone(), c.g.clone(), None if c.gz is None else c.gz.clone()) for c in chunks]


def _both(hidden, weight, b, y, plan, with_gz, softcap, scale):
    args = (hidden, weight, b, y, IGNORE, softcap, scale, plan, with_gz, False)
    return _sums(head_chunks(*args)), _sums(head_chunks_reference(*args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("label_kind", ["none", "ignored", "int32"])
@pytest.mark.parametrize("with_gz", [False, True], ids=["g", "g+gz"])
def test_op_equals_python_loop(device, dtype, bias, label_kind, with_gz):
    n, h, v = 45, 24, 1003  # 3 token chunks of 17 rows (the last 11); 4 blocks of 256 columns (the last 235)
    hidden, weight, b = _inputs(n, h, v, dtype, device, bias)
    y = None if label_kind == "none" else labels(n, v, device, dtype=torch.int32 if label_kind == "int32" else torch.long)
    softcap = 30.0 if with_gz else 0.0
    got, ref = _both(hidden, weight, b, y, BlockPlan(17, 256), with_gz, softcap, 0.8)
    assert len(got) == 3 and torch.isfinite(got[0][3]).all()
    assert (got[0][2][:, 0] > -torch.inf).all()  # the stats were reset and filled
    _assert_same(got, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols", [37, 64])
def test_one_block(device, dtype, cols):
    """A vocabulary that fits one block (one buffer; cols above V is clamped), a single ragged chunk."""
    hidden, weight, b = _inputs(9, 8, 37, dtype, device, True)
    y = labels(9, 37, device)
    got, ref = _both(hidden, weight, b, y, BlockPlan(9, cols), True, 0.0, 1.0)
    _assert_same(got, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_all_stats_buffer(device):
    """With the caller's [N, 6] stats buffer every chunk's statistics stay (rows start:end), equal to the reference's."""
    n, h, v = 30, 16, 300
    hidden, weight, _ = _inputs(n, h, v, torch.bfloat16, device, False)
    y = labels(n, v, device)
    plan = BlockPlan(8, 128)
    stats, stats_ref = torch.full((n, 6), torch.nan, device=device), torch.full((n, 6), torch.nan, device=device)
    got = _sums(head_chunks(hidden, weight, None, y, IGNORE, 0.0, 1.0, plan, stats=stats))
    ref = _sums(head_chunks_reference(hidden, weight, None, y, IGNORE, 0.0, 1.0, plan, stats=stats_ref))
    _assert_same(got, ref)
    assert torch.equal(stats, stats_ref) and torch.isfinite(stats).all()
    assert torch.equal(stats[24:], got[-1][2])


@pytest.mark.parametrize("device", DEVICES)
def test_sum_buffers_need_no_reset(device):
    """stats, g and gz are overwritten (g and gz by block 0's accumulation, beta = 0): NaN left in them by earlier
    use changes nothing."""
    c, h, v = 20, 16, 700
    hidden, weight, _ = _inputs(c, h, v, torch.bfloat16, device, False)
    y = labels(c, v, device)
    outs = []
    for fill in (0.0, torch.nan):
        stats, g = torch.full((c, 6), fill, device=device), torch.full((c, h), fill, device=device)
        gz = torch.full_like(g, fill)
        _op(hidden, weight, None, y, stats, g, gz, 256, IGNORE, 0.0, 1.0)
        outs.append((stats, g, gz))
    for a, b in zip(*outs):
        assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    hidden, weight, b = _inputs(6, 8, 50, torch.float32, device, True)
    y = labels(6, 50, device)
    stats, g = new_stats(6, device), torch.zeros(6, 8, device=device)
    torch.library.opcheck(_op, (hidden, weight, b, y, stats, g, torch.zeros_like(g), 16, IGNORE, 0.0, 1.0))
    torch.library.opcheck(_op, (hidden, weight, None, None, stats, g, None, 64, IGNORE, 3.0, 0.5))


def test_rejects_bad_input():
    hidden, weight, b = _inputs(4, 8, 20, torch.float32, "cpu", True)
    stats, g = new_stats(4, "cpu"), torch.zeros(4, 8)
    args = dict(hc=hidden, weight=weight, bias=b, labels=None, stats=stats, g=g, gz=None, cols=8, ignore_index=IGNORE,
                softcap=0.0, logit_scale=1.0)

    def call(**kw):
        _op(**{**args, **kw})

    cases = [
        (TypeError, "weight must have the dtype of hc", dict(weight=weight.double())),
        (ValueError, "weight must be \\[V, 8\\]", dict(weight=weight[:, :5])),
        (ValueError, "bias must be \\[20\\]", dict(bias=b[:7])),
        (TypeError, "labels must be int64 or int32", dict(labels=torch.zeros(4))),
        (ValueError, "labels must have shape \\[4\\]", dict(labels=torch.zeros(3, dtype=torch.long))),
        (ValueError, "stats must be a contiguous float32 \\[4, 6\\]", dict(stats=stats[:, :5])),
        (TypeError, "g must be float32", dict(g=g.half())),
        (ValueError, "gz must be a contiguous float32 \\[4, 8\\]", dict(gz=torch.zeros(8, 4).t())),
        (ValueError, "g and gz share memory", dict(gz=g)),
        (ValueError, "cols .* must be >= 1", dict(cols=0)),
        (ValueError, "hc .* must be a non-empty 2-D", dict(hc=hidden[:0])),
        (ValueError, "sums must be a combination of 1 .* and 2 .*, got 4", dict(sums=4)),
        (ValueError, "sums must be .*got -1", dict(sums=-1)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            call(**kw)


def test_head_chunks_issues_one_op_per_chunk():
    """The default path: per call the stats and G buffers, per chunk one lm_head_blocks_ and nothing else."""
    n, h, v = 40, 16, 700
    hidden, weight, _ = _inputs(n, h, v, torch.float32, "cpu", False)
    y = labels(n, v, "cpu")
    with _Ops() as ops:
        for _ in head_chunks(hidden, weight, None, y, IGNORE, 0.0, 1.0, BlockPlan(20, 256)):
            pass
    views = {"slice.Tensor", "select.int", "view.default", "t.default", "alias.default"}
    assert [name for name in ops.names if name not in views] == (["empty.memory_format"] * 2
                                                                 + ["lm_head_blocks_.default"] * 2)


@pytest.mark.parametrize("with_gz", [False, True], ids=["g", "g+gz"])
def test_work_per_block_is_three_ops(with_gz):
    """The C++ loop (lm_head_blocks_, its direct calls seen by the profiler): per block the logits GEMM, the softmax
    and the accumulation (one per sum), the rescale of block j−1 riding in block j's softmax (its g, gz and g_rescale
    given from block 2 on), so one scale_rows_ per sum per chunk, for the last block. Per chunk: the buffer
    allocations and, after block 0's GEMM, the reset of the statistics (G and Gz need none: block 0's accumulation
    overwrites them, beta = 0)."""
    from torch.profiler import ProfilerActivity, profile

    c, h, v, cols = 20, 16, 1000, 256  # 4 blocks, the last ragged
    hidden, weight, _ = _inputs(c, h, v, torch.float32, "cpu", False)
    stats, g = new_stats(c, "cpu"), torch.empty(c, h)
    gz = torch.empty_like(g) if with_gz else None
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _op(hidden, weight, None, labels(c, v, "cpu"), stats, g, gz, cols, IGNORE, 0.0, 1.0)
    top = next(e for e in prof.events() if e.name == "swiftlora::lm_head_blocks_")
    views = {"aten::select", "aten::narrow", "aten::slice", "aten::as_strided", "aten::t", "aten::transpose",
             "aten::view"}
    calls = [e for e in prof.events() if e.cpu_parent is not None and e.cpu_parent.id == top.id
             and e.name not in views]
    sums = 2 if with_gz else 1
    sm, acc = "swiftlora::online_softmax_block_", ["aten::addmm_"] * sums
    per_chunk = ["aten::empty", "aten::empty_like"][:sums]
    first = ["aten::mm", "aten::zero_", "aten::fill_", sm]
    last = ["swiftlora::scale_rows_", "aten::addmm_"] * sums
    assert [e.name for e in calls] == per_chunk + first + (["aten::mm", sm] + acc) * 3 + last
    folded = [e.input_shapes[-3:] for e in calls if e.name == sm]
    gshape = [c, h]
    assert folded == [[[], [], []]] * 2 + [[gshape, gshape if with_gz else [], [c]]] * 2, folded


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_op_equals_python_loop_at_size(dtype, monkeypatch):
    """CUDA at a size where cuBLAS picks its large-tile kernels and the float32-output GEMM accumulates: 3 token
    chunks (the last ragged) x 5 blocks of an odd (prime) vocabulary, with bias and Gz; then the two ops' results
    through the C++ loop and the Python loop, equal bit for bit."""
    hidden, weight, b, y, budget, plan = at_size_case(dtype, monkeypatch)
    for with_gz in (False, True):
        _assert_same(*_both(hidden, weight, b, y, plan, with_gz, 0.0, 1.0))
    assert_ops_same_under(monkeypatch, "NATIVE", (True, False), hidden, weight, b, y, budget)
