"""A frozen LM head's softmax, accumulated over vocabulary blocks like flash attention's output.

For hidden rows ``h`` and a frozen head ``W [V, H]`` (LoRA / QLoRA training, RL policies), the gradient of a
cross-entropy or log-prob w.r.t. ``h`` only needs ``Σ_j p_j·dz_j·W_j``: a softmax-weighted sum of W's rows, which
is attention with query h and keys = values = W. So instead of chunking tokens (where each chunk streams all of W
through two skinny GEMMs and the loss kernel makes a pass over every ``[C, V]`` logits chunk), tokens are taken in
large chunks (2048 rows) and the vocabulary in blocks: per block, ``logits = h_c @ W_bᵀ``, then
``online_softmax_block_`` updates each row's running (max m, Σe^{z−m}, ...) and turns the block into
``P = e^{z−m}·dz/dx``, and ``G = r·G + P @ W_b`` (float32) accumulates, ``r`` rescaling earlier blocks when m
grows. At the end of a chunk ``lse = m + log s`` and ``Σ_j p_j dz_j W_j = G / s``. Both GEMMs keep well-shaped
tiles (M = 2048) and the transient block (two in flight within ``memory_budget_mb``) mostly stays in L2 between them.

Used by fused_linear_cross_entropy and token_logprobs when neither the head nor its bias needs a gradient.
Combinations it does not cover (softcap with label smoothing, whose Σ_j dz_j·W_j term varies per row) take the
token-chunked path.
"""
from __future__ import annotations

import itertools
from typing import Iterator, NamedTuple

import torch

from .._compat import addmm_fp32_

_lib = torch.ops.swiftlora
ROW_CHUNK = 2048  # tokens per chunk: 16 x 128-row GEMM tiles, and G [2048, H] float32 (16 MiB at H = 2048)
COL_ALIGN = 256
SUM_Z, SUM_EZ = 1, 2  # head_chunks(sums=...): the optional statistics a caller reads (Σz; Σe^{z−m}·z)
CUDA_MAX_COLS = {2: 8192, 4: 4096}  # the CUDA kernel's register-resident row, by element size
# A block stays in the H100's 50 MB L2 between the GEMM that writes it, the softmax kernel and the GEMM that reads
# it (measured: 64 MiB blocks made the kernel run at 1.9 TB/s, from HBM)
L2_BLOCK_BYTES = 32 * 2**20


class BlockPlan(NamedTuple):
    rows: int  # tokens per chunk
    cols: int  # vocabulary columns per block


