"""head_chunks' schedule (ops/lm_head_blocks.py): two block buffers, the next block's GEMM issued before the previous
block's accumulation, and on CUDA the block softmax on a side stream. Its sums must equal, bit for bit, those of the
plain one-block-at-a-time order; several token chunks (the reused stats/G buffers), odd vocabularies, a bias, a
running max that moves in a middle and in the last block (scale_rows_ with r != 1); and the work per block of the
Python loop is exactly its four ops."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from swiftlora._compat import addmm_fp32_
from swiftlora.ops import lm_head_blocks
from swiftlora.ops.lm_head_blocks import block_plan, head_chunks, head_chunks_reference, new_stats
from tests.helpers import DEVICES, DTYPES, randn
from tests.ops.ce_helpers import IGNORE, labels
from tests.ops.test_fused_linear_cross_entropy import OPTIONS, _check as check_flce
from tests.ops.test_fused_linear_cross_entropy import _inputs as flce_inputs
from tests.ops.test_token_logprobs import _check as check_logprobs
from tests.ops.test_token_logprobs import _inputs as logprob_inputs

_lib = torch.ops.swiftlora


def _one_block_at_a_time(h2, weight, bias, y, plan, with_gz, softcap, scale):
    """The order before the two-buffer schedule: per block, GEMM, softmax, rescale, accumulate, in one stream.
    Returns the chunks' sums and the blocks (after the first) where some row's running max moved (a rescale r != 1)."""
    n, hdim = h2.shape
    out, moved = [], set()
    for s in range(0, n, plan.rows):
        e = min(s + plan.rows, n)
        hc = h2[s:e]
        stats = new_stats(e - s, h2.device)
        g = torch.zeros(e - s, hdim, dtype=torch.float32, device=h2.device)
        gz = torch.zeros_like(g) if with_gz else None
        for v0 in range(0, weight.shape[0], plan.cols):
            wb = weight[v0:v0 + plan.cols]
            block = torch.mm(hc, wb.t()) if bias is None else torch.addmm(bias[v0:v0 + plan.cols], hc, wb.t())
            pz = torch.empty_like(block) if with_gz else None
            r = _lib.online_softmax_block_(block, stats, y[s:e], pz, v0, IGNORE, softcap, scale)
            if v0 and (r != 1).any():
                moved.add(v0 // plan.cols)
            for acc, p in ((g, block), (gz, pz)):
                if acc is not None:
                    if v0:
                        _lib.scale_rows_(acc, r)
                    addmm_fp32_(acc, p, wb)
        out.append((s, e, stats, g, gz))
    return out, moved


def _schedule(h2, weight, bias, y, plan, with_gz, softcap, scale, overlap=None):
    """head_chunks' sums, cloned (the iterator reuses its buffers)."""
    return [(c.start, c.end, c.stats.clone(), c.g.clone(), None if c.gz is None else c.gz.clone())
            for c in head_chunks(h2, weight, bias, y, IGNORE, softcap, scale, plan, with_gz, overlap)]


def _inputs(n, h, v, dtype, device, bias):
    hidden = randn(n, h, dtype=dtype, device=device)
    weight = randn(v, h, dtype=dtype, device=device, scale=h**-0.5)
    weight[v - 7] *= 40  # a column far above the rest in the last block: the running max moves there (r != 1)
    # and row 0's logit 40 in a middle block (of 3 or more): its max moves there, a rescale that the C++ loop folds
    # into the next block's softmax
    weight[v // 3] = hidden[0] * (40 / hidden[0].float().norm() ** 2)
    b = randn(v, dtype=dtype, device=device) if bias else None
    return hidden, weight, b


def _assert_same(got, ref, exact=True):
    """Equal sums; ``exact=False`` (CUDA against the old order: a GEMM into a buffer view or a fresh tensor may get
    another cuBLAS kernel) allows float32 rounding."""
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a[:2] == b[:2]
        for x, y in zip(a[2:], b[2:]):
            assert (x is None) == (y is None)
            if x is not None:
                same = torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-5, atol=1e-6 * y.abs().max())
                assert same, (x - y).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_gz", [False, True], ids=["g", "g+gz"])
