"""Per-token log-probabilities (and entropies) under ``hidden @ weightᵀ / temperature``, chunked so that no
``[N, V]`` logits or log-softmax tensor exists: what RL trainers (GRPO, PPO) need for the policy and reference
log-probs.

Forward, per chunk of rows: ``logits_c = hidden_c @ weightᵀ`` (input dtype), then ``softmax_stats`` with
``logit_scale = 1/temperature`` gives ``lse``, ``z[token]`` and ``E = Σ p z``: ``logprob = z[token] − lse``,
``entropy = lse − E``. The gradient w.r.t. the logits of ``Σ g_lp·logprob + g_ent·entropy`` is ``softmax_grad``
with ``a = −g_lp + g_ent·E, b = g_lp, c = 0, d = −g_ent`` (``dH/dz_j = p_j (E − z_j)``). Two ways to the backward:

- frozen weight (LoRA / QLoRA RL, the common case), default chunking: u and w below come from vocabulary blocks
  (:mod:`.lm_head_blocks`: ``u = dz·W[token] − Σ p dz W``, ``w = Σ p (E − z) dz W``), 2 GEMMs (3 with entropy);
- frozen weight with an explicit ``chunk_size``: ``grad_hidden = g_lp·u + g_ent·w`` is linear in the upstream
  gradients, so the forward also computes ``u = d logprob/d hidden`` (without entropy in one pass over the chunk:
  ``cross_entropy_fused_`` with grad_scale −1 gives −logprob and overwrites the logits with d logprob/d logits; then
  ``@ weight``) and, with entropy, ``w = d entropy/d hidden`` (``softmax_stats``, then ``softmax_grad`` into a second
  chunk buffer and ``softmax_grad_``), and the backward only scales rows (``scale_rows_``): 2 GEMMs in all (3 with
  entropy), where recomputing costs 3 (4);
- trainable weight: ``grad_weight`` needs the per-token gradients inside the GEMM, so only ``lse`` and ``E``
  (float32 ``[N]``) are kept and the backward recomputes each chunk's logits, overwrites them with their gradient
  (``softmax_grad_``), then ``grad_hidden_c = grad_c @ weight`` and ``grad_weight += grad_cᵀ @ hidden_c`` (float32
  accumulation).
"""
from __future__ import annotations

import math

import torch

from .._compat import addmm_fp32_, below_autograd
from .cross_entropy import rows_of
from .fused_linear_cross_entropy import DEFAULT_MEMORY_BUDGET_MB, check_linear, chunk_logits, chunk_rows
from .lm_head_blocks import (SUM_EZ, block_plan, head_chunks, issue_first, label_index, label_masks,
                             label_rows)

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
    kind = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(kind):  # the GEMMs in autocast's dtype, as F.linear would run them
        dt = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return token_logprobs(hidden.to(dt), weight.to(dt), token_ids, temperature=temperature,
                                  with_entropy=with_entropy, ignore_index=ignore_index, chunk_size=chunk_size,
                                  memory_budget_mb=memory_budget_mb)
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    check_linear(fn, hidden, weight)
    if token_ids is None:
        raise TypeError(f"{fn}: token_ids must be a tensor, got None")
    h2, y, batch = rows_of(fn, hidden, token_ids, last="hidden", label_name="token_ids")
    eager = hidden.requires_grad and not weight.requires_grad and torch.is_grad_enabled()
    # the eager path with entropy holds two chunk buffers (both gradients): half the rows each
    budget = memory_budget_mb / 2 if eager and with_entropy and chunk_size is None else memory_budget_mb
    trainable_head = weight.requires_grad and torch.is_grad_enabled()  # chunks of >= TRAINABLE_HEAD_MIN_ROWS
    rows = chunk_rows(h2.shape[0], weight.shape[0], weight.dtype, budget, chunk_size, fn, trainable_head)
    # frozen head with grad: vocabulary blocks (lm_head_blocks), unless the caller fixed the token chunks
    blocks = memory_budget_mb if eager and chunk_size is None else None
    args = (ignore_index, 1.0 / t, bool(with_entropy), rows, batch, blocks)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _TokenLogprobs.apply(hidden, weight, h2.detach(), y, args, eager)
    with below_autograd():
        lp, ent = _forward(h2, weight, y, args)[:2]
    return (lp, ent) if with_entropy else lp


