"""lm_head_blocks_ on sm_90a with the online softmax inside the logits GEMM (csrc/cuda/lm_head_fused_sm90.cu)
against the host loop on the same inputs (SWIFTLORA_LM_HEAD_FUSED=0), including rows whose later blocks beat the
reference max by more than the slack (the merge's correction of G), the fallback where the path does not apply,
and fused_linear_cross_entropy / token_logprobs through it. The two paths use different reference maxima, so they
are compared on what does not depend on the reference: lse = m + log s, G / s, Σe·z / s, Σz and the label columns.
Needs an sm_90 GPU and a build with sm_90a kernels; the path takes bf16, no bias, soft-cap or entropy sums, hidden
sizes > 896 and a vocabulary that is a multiple of 8."""
from __future__ import annotations

import pytest
import torch

import swiftlora
from swiftlora.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from swiftlora.ops.token_logprobs import token_logprobs
from tests.helpers import rel_err
from tests.ops.ce_helpers import IGNORE

pytestmark = pytest.mark.gpu

_op = torch.ops.swiftlora.lm_head_blocks_


def _fused_available() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    return "90a" in str(swiftlora.build_info().get("cuda_archs", ""))


needs_sm90a = pytest.mark.skipif(not _fused_available(), reason="needs an sm_90 GPU and an sm_90a build")


def _inputs(rows, hidden, vocab, seed, w_scale=0.03, label_dtype=torch.int64):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hc = torch.randn(rows, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * w_scale).to(torch.bfloat16)
    y = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    y[torch.rand(rows, device="cuda", generator=gen) < 0.15] = IGNORE
    return hc, w, y.to(label_dtype)


def _run(monkeypatch, fused, hc, w, y, cols, scale, sums=3, bias=None):
    monkeypatch.setenv("SWIFTLORA_LM_HEAD_FUSED", "1" if fused else "0")
    stats = torch.full((hc.shape[0], 6), float("nan"), device="cuda")
    g = torch.full((hc.shape[0], hc.shape[1]), float("nan"), device="cuda")
    _op(hc, w, bias, y, stats, g, None, cols, IGNORE, 0.0, scale, sums)
    torch.cuda.synchronize()
    return stats, g


def _compare(a, b, y, sums=3, g_tol=1e-2):
    (sa, ga), (sb, gb) = a, b
    assert torch.isfinite(sa[:, [0, 1, 4, 5]]).all() and torch.isfinite(ga).all()
    lse_a, lse_b = sa[:, 0] + sa[:, 1].log(), sb[:, 0] + sb[:, 1].log()
    assert (lse_a - lse_b).abs().max().item() <= 2e-2 + 2e-3 * lse_b.abs().max().item()
    assert rel_err(ga / sa[:, 1:2], gb / sb[:, 1:2]) < g_tol
    known = y != IGNORE
    assert rel_err(sa[known, 4], sb[known, 4]) < 1e-2  # z_label: one bf16 rounding of differently summed products
    assert torch.equal(sa[known, 5], sb[known, 5])
    if sums & 1:
        assert rel_err(sa[:, 2], sb[:, 2]) < 1e-2
    if sums & 2:
        assert rel_err(sa[:, 3] / sa[:, 1], sb[:, 3] / sb[:, 1]) < 1e-2