def block_plan(n: int, vocab: int, dtype: torch.dtype, memory_budget_mb: float) -> BlockPlan:
    """Chunk and block sizes, a deterministic function of the shapes, dtype and budget. The budget bounds the
    ``[rows, cols]`` logits buffers: one when the vocabulary fits one block, else the two that head_chunks keeps in
    flight (half the budget each; with_gz's pz buffers come on top). A block is at most L2_BLOCK_BYTES."""
    rows = max(1, min(n, ROW_CHUNK))
    per_col, cap = rows * dtype.itemsize, CUDA_MAX_COLS.get(dtype.itemsize, 8192)
    budget = memory_budget_mb * 2**20
    cols = min(int(min(budget, L2_BLOCK_BYTES)) // per_col, cap)
    if cols < vocab:  # several blocks: two buffers share the budget
        cols = min(int(min(budget / 2, L2_BLOCK_BYTES)) // per_col, cap)
    cols = min(cols, vocab)
    if cols >= COL_ALIGN and cols < vocab:
        cols -= cols % COL_ALIGN
    return BlockPlan(rows, max(cols, 1))


def online_softmax_block_reference(block, stats, labels, pz, col0, ignore_index, softcap, logit_scale,
                                   g=None, gz=None, g_rescale=None):
    """Plain PyTorch (float32) version of ``online_softmax_block_``, same in-place contract; returns the rescale.

    With ``g_rescale`` (float32 [N]) it also multiplies row i of ``g`` (and ``gz``), float32 [N, H], by
    ``g_rescale[i]``, leaving rows whose factor is exactly 1 untouched, as ``scale_rows_`` does."""
    if (g is None) != (g_rescale is None) or (gz is not None and g is None):
        raise ValueError("online_softmax_block_: g and g_rescale come together; gz needs them")
    if g_rescale is not None:
        keep = (g_rescale == 1)[:, None]
        for t in (g, gz):
            if t is not None:
                t.copy_(torch.where(keep, t, t * g_rescale[:, None]))
    x = block.to(torch.float32)
    if softcap:
        u = x * (logit_scale / softcap)
        z, dz = softcap * torch.tanh(u), logit_scale * (1 - torch.tanh(u) ** 2)
    else:
        z, dz = x * logit_scale, torch.full_like(x, logit_scale)
    m_old = stats[:, 0]
    slack = 8.0 if block.dtype == torch.float16 else 16.0  # csrc/common/online_softmax.h
    bm = z.max(1).values
    m = torch.where(bm > m_old + slack, bm, m_old)
    r = torch.where(m_old == -torch.inf, 0.0, torch.where(m == m_old, 1.0, torch.exp(m_old - m)))
    e = torch.exp(z - m[:, None])
    stats[:, 1] = stats[:, 1] * r + e.sum(1)
    stats[:, 2] += z.sum(1)
    stats[:, 3] = stats[:, 3] * r + (e * z).sum(1)
    stats[:, 0] = m
    if labels is not None:
        col = labels.long() - col0
        here = (labels.long() != ignore_index) & (col >= 0) & (col < block.shape[1])
        idx = torch.where(here, col, 0)[:, None]
        stats[:, 4] = torch.where(here, z.gather(1, idx)[:, 0], stats[:, 4])
        stats[:, 5] = torch.where(here, dz.gather(1, idx)[:, 0], stats[:, 5])
    if pz is not None:
        pz.copy_(e * z * dz)
    block.copy_(e * dz)
    return r


def reset_stats_(stats: torch.Tensor) -> torch.Tensor:
    """The starting statistics, in place: m = −inf, everything else 0."""
    stats.zero_()
    stats[:, 0].fill_(-torch.inf)
    return stats


def new_stats(rows: int, device) -> torch.Tensor:
    """Fresh starting statistics [rows, 6] float32 (see reset_stats_)."""
    return reset_stats_(torch.empty(rows, 6, dtype=torch.float32, device=device))


class ChunkSums(NamedTuple):
    """One token chunk's sums. ``g`` and ``gz`` (and ``stats`` unless the caller passed head_chunks an [N, 6] buffer)
    are buffers that the next chunk reuses: consume them (they may be modified in place) before advancing the
    iterator."""
    start: int
    end: int
    stats: torch.Tensor  # float32 [C, 6]: m, s, Σz, Σe^{z−m}z, z_label, dz_label
    g: torch.Tensor  # float32 [C, H]: Σ_j e^{z_j−m}·dz_j·W_j
    gz: torch.Tensor | None  # float32 [C, H]: Σ_j e^{z_j−m}·z_j·dz_j·W_j (when asked)


# CUDA: each block's softmax on a side stream beside the next block's GEMM. Off by default: measured on the H100
# (bench/results/h100-20261126-xent2-partial.log) it gained 1.3% on fused_linear_cross_entropy (15.35 vs 15.55 ms) and
# lost 16% on token_logprobs fwd+bwd (21.2 vs 18.3 ms): cuBLAS's GEMMs leave the side stream no SM to run on.
OVERLAP = False
# The block loop in C++ (lm_head_blocks_, one call per token chunk); False: the Python loop head_chunks_reference on
# one stream, bit-identical, kept so that benchmarks can time the two in one run (provider swiftlora_pyloop).
NATIVE = True
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One side stream per device, kept for the process (a stream from torch's pool, default priority)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", key))
    return _SIDE_STREAMS[key]


def head_chunks(h2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor | None,
                ignore_index: int, softcap: float, logit_scale: float, plan: BlockPlan,
                with_gz: bool = False, overlap: bool | None = None,
                stats: torch.Tensor | None = None, sums: int = SUM_Z | SUM_EZ) -> Iterator[ChunkSums]:
    """Yields each token chunk's row statistics and float32 softmax-weighted sums of W's rows.

    Schedule per chunk (bench/NOTES.md, "Third step"): the logits GEMM of block j+1 is issued before block j's
    rescale + accumulation, into the other of two block buffers. One ``lm_head_blocks_`` call per chunk runs the
    whole vocabulary loop from C++ (the host no longer falls behind the GPU's ~0.06 ms launches); with ``overlap``
    (default: CUDA and ``OVERLAP``, off) head_chunks_reference runs it from Python with the softmax kernels on a
    side stream. Both apply the same float32 operations to every buffer in the same order (the C++ loop does each
    rescale of G inside the next block's softmax launch instead of a scale_rows_ launch), so the sums are
    bit-identical.

    ``stats``: an optional float32 ``[N, 6]`` buffer that keeps every chunk's statistics (rows start:end), so the
    caller can turn them into per-row results once per call; by default one ``[rows, 6]`` buffer is reused.
    ``sums``: the optional statistics the caller reads (``SUM_Z``: ``stats[:, 2]``, ``SUM_EZ``: ``stats[:, 3]``); on
    sm_90a the fused kernels skip the others, which are then unspecified.
    """
    overlap = (OVERLAP if overlap is None else overlap) and h2.is_cuda and not torch.compiler.is_compiling()
    if overlap or not NATIVE:
        return head_chunks_reference(h2, weight, bias, labels, ignore_index, softcap, logit_scale, plan, with_gz,
                                     overlap, stats)
    return _native_chunks(h2, weight, bias, labels, ignore_index, softcap, logit_scale, plan, with_gz, stats, sums)


def _sum_buffers(h2, plan, with_gz, stats):
    """(whether stats is the caller's [N, 6] buffer (chunk rows start:end), stats, G, Gz or None): allocated once per
    call and reused by every chunk (the caller is done with a chunk before asking for the next)."""
    rows, hdim, dev = min(plan.rows, h2.shape[0]), h2.shape[1], h2.device
    all_stats = stats is not None
    stats = torch.empty(rows, 6, dtype=torch.float32, device=dev) if stats is None else stats
    g = torch.empty(rows, hdim, dtype=torch.float32, device=dev)
    return all_stats, stats, g, torch.empty_like(g) if with_gz else None


def _native_chunks(h2, weight, bias, labels, ignore_index, softcap, logit_scale, plan, with_gz, stats, sums):
    """head_chunks through ``lm_head_blocks_``, one call per token chunk."""
    n = h2.shape[0]
    all_stats, stats, g, gz = _sum_buffers(h2, plan, with_gz, stats)
    for s in range(0, n, plan.rows):
        e = min(s + plan.rows, n)
        c = e - s
        stats_c, g_c, gz_c = stats[s:e] if all_stats else stats[:c], g[:c], None if gz is None else gz[:c]
        _lib.lm_head_blocks_(h2[s:e], weight, bias, None if labels is None else labels[s:e], stats_c, g_c, gz_c,
                             plan.cols, ignore_index, softcap, logit_scale, sums)
        yield ChunkSums(s, e, stats_c, g_c, gz_c)


def head_chunks_reference(h2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor | None, ignore_index: int, softcap: float, logit_scale: float,
                          plan: BlockPlan, with_gz: bool = False, overlap: bool | None = None,
                          stats: torch.Tensor | None = None) -> Iterator[ChunkSums]:
    """head_chunks as a Python loop: the plain-PyTorch reference of ``lm_head_blocks_`` (tests compare the two bit
    for bit) and the ``overlap`` path, whose side stream the C++ op does not have.

    With ``overlap`` (default: CUDA and ``OVERLAP``, off) the softmax kernels run in block order on a side stream, so
    block j's softmax runs beside the GEMMs. Every buffer sees the same sequence of ops as in one stream (the stats:
    softmax j in order; G: scale by r_j, add block j, in order), so the results do not depend on ``overlap``.
    """
    n = h2.shape[0]
    vocab, dev = weight.shape[0], h2.device
    overlap = (OVERLAP if overlap is None else overlap) and h2.is_cuda and not torch.compiler.is_compiling()
    side = _side_stream(dev) if overlap else None
    main = torch.cuda.current_stream(dev) if side is not None else None
    # one event for "block j's GEMM is done" (the side stream waits on it at once, so one is enough) and two for
    # "block j's softmax is done" (the main stream waits on block j's before block j + 2 records it again)
    gemm_done, sm_done = (torch.cuda.Event(), (torch.cuda.Event(), torch.cuda.Event())) if side else (None, None)
    spans = [(v0, min(v0 + plan.cols, vocab)) for v0 in range(0, vocab, plan.cols)]
    nbuf = min(len(spans), 2)
    # W's blocks (and their transposes) once per call, not per chunk: the loop below is the host's hot path
    wbs = [weight[v0:v1] for v0, v1 in spans]
    wbts = [wb.t() for wb in wbs]
    bbs = [None if bias is None else bias[v0:v1] for v0, v1 in spans]
    all_stats, stats, g, gz = _sum_buffers(h2, plan, with_gz, stats)

    def softmax(j, block, stats_c, yc, pz):
        """online_softmax_block_ (on the side stream when overlapping): (rescale r, event or None)."""
        if side is None:
            return _lib.online_softmax_block_(block, stats_c, yc, pz, spans[j][0], ignore_index, softcap,
                                              logit_scale), None
        gemm_done.record(main)  # the block's GEMM (and, for block 0, the stats reset) are issued before
        side.wait_event(gemm_done)
        with torch.cuda.stream(side):
            r = _lib.online_softmax_block_(block, stats_c, yc, pz, spans[j][0], ignore_index, softcap, logit_scale)
        r.record_stream(main)  # made on the side stream, read by scale_rows_ on the main one
        done = sm_done[j % 2]
        done.record(side)
        return r, done

    def accumulate(g_c, gz_c, j, block, pz, r, done):
        """G = r·G + P @ W_b (and Gz) on the main stream, after the block's softmax."""
        if done is not None:
            main.wait_event(done)
        for acc, p in ((g_c, block), (gz_c, pz)):
            if acc is not None:
                if j:
                    _lib.scale_rows_(acc, r)
                addmm_fp32_(acc, p, wbs[j], beta=1.0 if j else 0.0)  # block 0 overwrites: G needs no reset

    try:
        for s in range(0, n, plan.rows):
            e = min(s + plan.rows, n)
            c = e - s
            hc, yc = h2[s:e], None if labels is None else labels[s:e]
            stats_c, g_c, gz_c = stats[s:e] if all_stats else stats[:c], g[:c], None if gz is None else gz[:c]
            # per chunk, so that the caller's work on the chunk's sums does not coexist with them; each buffer
            # starts 256-byte aligned whatever the chunk's size (cuBLAS and the kernel's 16-byte loads)
            bufs = torch.empty(nbuf, -(-c * (spans[0][1] - spans[0][0]) // 128) * 128, dtype=h2.dtype, device=dev)
            pzs = torch.empty_like(bufs) if with_gz else None
            pending = None
            for j, (v0, v1) in enumerate(spans):
                block = bufs[j % 2, :c * (v1 - v0)].view(c, v1 - v0)
                if bias is None:
                    torch.mm(hc, wbts[j], out=block)
                else:
                    torch.addmm(bbs[j], hc, wbts[j], out=block)
                if j == 0:  # after block 0's GEMM, which does not read them (lm_head_blocks_ does the same)
                    reset_stats_(stats_c)
                pz = None if pzs is None else pzs[j % 2, :c * (v1 - v0)].view(c, v1 - v0)
                r, done = softmax(j, block, stats_c, yc, pz)
                if pending is not None:  # the previous block, while this block's softmax runs
                    accumulate(g_c, gz_c, *pending)
                pending = (j, block, pz, r, done)
            accumulate(g_c, gz_c, *pending)
            del bufs, pzs, block, pz, pending
            yield ChunkSums(s, e, stats_c, g_c, gz_c)
    finally:
        if side is not None:  # an abandoned iterator: no side-stream work may outlive the buffers
            main.wait_stream(side)


def issue_first(chunks: Iterator[ChunkSums]) -> Iterator[ChunkSums]:
    """``chunks`` (head_chunks' iterator) with its first chunk's work issued now: the GPU starts on it while the host
    issues the caller's small per-call ops, which would otherwise come first and leave the GPU idle."""
    first = next(chunks, None)
    return iter(()) if first is None else itertools.chain((first,), chunks)


def label_masks(labels: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(known, fill) per row, once per call: known = labelled with a label in [0, V); fill = NaN where a label lies
    outside [0, V) (as the kernels give, without a host sync), else 0: the value of a row that is not known."""
    valid = labels != ignore_index
    known = valid & (labels >= 0) & (labels < vocab)
    # valid ^ known, not valid & ~known: bitwise_not is the benchmark's L2-flush kernel, which its kernel-time count
    # must not see
    return known, torch.where(valid ^ known, torch.nan, 0.0)


def label_index(labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """int64 row indices into W for label_rows: the label where known, else row 0 (callers zero its coefficient)."""
    return torch.where(known, labels.long(), 0)


def label_rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``W[index]`` per row in W's dtype. Callers add it into float32 sums with ``addcmul_``, which upcasts exactly,
    without a float32 copy (float64 is narrowed to float32, the sums' dtype)."""
    rows = weight.index_select(0, index)
    return rows if rows.dtype.itemsize <= 4 else rows.to(torch.float32)


@torch.library.register_fake("swiftlora::lm_head_blocks_")
def _(hc, weight, bias, labels, stats, g, gz, cols, ignore_index, softcap, logit_scale, sums=3):
    return None


@torch.library.register_fake("swiftlora::online_softmax_block_")
def _(block, stats, labels, pz, col0, ignore_index, softcap, logit_scale, g=None, gz=None, g_rescale=None):
    return block.new_empty(block.shape[0], dtype=torch.float32)
