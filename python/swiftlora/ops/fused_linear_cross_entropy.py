"""Linear layer + cross-entropy (an LM head and its loss) without ever holding the ``[N, V]`` logits.

A frozen head (LoRA / QLoRA: only grad_hidden needed) goes through vocabulary blocks of 2048-token chunks,
accumulating the softmax-weighted rows of W flash-attention style (:mod:`.lm_head_blocks`); ``memory_budget_mb``
bounds the transient logits blocks (two in flight). Otherwise (trainable weight or bias, an explicit ``chunk_size``,
or softcap together with label smoothing) tokens are processed in chunks of ``C`` rows: ``logits_c = hidden_c @
weightᵀ (+ bias)`` (a GEMM in the input dtype), then ``cross_entropy_fused_`` turns that buffer into the loss and,
in place, the logits' gradient, from which ``grad_hidden_c = grad_c @ weight`` and ``grad_weight += grad_cᵀ @
hidden_c`` (float32 accumulation for 16-bit weights; bias: column sums). All gradients are made in the forward and
kept; the backward only scales them by the incoming gradient (``scale_rows_``, which skips a scale of exactly 1
without a host sync). In float16 the chunks' gradients stay at unit scale and grad_hidden takes the mean's 1/count
in the backward with the incoming gradient (see cross_entropy.forward_grad_scale). With ``reduction="none"`` and a
trainable weight or bias the per-token weights are only known in the backward, so there the forward computes the
loss alone and the backward recomputes the chunks.

Chunk size (:func:`chunk_rows`) is a deterministic function of the shapes, dtype and ``memory_budget_mb``.
"""
from __future__ import annotations

import math

import torch

from .._compat import addmm_fp32_, below_autograd
from .cross_entropy import (backward_scale, ce_options, cross_entropy_reference, forward_grad_scale, mean_divisor,
                            reduce_rows, row_loss, rows_of)
from .lm_head_blocks import (SUM_Z, block_plan, head_chunks, issue_first, label_index, label_masks,
                             label_rows)

_lib = torch.ops.swiftlora
# 64 MiB of logits per chunk: 256 rows at V = 128256 bf16, which with grad_hidden ([N, H]: 32 MiB at 8192 x 2048)
# and cuBLAS's workspace stays inside the issue's 128 MiB of extra memory.
DEFAULT_MEMORY_BUDGET_MB = 64
ROW_ALIGN = 64  # chunks are whole 64-row GEMM tiles when the budget allows
# A trainable head's chunks hold at least this many rows: each chunk's update of the float32 grad_weight accumulator
# reads and writes it whole (8·V·H bytes: 2.1 GB at V = 128256, H = 2048), so with few rows it is memory-bound and
# costs more than the chunk's GEMMs. H100, N = 8192, fwd+bwd (3 GEMMs 18.7 ms): 256 rows 50.1 ms, 512 31.1,
# 1024 23.2 (+190 MiB of logits over 256 rows), 2048 21.4 (+440 MiB); bench/NOTES.md ("a trainable head's chunks").
TRAINABLE_HEAD_MIN_ROWS = 1024