def test_schedule_equals_one_block_at_a_time(device, dtype, bias, with_gz, monkeypatch):
    monkeypatch.setattr(lm_head_blocks, "ROW_CHUNK", 16)
    n, h, v = 53, 24, 1003  # 4 token chunks (the last 5 rows); 264 columns rounded to 4 blocks of 256 (last 235)
    hidden, weight, b = _inputs(n, h, v, dtype, device, bias)
    y = labels(n, v, device)
    plan = block_plan(n, v, dtype, 2 * 264 * 16 * dtype.itemsize / 2**20)
    assert plan == (16, 256)
    softcap = 30.0 if with_gz else 0.0  # wide enough for the max to jump by more than 16
    ref, moved = _one_block_at_a_time(hidden, weight, b, y, plan, with_gz, softcap, 0.8)
    assert moved >= {1, 3}, moved  # rescales r != 1 in a middle block (folded in C++) and the last
    sequential = _schedule(hidden, weight, b, y, plan, with_gz, softcap, 0.8, overlap=False)
    _assert_same(sequential, ref, exact=device == "cpu")
    _assert_same(_schedule(hidden, weight, b, y, plan, with_gz, softcap, 0.8, overlap=True), sequential)  # CUDA: overlapped


@pytest.mark.parametrize("device", DEVICES)
def test_one_block_and_one_chunk(device):
    """A vocabulary that fits one block (one buffer) and a single chunk."""
    hidden, weight, _ = _inputs(9, 8, 37, torch.float32, device, False)
    y = labels(9, 37, device)
    plan = block_plan(9, 37, torch.float32, 64)
    assert plan == (9, 37)
    _assert_same(_schedule(hidden, weight, None, y, plan, True, 0.0, 1.0),
                 _one_block_at_a_time(hidden, weight, None, y, plan, True, 0.0, 1.0)[0], exact=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_through_several_chunks(device, dtype, monkeypatch):
    """fused_linear_cross_entropy and token_logprobs through 3 token chunks x 3 blocks against their float64
    references: the reused stats / G buffers of head_chunks, consumed chunk by chunk."""
    monkeypatch.setattr(lm_head_blocks, "ROW_CHUNK", 11)
    n, h, v = 29, 40, 307
    hidden, weight, _ = flce_inputs(n, h, v, dtype, device, bias=False, train_w=False)
    budget = 2 * 110 * 11 * dtype.itemsize / 2**20  # two 110-column buffers
    for opts in OPTIONS[:3]:
        check_flce(hidden, weight, None, labels(n, v, device), what=f"chunks {opts}", memory_budget_mb=budget, **opts)
    hidden, weight, ids = logprob_inputs((3, 9), 40, 301, dtype, device, train_w=False)
    check_logprobs(hidden, weight, ids, ("lp", "ent"), what="chunks", with_entropy=True, memory_budget_mb=budget)


class _Ops(TorchDispatchMode):
    """Records the name of every op dispatched (views included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_python_loop_work_per_block_is_four_ops():
    """The Python loop (head_chunks_reference): per block the logits GEMM (into a preallocated buffer), the softmax,
    the rescale (not for the first block) and the accumulation, and nothing else that computes: no per-block
    allocation, copy or Python-side tensor math. Per chunk: one buffer allocation and, after block 0's GEMM, the
    reset of the statistics (G needs none: block 0's accumulation overwrites it).
    (lm_head_blocks_ folds the rescale into the softmax: test_lm_head_blocks_op.py::test_work_per_block_is_three_ops.)
    """
    n, h, v, cols = 40, 16, 700, 256  # 2 chunks of 20 rows, 3 blocks
    hidden, weight, _ = _inputs(n, h, v, torch.float32, "cpu", False)
    y = labels(n, v, "cpu")
    plan = lm_head_blocks.BlockPlan(20, cols)
    with _Ops() as ops:
        for _ in head_chunks_reference(hidden, weight, None, y, IGNORE, 0.0, 1.0, plan):
            pass
    views = {"slice.Tensor", "select.int", "view.default", "t.default", "alias.default"}
    work = [name for name in ops.names if name not in views]
    per_chunk = ["zero_.default", "fill_.Scalar", "empty.memory_format"]
    per_block = ["mm.out", "online_softmax_block_.default", "scale_rows_.default", "addmm_.default"]
    first = [op for op in per_block if op != "scale_rows_.default"]
    one_chunk = per_chunk + first + per_block * 2
    assert work[:2] == ["empty.memory_format"] * 2, work  # stats and G, once per call
    assert sorted(work[2:]) == sorted(one_chunk * 2), work


def at_size_case(dtype, monkeypatch):
    """CUDA inputs where cuBLAS picks its large-tile kernels: 3 token chunks of 512 (the last ragged) x 5 blocks of
    4096 over an odd (prime) vocabulary, with a bias: (hidden, weight, bias, labels, budget, plan)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(lm_head_blocks, "ROW_CHUNK", 512)
    n, h, v = 1200, 256, 20011
    hidden, weight, b = _inputs(n, h, v, dtype, "cuda", True)
    y = labels(n, v, "cuda")
    budget = 2 * 4096 * 512 * dtype.itemsize / 2**20
    plan = block_plan(n, v, dtype, budget)
    assert plan == (512, 4096)
    return hidden, weight, b, y, budget, plan


def assert_ops_same_under(monkeypatch, flag, values, hidden, weight, bias, y, budget):
    """fused_linear_cross_entropy and token_logprobs (with entropy): the same bits (values and the gradient w.r.t.
    hidden) for every value of the switch lm_head_blocks.<flag>."""
    from swiftlora.ops import fused_linear_cross_entropy, token_logprobs

    hidden.requires_grad_(True)
    results = []
    for value in values:
        monkeypatch.setattr(lm_head_blocks, flag, value)
        loss = fused_linear_cross_entropy(hidden, weight, y, bias, memory_budget_mb=budget)
        lp, ent = token_logprobs(hidden, weight, y.clamp_min(0), with_entropy=True, memory_budget_mb=budget)
        grads = torch.autograd.grad((loss, lp.sum(), ent.sum()), hidden)
        results.append((loss, lp, ent) + tuple(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_overlap_is_bit_identical_at_size(dtype, monkeypatch):
    """Blocks big enough for the side stream's softmax to run beside the GEMMs: 3 token chunks (the last ragged),
    5 blocks over an odd (prime) vocabulary; the overlapped sums and the gradients of the ops equal the one-stream
    ones bit for bit."""
    hidden, weight, b, y, budget, plan = at_size_case(dtype, monkeypatch)
    for with_gz in (False, True):
        _assert_same(_schedule(hidden, weight, b, y, plan, with_gz, 0.0, 1.0, overlap=True),
                     _schedule(hidden, weight, b, y, plan, with_gz, 0.0, 1.0, overlap=False))
    assert_ops_same_under(monkeypatch, "OVERLAP", (True, False), hidden, weight, b, y, budget)


@pytest.mark.gpu
def test_abandoned_iterator_then_full_run():
    """Closing head_chunks after its first chunk joins the side stream; a full run afterwards gives the sums a fresh
    process would (nothing of the abandoned run writes into memory reused since)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hidden, weight, _ = _inputs(3000, 128, 9001, torch.bfloat16, "cuda", False)
    y = labels(3000, 9001, "cuda")
    plan = block_plan(3000, 9001, torch.bfloat16, 8)
    ref = _schedule(hidden, weight, None, y, plan, True, 0.0, 1.0, overlap=False)
    it = head_chunks(hidden, weight, None, y, IGNORE, 0.0, 1.0, plan, True, True)  # overlapped
    first = next(it)
    it.close()
    assert first.start == 0
    junk = torch.full((64, 2**20), 7.0, device="cuda")  # reuses freed memory, if any was freed too early
    del junk
    _assert_same(_schedule(hidden, weight, None, y, plan, True, 0.0, 1.0), ref)