@needs_sm90a
@pytest.mark.parametrize("rows,vocab,cols", [(300, 3072, 1024), (2051, 4104, 2048), (128, 2048, 2048)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("sums", [3, 0])
def test_fused_equals_host_loop(monkeypatch, rows, vocab, cols, scale, sums):
    """Blocks of 1024 / 2048 columns, a ragged last block (4104 = 2·2048 + 8), token tails, one block only."""
    hc, w, y = _inputs(rows, 1024, vocab, seed=rows + vocab)
    _compare(_run(monkeypatch, True, hc, w, y, cols, scale, sums), _run(monkeypatch, False, hc, w, y, cols, scale),
             y, sums)


@needs_sm90a
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
def test_rows_whose_later_blocks_beat_the_reference(monkeypatch, label_dtype):
    """Vocabulary rows 2100-2160 (block 2) scaled so their logits pass block 0's max by far more than the slack of
    32: the tiles use their own max and the merge moves the reference and corrects G's row. Every row is hit."""
    hc, w, y = _inputs(260, 1024, 3072, seed=7, label_dtype=label_dtype)
    w[2100:2160] *= 60
    y[::3] = 2111  # labels inside the corrected tiles too
    a, b = _run(monkeypatch, True, hc, w, y, 1024, 1.0), _run(monkeypatch, False, hc, w, y, 1024, 1.0)
    assert (a[0][:, 0] > 32).any()  # the reference moved
    _compare(a, b, y)


@needs_sm90a
def test_without_labels_and_with_a_huge_hidden_size(monkeypatch):
    hc, w, _ = _inputs(200, 2056, 1024, seed=3)  # hidden 2056: a K tail inside the last 64-wide k-tile
    a, b = _run(monkeypatch, True, hc, w, None, 512, 1.0), _run(monkeypatch, False, hc, w, None, 512, 1.0)
    sa, sb = a[0], b[0]
    assert torch.equal(sa[:, 4:], sb[:, 4:])  # no labels: both leave the label columns at 0
    _compare((sa, a[1]), (sb, b[1]), torch.full((200,), IGNORE, device="cuda"))


@needs_sm90a
@pytest.mark.parametrize("case", ["fp16", "bias", "hidden896", "vocab_not_8", "softcap"])
def test_where_the_path_does_not_apply_results_are_the_host_loops(monkeypatch, case):
    """Outside the fused path's conditions the call takes the host loop: bit-identical with the switch on or off."""
    hidden = 896 if case == "hidden896" else 1024
    vocab = 2052 if case == "vocab_not_8" else 2048
    hc, w, y = _inputs(100, hidden, vocab, seed=11)
    if case == "fp16":
        hc, w = hc.half(), w.half()
    bias = torch.randn(vocab, device="cuda").to(hc.dtype) if case == "bias" else None
    softcap = 30.0 if case == "softcap" else 0.0
    outs = []
    for fused in (True, False):
        monkeypatch.setenv("SWIFTLORA_LM_HEAD_FUSED", "1" if fused else "0")
        stats = torch.zeros(100, 6, device="cuda")
        g = torch.zeros(100, hidden, device="cuda")
        _op(hc, w, bias, y, stats, g, None, 1024, IGNORE, softcap, 1.0)
        outs.append((stats, g))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_sm90a
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_linear_cross_entropy_through_the_fused_path(monkeypatch, smoothing):
    hc, w, y = _inputs(1500, 1024, 4096, seed=5)
    res = []
    for fused in (True, False):
        monkeypatch.setenv("SWIFTLORA_LM_HEAD_FUSED", "1" if fused else "0")
        h = hc.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(h, w, y, label_smoothing=smoothing, memory_budget_mb=4)
        loss.backward()
        res.append((loss.detach().double(), h.grad.double()))
    assert abs(res[0][0].item() - res[1][0].item()) <= 1e-3 * abs(res[1][0].item())
    assert rel_err(res[0][1], res[1][1]) < 2e-2


@needs_sm90a
def test_token_logprobs_through_the_fused_path(monkeypatch):
    hc, w, y = _inputs(1200, 1024, 4096, seed=9)
    y[y == IGNORE] = 0
    res = []
    for fused in (True, False):
        monkeypatch.setenv("SWIFTLORA_LM_HEAD_FUSED", "1" if fused else "0")
        h = hc.clone().requires_grad_(True)
        lp = token_logprobs(h, w, y, memory_budget_mb=4)
        (lp * torch.linspace(-1, 1, lp.numel(), device="cuda").view_as(lp)).sum().backward()
        res.append((lp.detach().double(), h.grad.double()))
    assert (res[0][0] - res[1][0]).abs().max().item() < 2e-2
    assert rel_err(res[0][1], res[1][1]) < 2e-2