def _forward(h2, weight, y, args, eager=False):
    """(logprobs [...], entropy [...] or None, lse [N], E [N] or None, u [N, H] or None, w [N, H] or None): u and w
    (eager) are d logprob / d hidden and d entropy / d hidden per row."""
    ignore_index, scale, with_entropy, rows, batch, blocks = args
    if eager and blocks is not None:
        return _forward_blocks(h2, weight, y, args)
    n, dev = h2.shape[0], h2.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    lp = torch.empty(n, dtype=torch.float32, device=dev)
    pz = torch.empty(n, dtype=torch.float32, device=dev) if with_entropy else None
    u = torch.empty(h2.shape, dtype=h2.dtype, device=dev) if eager else None
    w = torch.empty(h2.shape, dtype=h2.dtype, device=dev) if eager and with_entropy else None
    valid = y != ignore_index
    minus_one = torch.full((), -1.0, dtype=torch.float32, device=dev)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        logits = chunk_logits(h2[s:e], weight, None)
        if eager and not with_entropy:  # one pass: −logprob and d logprob/d logits (grad_scale −1) in place
            loss, lse[s:e] = _lib.cross_entropy_fused_(logits, y[s:e], ignore_index, 0.0, 0.0, 0.0, scale, minus_one)
            lp[s:e] = -loss
            torch.mm(logits, weight, out=u[s:e])
            continue
        st = _lib.softmax_stats(logits, y[s:e], ignore_index, 0.0, scale, with_entropy)
        lse[s:e], lp[s:e] = st[0], st[1] - st[0]
        if with_entropy:
            pz[s:e] = st[3]
        if eager:
            one, zero = torch.ones_like(st[0]), torch.zeros_like(st[0])
            if with_entropy:
                g_ent = _lib.softmax_grad(logits, y[s:e], ignore_index, st[0],
                                          torch.stack((st[3], zero, zero, -one), 1), 0.0, scale)
                torch.mm(g_ent, weight, out=w[s:e])
                del g_ent
            v = valid[s:e].to(torch.float32)
            _lib.softmax_grad_(logits, y[s:e], ignore_index, st[0], torch.stack((-v, v, zero, zero), 1), 0.0, scale)
            torch.mm(logits, weight, out=u[s:e])
    lp = torch.where(valid, lp, 0.0).view(batch)
    ent = (lse - pz).view(batch) if with_entropy else None
    return lp, ent, lse, pz, u, w


def _forward_blocks(h2, weight, y, args):
    """_forward's eager results through vocabulary blocks: u = dz_label·W[token] − G/s and, with entropy,
    w = (E·G − Gz)/s, from the float32 sums G = Σ e^{z−m}·dz·W_j and Gz = Σ e^{z−m}·z·dz·W_j. Per-row factors that
    need no block sums are formed once per call, log-probs once from all chunks' statistics."""
    ignore_index, scale, with_entropy, _, batch, budget = args
    n, vocab = h2.shape[0], weight.shape[0]
    plan = block_plan(n, vocab, h2.dtype, budget)
    stats = torch.empty(n, 6, dtype=torch.float32, device=h2.device)
    pz = torch.empty(n, dtype=torch.float32, device=h2.device) if with_entropy else None
    u = torch.empty(h2.shape, dtype=h2.dtype, device=h2.device)
    w = torch.empty_like(u) if with_entropy else None
    # the first chunk's blocks go to the GPU before the host issues the per-row factors' small ops
    chunks = issue_first(head_chunks(h2, weight, None, y, ignore_index, 0.0, scale, plan, with_gz=with_entropy,
                                     stats=stats, sums=SUM_EZ if with_entropy else 0))
    known, fill = label_masks(y, ignore_index, vocab)
    gate = torch.where(known, 1.0, fill)
    neg_gate, index = -gate, label_index(y, known)
    for c in chunks:
        _, s, _, spz, _, dz_label = c.stats.unbind(1)
        rows = slice(c.start, c.end)
        if with_entropy:
            e_z = torch.div(spz, s, out=pz[rows])
            w[rows] = c.gz.mul_((-1.0 / s)[:, None]).addcmul_(c.g, (e_z / s)[:, None])
        gu = c.g.mul_((neg_gate[rows] / s)[:, None])
        u[rows] = gu.addcmul_(label_rows(weight, index[rows]), (gate[rows] * dz_label)[:, None])
    m, s, _, _, z_label, _ = stats.unbind(1)
    lse = m + torch.log(s)
    lp = torch.where(known, z_label - lse, fill).view(batch)
    ent = (lse - pz).view(batch) if with_entropy else None
    return lp, ent, lse, pz, u, w


