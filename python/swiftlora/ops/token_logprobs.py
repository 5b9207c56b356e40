"""Per-token log-probabilities (and entropies) under ``hidden @ weightᵀ / temperature``, chunked so that no
``[N, V]`` logits or log-softmax tensor exists: what RL trainers (GRPO, PPO) need for the policy and reference
log-probs.

Forward, per chunk of rows: ``logits_c = hidden_c @ weightᵀ`` (input dtype), then ``softmax_stats`` with
``logit_scale = 1/temperature`` gives ``lse``, ``z[token]`` and ``E = Σ p z``: ``logprob = z[token] − lse``,
``entropy = lse − E``. Only ``lse`` and ``E`` (float32 ``[N]``) are kept. Backward, per chunk: the logits are
recomputed and ``softmax_grad_`` overwrites them with ``d/dx`` of ``Σ g_lp·logprob + g_ent·entropy``, i.e. the
coefficients ``a = −g_lp + g_ent·E, b = g_lp, c = 0, d = −g_ent`` (``dH/dz_j = p_j (E − z_j)``); then
``grad_hidden_c = grad_c @ weight`` and ``grad_weight += grad_cᵀ @ hidden_c`` (float32 accumulation).
"""
from __future__ import annotations

import math

import torch

from .._compat import addmm_fp32_, below_autograd
from .cross_entropy import rows_of
from .fused_linear_cross_entropy import DEFAULT_MEMORY_BUDGET_MB, check_linear, chunk_logits, chunk_rows

_lib = torch.ops.swiftlora


def token_logprobs_reference(hidden, weight, token_ids, *, temperature=1.0, with_entropy=False, ignore_index=-100):
    """Plain PyTorch: full logits ``F.linear`` in the input dtype, log_softmax in float32 (float64 for float64)."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight).to(compute) / temperature, -1)
    valid = token_ids != ignore_index
    lp = logp.gather(-1, torch.where(valid, token_ids, 0).long()[..., None])[..., 0]
    lp = torch.where(valid, lp, 0.0)
    if not with_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = False, ignore_index: int = -100, chunk_size: int | None = None,
                   memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
    """``log softmax(hidden @ weightᵀ / temperature)[token_ids]`` without the full logits.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16.
        weight: ``[V, H]`` (the LM head), hidden's dtype and device; trainable or frozen.
        token_ids: ``[...]`` (or flat ``[N]``) int64/int32 in ``[0, V)``; ``ignore_index`` entries (padding) get
            log-prob 0 and pass no gradient through it (their entropy is still computed).
        temperature: divides the logits (``logit_scale = 1/temperature``); finite and > 0.
        with_entropy: also return the entropy of each token's distribution.
        chunk_size, memory_budget_mb: chunking, as :func:`swiftlora.ops.fused_linear_cross_entropy`.
    Returns:
        ``logprobs`` float32 ``[...]``, or ``(logprobs, entropy)`` with ``with_entropy``; both differentiable
        w.r.t. hidden and weight.
    """
    fn = "token_logprobs"
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    check_linear(fn, hidden, weight)
    if token_ids is None:
        raise TypeError(f"{fn}: token_ids must be a tensor, got None")
    h2, y, batch = rows_of(fn, hidden, token_ids, last="hidden", label_name="token_ids")
    rows = chunk_rows(h2.shape[0], weight.shape[0], weight.dtype, memory_budget_mb, chunk_size, fn)
    args = (ignore_index, 1.0 / t, bool(with_entropy), rows, batch)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _TokenLogprobs.apply(hidden, weight, h2.detach(), y, args)
    with below_autograd():
        lp, ent = _forward(h2, weight, y, args)[:2]
    return (lp, ent) if with_entropy else lp


def _forward(h2, weight, y, args):
    """(logprobs [...], entropy [...] or None, lse [N], E [N] or None)."""
    ignore_index, scale, with_entropy, rows, batch = args
    n, dev = h2.shape[0], h2.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    lp = torch.empty(n, dtype=torch.float32, device=dev)
    pz = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else None
    for s in range(0, n, rows):
        e = min(s + rows, n)
        st = _lib.softmax_stats(chunk_logits(h2[s:e], weight, None), y[s:e], ignore_index, 0.0, scale, with_entropy)
        lse[s:e], lp[s:e] = st[0], st[1] - st[0]
        if with_entropy:
            pz[s:e] = st[3]
    lp = torch.where(y != ignore_index, lp, 0.0).view(batch)
    ent = (lse - pz).view(batch) if with_entropy else None
    return lp, ent, lse, pz


class _TokenLogprobs(torch.autograd.Function):
    """Saves hidden, weight, ids, lse and E; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, h2, y, args):
        with below_autograd():
            lp, ent, lse, pz = _forward(h2, weight, y, args)
        ctx.save_for_backward(h2, weight, y, lse, pz)
        ctx.args, ctx.shape = args, hidden.shape
        return (lp, ent) if args[2] else lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        h2, weight, y, lse, pz = ctx.saved_tensors
        ignore_index, scale, with_entropy, rows, _ = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, dev = h2.shape[0], h2.device
        with below_autograd():
            zero = torch.zeros(n, dtype=torch.float32, device=dev)
            g_lp = zero if g_lp is None else g_lp.reshape(-1).to(torch.float32)
            g_lp = torch.where(y != ignore_index, g_lp, 0.0)
            a, d = -g_lp, zero
            if with_entropy and g_ent is not None:
                g_ent = g_ent.reshape(-1).to(torch.float32)
                a, d = a + g_ent * pz, -g_ent
            coef = torch.stack((a, g_lp, zero, d), 1)
            grad_h = torch.empty(h2.shape, dtype=h2.dtype, device=dev) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
            for s in range(0, n, rows):
                e = min(s + rows, n)
                hc = h2[s:e]
                logits = chunk_logits(hc, weight, None)
                _lib.softmax_grad_(logits, y[s:e], ignore_index, lse[s:e], coef[s:e], 0.0, scale)
                if need_h:
                    torch.mm(logits, weight, out=grad_h[s:e])
                if need_w:
                    addmm_fp32_(grad_w, logits.t(), hc)
        return (None if grad_h is None else grad_h.view(ctx.shape)), \
            (None if grad_w is None else grad_w.to(weight.dtype)), None, None, None