def chunk_rows(n: int, vocab: int, dtype: torch.dtype, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
               chunk_size: int | None = None, fn: str = "fused_linear_cross_entropy",
               trainable_head: bool = False) -> int:
    """Rows per chunk for ``n`` tokens and a ``vocab``-wide logits chunk in ``dtype``.

    The one buffer whose size depends on the chunk is the logits chunk, ``C·V·itemsize`` bytes (its gradient is
    written over it; grad_hidden is ``[N, H]`` whatever C, so H does not enter). ``cap = ⌊budget / (V·itemsize)⌋``
    rows, rounded down to a multiple of 64 when it is at least 64; ``n`` is then split into ``⌈n / cap⌉``
    near-equal chunks, each rounded up to a multiple of 64 within ``cap``. With ``trainable_head`` (the weight or
    bias needs a gradient) ``cap`` is at least :data:`TRAINABLE_HEAD_MIN_ROWS`, whatever the budget: the float32
    grad_weight accumulator (``V·H·4`` bytes, far above any logits budget) is read and written once per chunk.
    ``chunk_size`` overrides all this.
    Examples, n = 8192 bf16 at 64 MiB: V = 128256: cap 261 -> 256, 32 chunks of 256; V = 151936: cap 220 -> 192,
    43 chunks of 192 (the last 128).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
        return min(chunk_size, max(n, 1))
    if not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0 and math.isfinite(memory_budget_mb)):
        raise ValueError(f"{fn}: memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    cap = max(1, int(memory_budget_mb * 2**20) // (vocab * dtype.itemsize))
    if trainable_head:
        cap = max(cap, TRAINABLE_HEAD_MIN_ROWS)
    if cap >= n:
        return max(n, 1)
    if cap >= ROW_ALIGN:
        cap -= cap % ROW_ALIGN
    rows = -(-n // -(-n // cap))
    if cap >= ROW_ALIGN:
        rows = min(cap, -(-rows // ROW_ALIGN) * ROW_ALIGN)
    return rows


def check_linear(fn: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """hidden [..., H], weight [V, H] and bias [V] of one dtype and device."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden must be [..., {weight.shape[1]}] (weight's dim 1), got "
                         f"{tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{fn}: weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if hidden.device != weight.device:
        raise RuntimeError(f"{fn}: weight must be on the device of hidden ({hidden.device}), got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must be a tensor [{weight.shape[0]}], got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"{fn}: bias must have weight's dtype and device ({weight.dtype}, {weight.device}), got "
                            f"{bias.dtype}, {bias.device}")


