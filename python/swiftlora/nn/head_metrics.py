"""Per-token statistics of the next-token distribution besides the log-prob, as TRL's fused LM head returns them:
``entropy`` (differentiable: GRPO's entropy bonus backpropagates through it), ``is_top1``, ``mean_logits`` and
``log_sum_sq_probs`` (metrics, no gradient).

One chunked pass over the labelled rows computes them all from ``z = softcap·tanh(scale·x/softcap)`` (or
``scale·x``), float32 per chunk of logits, never the whole ``[N, V]``. The entropy's backward, which most callers
never reach (SFT and DPO only log it), recomputes each chunk: ``dH/dz_j = p_j (E − z_j)`` with ``E = Σ p z``,
times ``dz/dx`` (``scale·(1 − tanh²)`` with soft-capping), then ``grad_hidden = G @ W`` and, for a trainable head,
``grad_W += Gᵀ @ hidden``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.fused_linear_cross_entropy import DEFAULT_MEMORY_BUDGET_MB, chunk_rows

STATS = ("entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


def _z(logits: torch.Tensor, softcap: float | None, scale: float) -> torch.Tensor:
    z = logits.float() * scale
    return torch.tanh(z / softcap) * softcap if softcap is not None else z


def _rows(h: torch.Tensor, weight: torch.Tensor) -> int:
    # the float32 copies of a chunk (z, log p, p) take several times the logits' bytes: a quarter of the budget
    return chunk_rows(h.shape[0], weight.shape[0], weight.dtype, DEFAULT_MEMORY_BUDGET_MB / 4, None, "head_metrics")


def _stats(h, weight, bias, y, softcap, scale):
    n, dev = h.shape[0], h.device
    out = {"entropy": torch.empty(n, dtype=torch.float32, device=dev),
           "is_top1": torch.empty(n, dtype=torch.bool, device=dev),
           "mean_logits": torch.empty(n, dtype=torch.float32, device=dev),
           "log_sum_sq_probs": torch.empty(n, dtype=torch.float32, device=dev)}
    rows = _rows(h, weight)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        logits = nn.functional.linear(h[s:e], weight, bias)
        out["is_top1"][s:e] = logits.argmax(-1) == y[s:e]  # the first maximum, as TRL: a tie is not top-1
        z = _z(logits, softcap, scale)
        del logits
        logp = torch.log_softmax(z, -1)
        out["entropy"][s:e] = -(logp.exp() * logp).sum(-1)
        out["mean_logits"][s:e] = z.mean(-1)
        out["log_sum_sq_probs"][s:e] = torch.logsumexp(2 * logp, -1)
    return out


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, softcap, scale):
        with torch.no_grad():
            out = _stats(h, weight, bias, y, softcap, scale)
        ctx.save_for_backward(h, weight, bias)
        ctx.softcap, ctx.scale = softcap, scale
        others = [out[k] for k in STATS[1:]]
        ctx.mark_non_differentiable(*others)
        return (out["entropy"], *others)

    @staticmethod
    def backward(ctx, g_ent, *_):
        h, weight, bias = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        rows = _rows(h, weight)
        for s in range(0, h.shape[0], rows):
            e = min(s + rows, h.shape[0])
            with torch.no_grad():
                z = _z(nn.functional.linear(h[s:e], weight, bias), ctx.softcap, ctx.scale)
                p = torch.softmax(z, -1)
                expected = (p * z).sum(-1, keepdim=True)
                g = p * (expected - z) * g_ent[s:e, None].float() * ctx.scale
                if ctx.softcap is not None:
                    g *= 1 - (z / ctx.softcap).square()  # d(softcap·tanh(u/softcap))/du = 1 − tanh²
                g = g.to(weight.dtype)
                if need_h:
                    grad_h[s:e] = g @ weight
                if need_w:
                    grad_w += g.t().float() @ h[s:e].float()
                if need_b:
                    grad_b += g.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def head_metrics(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 softcap: float | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The statistics of ``softmax(z(h @ weightᵀ + bias))`` per row: each ``[N]`` (``entropy`` float32 and
    differentiable w.r.t. h, weight and bias; ``is_top1`` bool: ``argmax == y``; ``mean_logits`` and
    ``log_sum_sq_probs`` float32).

    Args:
        h: ``[N, H]`` rows (one dtype with weight). weight: ``[V, H]``; bias: ``[V]`` or None. y: ``[N]`` labels.
        softcap, scale: ``z = softcap·tanh(scale·x/softcap)`` (``scale·x`` without softcap); a temperature divides
            both (see :func:`swiftlora.nn.lm_head.head_token_outputs`).
    """
    return dict(zip(STATS, _Entropy.apply(h, weight, bias, y, softcap, float(scale))))