class _TokenLogprobs(torch.autograd.Function):
    """eager (frozen weight): saves u, w and scales them in the backward; otherwise saves hidden, weight, ids, lse
    and E, and the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, h2, y, args, eager):
        with below_autograd():
            lp, ent, lse, pz, u, w = _forward(h2, weight, y, args, eager)
        if eager:
            ctx.save_for_backward(u, w)
        else:
            ctx.save_for_backward(h2, weight, y, lse, pz)
        ctx.args, ctx.shape, ctx.eager, ctx.used = args, hidden.shape, eager, False
        return (lp, ent) if args[2] else lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        with below_autograd():
            if ctx.eager:
                grad_h, grad_w = _scaled_grads(ctx, g_lp, g_ent), None
            else:
                grad_h, grad_w = _recomputed_grads(ctx, g_lp, g_ent)
        return (None if grad_h is None else grad_h.view(ctx.shape)), grad_w, None, None, None, None


def _scaled_grads(ctx, g_lp, g_ent):
    """grad_hidden = g_lp·u + g_ent·w, in u's buffer."""
    if ctx.used:
        raise RuntimeError("token_logprobs: with a frozen weight the backward can run only once (the gradients made "
                           "in the forward are scaled in place); drop retain_graph")
    ctx.used = True
    u, w = ctx.saved_tensors
    if g_lp is None:
        u.zero_()
    else:
        _lib.scale_rows_(u, g_lp.reshape(-1).to(torch.float32))
    if w is not None and g_ent is not None:
        _lib.scale_rows_(w, g_ent.reshape(-1).to(torch.float32))
        u.add_(w)
    return u


def _recomputed_grads(ctx, g_lp, g_ent):
    h2, weight, y, lse, pz = ctx.saved_tensors
    ignore_index, scale, with_entropy, rows, _, _ = ctx.args
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    n, dev = h2.shape[0], h2.device
    zero = torch.zeros(n, dtype=torch.float32, device=dev)
    g_lp = zero if g_lp is None else g_lp.reshape(-1).to(torch.float32)
    g_lp = torch.where(y != ignore_index, g_lp, 0.0)
    a, d = -g_lp, zero
    if with_entropy and g_ent is not None:
        g_ent = g_ent.reshape(-1).to(torch.float32)
        a, d = a + g_ent * pz, -g_ent
    coef = torch.stack((a, g_lp, zero, d), 1)
    grad_h = torch.empty(h2.shape, dtype=h2.dtype, device=dev) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=dev) if need_w else None  # chunk 0: beta = 0
    for s in range(0, n, rows):
        e = min(s + rows, n)
        hc = h2[s:e]
        logits = chunk_logits(hc, weight, None)
        _lib.softmax_grad_(logits, y[s:e], ignore_index, lse[s:e], coef[s:e], 0.0, scale)
        if need_h:
            torch.mm(logits, weight, out=grad_h[s:e])
        if need_w:
            addmm_fp32_(grad_w, logits.t(), hc, beta=1.0 if s else 0.0)
    logits = None  # the last chunk goes before the cast allocates: not part of the peak
    return grad_h, (None if grad_w is None else grad_w.to(weight.dtype))