def chunk_logits(hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hc @ weightᵀ (+ bias)`` in the input dtype: a fresh ``[C, V]`` buffer the kernels may overwrite."""
    return torch.mm(hc, weight.t()) if bias is None else torch.addmm(bias, hc, weight.t())


def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, **options):
    """Plain PyTorch: ``F.linear`` in the input dtype (the full logits), then cross_entropy_reference."""
    return cross_entropy_reference(torch.nn.functional.linear(hidden, weight, bias), labels, **options)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
                               z_loss: float = 0.0, num_items_in_batch: int | torch.Tensor | None = None,
                               chunk_size: int | None = None,
                               memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> torch.Tensor:
    """``cross_entropy(hidden @ weightᵀ + bias, labels, ...)`` computed chunk by chunk.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16 (e.g. the last hidden states).
        weight: ``[V, H]`` (the LM head), hidden's dtype and device; trainable or frozen.
        labels: ``[...]`` (or flat ``[N]``) int64/int32, in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss, num_items_in_batch: as
            :func:`swiftlora.ops.cross_entropy` (softcap and logit_scale apply to the logits ``hidden @ weightᵀ +
            bias``).
        chunk_size: rows per chunk, overriding the budget.
        memory_budget_mb: size of the transient logits chunk (see :func:`chunk_rows`); for a frozen head, of the
            two vocabulary-block buffers together (see :func:`.lm_head_blocks.block_plan`). A trainable head (its
            weight or bias needs a gradient) also holds a float32 ``[V, H]`` grad_weight accumulator, and its chunks
            hold at least :data:`TRAINABLE_HEAD_MIN_ROWS` rows whatever the budget.
    Returns:
        float32 loss: a scalar, or ``[...]`` for reduction "none".
    """
    fn = "fused_linear_cross_entropy"
    kind = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(kind):
        # as F.linear under autocast would: the GEMMs in autocast's dtype; then the kernels on operands of one dtype
        dt = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(dt), weight.to(dt), labels, None if bias is None else bias.to(dt), ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
                z_loss=z_loss, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                memory_budget_mb=memory_budget_mb)
    o = ce_options(fn, ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss, num_items_in_batch)
    check_linear(fn, hidden, weight, bias)
    h2, y, batch = rows_of(fn, hidden, labels, last="hidden")
    params = (hidden, weight) + ((bias,) if bias is not None else ())
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    trainable_head = grads and any(t.requires_grad for t in params[1:])
    rows = chunk_rows(h2.shape[0], weight.shape[0], weight.dtype, memory_budget_mb, chunk_size, fn, trainable_head)
    if grads:
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, h2.detach(), y, o, num_items_in_batch, rows,
                                              memory_budget_mb if chunk_size is None else None)
    with below_autograd():
        loss = _loss_chunks(h2, weight, bias, y, o, rows)
    divisor = mean_divisor(y, o.ignore_index, num_items_in_batch) if o.reduction == "mean" else None
    return reduce_rows(loss, o, batch, divisor)


def _loss_chunks(h2, weight, bias, y, o, rows) -> torch.Tensor:
    """Per-row loss only (softmax_stats per chunk: nothing written back)."""
    out = torch.empty(h2.shape[0], dtype=torch.float32, device=h2.device)
    for s in range(0, h2.shape[0], rows):
        e = min(s + rows, h2.shape[0])
        logits = chunk_logits(h2[s:e], weight, bias)
        stats = _lib.softmax_stats(logits, y[s:e], o.ignore_index, o.softcap, o.logit_scale, False)
        out[s:e] = row_loss(stats, y[s:e] != o.ignore_index, o, weight.shape[0])
    return out


def _grad_chunks(h2, weight, bias, y, o, rows, scale, need_h, need_w, need_b, wb_factor=None):
    """Per-row loss and the gradients of Σ scale_i·loss_i w.r.t. hidden rows, weight and bias (None if not needed).
    scale: float32 [] or [N]; wb_factor: float32 [] applied to the float32 weight/bias sums before their cast."""
    n, dev = h2.shape[0], h2.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    grad_h = torch.empty(h2.shape, dtype=h2.dtype, device=dev) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=dev) if need_w else None  # chunk 0: beta = 0
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None
    for s in range(0, n, rows):
        e = min(s + rows, n)
        hc = h2[s:e]
        logits = chunk_logits(hc, weight, bias)
        sc = scale if scale.dim() == 0 else scale[s:e]
        loss[s:e] = _lib.cross_entropy_fused_(logits, y[s:e], o.ignore_index, o.label_smoothing, o.z_loss,
                                              o.softcap, o.logit_scale, sc)[0]
        if need_h:
            torch.mm(logits, weight, out=grad_h[s:e])
        if need_w:
            addmm_fp32_(grad_w, logits.t(), hc, beta=1.0 if s else 0.0)
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    logits = None  # the last chunk goes before the casts below allocate: not part of the peak
    if wb_factor is not None:
        for acc in (grad_w, grad_b):
            if acc is not None:
                acc.mul_(wb_factor)
    grad_w = grad_w.to(weight.dtype) if need_w else None
    grad_b = grad_b.to(bias.dtype) if need_b else None
    return loss, grad_h, grad_w, grad_b


def _frozen_head_chunks(h2, weight, bias, y, o, budget):
    """(stats [N, 6], the chunks of head_chunks) for _frozen_head_grad, the first chunk's blocks already issued: the
    GPU works on them while the host issues the small per-call ops (the divisor, the per-row factors)."""
    plan = block_plan(h2.shape[0], weight.shape[0], h2.dtype, budget)
    stats = torch.empty(h2.shape[0], 6, dtype=torch.float32, device=h2.device)
    return stats, issue_first(head_chunks(h2, weight, bias, y, o.ignore_index, o.softcap, o.logit_scale, plan,
                                          stats=stats, sums=SUM_Z if o.label_smoothing else 0))


def _frozen_head_grad(head, h2, weight, y, o, scale):
    """Per-row loss and grad_hidden of Σ scale·loss_i for a frozen head from ``head = _frozen_head_chunks(...)``
    (vocabulary blocks, lm_head_blocks): grad_h = scale·((1 + 2·z_loss·lse)/s · G − (1−ε)·dz_label·W[label] −
    (ε/V)·Σ_j dz_j W_j). The per-row factors that need no block sums are formed once per call and the loss once from
    all chunks' statistics: per chunk only what needs its G (~6 small ops besides the lm_head_blocks_ call)."""
    stats, chunks = head
    vocab = weight.shape[0]
    grad_h = torch.empty(h2.shape, dtype=h2.dtype, device=h2.device)
    eps = o.label_smoothing
    known, fill = label_masks(y, o.ignore_index, vocab)
    gate = torch.where(known, scale, fill)
    index, label_coef = label_index(y, known), -(1.0 - eps) * gate
    if eps:  # Σ_j dz_j·W_j for the label-smoothing term: dz = logit_scale everywhere (no softcap on this path)
        col_sum = weight.sum(0, dtype=torch.float32) * o.logit_scale
        eps_coef = (-(eps / vocab) * gate)[:, None]
    for c in chunks:
        m, s, _, _, _, dz_label = c.stats.unbind(1)
        rows = slice(c.start, c.end)
        a = gate[rows] * (1.0 + 2.0 * o.z_loss * (m + torch.log(s))) / s if o.z_loss else gate[rows] / s
        gh = c.g.mul_(a[:, None])
        gh.addcmul_(label_rows(weight, index[rows]), (label_coef[rows] * dz_label)[:, None])
        if eps:
            gh.addcmul_(col_sum[None, :], eps_coef[rows])
        grad_h[rows] = gh
    m, s, z_sum, _, z_label, _ = stats.unbind(1)
    log_s = torch.log(s)
    row = log_s + (1.0 - eps) * (m - z_label)
    if eps:
        row = row + eps * (m - z_sum / vocab)
    if o.z_loss:
        lse = m + log_s
        row = row + o.z_loss * lse * lse
    return torch.where(known, row, fill), grad_h


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Gradients in the forward (scaled in the backward), or, for reduction "none" with a trainable weight/bias,
    chunks recomputed in the backward with the per-token gradient as grad_scale."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, h2, y, o, num_items, rows, budget):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        ctx.o, ctx.rows, ctx.shape, ctx.need, ctx.used = o, rows, hidden.shape, (need_h, need_w, need_b), False
        ctx.deferred = o.reduction == "none" and (need_w or need_b)
        frozen = (not ctx.deferred and budget is not None and need_h and not (need_w or need_b)
                  and not (o.softcap and o.label_smoothing))
        with below_autograd():
            head = _frozen_head_chunks(h2, weight, bias, y, o, budget) if frozen else None  # first: the GPU's work
            divisor, inverse = (mean_divisor(y, o.ignore_index, num_items, True) if o.reduction == "mean"
                                else (None, None))
            if ctx.deferred:
                loss = _loss_chunks(h2, weight, bias, y, o, rows)
                ctx.save_for_backward(h2, weight, bias, y)
            else:
                # fp16: unit-scale chunks (see forward_grad_scale); grad_hidden keeps that scale until the
                # backward, the float32 weight/bias sums take 1/divisor before their cast (they could overflow)
                scale, ctx.divisor = forward_grad_scale(h2.dtype, divisor, h2.device, inverse)
                if frozen:
                    loss, gh = _frozen_head_grad(head, h2, weight, y, o, scale)
                    gw = gb = None
                else:
                    wb = None if ctx.divisor is None else 1.0 / ctx.divisor
                    loss, gh, gw, gb = _grad_chunks(h2, weight, bias, y, o, rows, scale, need_h, need_w, need_b, wb)
                ctx.save_for_backward(gh, gw, gb)
        return reduce_rows(loss, o, hidden.shape[:-1], divisor)

    @staticmethod
    def backward(ctx, grad):
        o = ctx.o
        with below_autograd():
            if ctx.deferred:
                h2, weight, bias, y = ctx.saved_tensors
                scale = grad.reshape(-1).to(torch.float32)
                _, gh, gw, gb = _grad_chunks(h2, weight, bias, y, o, ctx.rows, scale, *ctx.need)
            else:
                if ctx.used:
                    raise RuntimeError("fused_linear_cross_entropy: the backward can run only once (its gradients "
                                       "are made in the forward and scaled in place); drop retain_graph")
                ctx.used = True
                gh, gw, gb = ctx.saved_tensors
                if gh is not None:
                    _lib.scale_rows_(gh, backward_scale(grad, o, ctx.divisor))
                for g in (gw, gb):  # a per-row scale ("none") never reaches here with these
                    if g is not None:
                        _lib.scale_rows_(g, backward_scale(grad, o, None))
        return (None if gh is None else gh.view(ctx.shape)), gw, gb, None, None, None, None, None, None
