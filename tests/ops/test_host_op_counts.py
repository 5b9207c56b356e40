"""The small ops the host issues around the big kernels (each costs a launch and, on the H100, ~10-30 us of Python):
cross_entropy(inplace_backward=True) and the frozen-head paths of fused_linear_cross_entropy / token_logprobs. Counted
with a dispatch mode on CPU (the CUDA path issues the same ops); views and the autograd seed are left out."""
from __future__ import annotations

import torch

from swiftlora.ops import cross_entropy, fused_linear_cross_entropy, lm_head_blocks, token_logprobs
from tests.helpers import randn
from tests.ops.ce_helpers import labels
from tests.ops.test_lm_head_schedule import _Ops

_VIEWS = {"slice.Tensor", "select.int", "view.default", "t.default", "alias.default", "unbind.int", "unsqueeze.default",
          "reshape.default", "detach.default", "expand.default", "to.dtype"}  # to.dtype: a no-op cast here
PER_CHUNK = ["div.Tensor", "mul_.Tensor", "index_select.default", "mul.Tensor", "addcmul_.default", "copy_.default"]


def _work(fn):
    with _Ops() as ops:
        fn()
    return [name for name in ops.names if name not in _VIEWS and name != "ones_like.default"]


def test_cross_entropy_in_place_mean():
    """Forward: the labelled-row count and its reciprocal (the gradient's scale) from one mean_divisor, the fused
    kernel, the loss's sum and mean; backward: one scale_rows_."""
    x = randn(64, 300, dtype=torch.bfloat16, requires_grad=True)
    y = labels(64, 300, "cpu")
    work = _work(lambda: cross_entropy(x, y, inplace_backward=True).backward())
    assert work == ["mean_divisor.default", "cross_entropy_fused_.default", "sum.default", "div.Tensor",
                    "scale_rows_.default"], work


def _chunk_work(work):
    """The ops after each lm_head_blocks_ call up to the next one (the last: up to the end)."""
    at = [i for i, name in enumerate(work) if name == "lm_head_blocks_.default"]
    return [work[i + 1:j] for i, j in zip(at, at[1:] + [len(work)])]


def test_frozen_head_issues_its_first_chunk_first(monkeypatch):
    """fused_linear_cross_entropy and token_logprobs with a frozen head: the first chunk's lm_head_blocks_ comes
    before any small op that computes (only allocations precede it), and each later chunk costs 6 small ops."""
    monkeypatch.setattr(lm_head_blocks, "ROW_CHUNK", 16)
    hidden = randn(48, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = randn(300, 32, dtype=torch.bfloat16)
    y = labels(48, 300, "cpu")
    ids = y.clamp_min(0)
    for fn in (lambda: fused_linear_cross_entropy(hidden, weight, y, memory_budget_mb=0.01),
               lambda: token_logprobs(hidden, weight, ids, memory_budget_mb=0.01)):
        work = _work(fn)
        first = work.index("lm_head_blocks_.default")
        assert set(work[:first]) == {"empty.memory_format"}, work[:first]
        chunks = _chunk_work(work)
        assert len(chunks) == 3
        assert chunks[1] == PER_CHUNK, chunks[1]
        assert chunks[0][-len(PER_CHUNK):] == PER_CHUNK, chunks[0]
