"""The LM head and its training objectives on hidden states, without ``[N, V]`` logits: the causal-LM loss
(:func:`head_loss`) and TRL's per-token outputs (:func:`head_token_outputs`: log-probs, entropy, top-1 flags),
both on :func:`swiftlora.ops.fused_linear_cross_entropy`.

Only positions with a label (``!= ignore_index``) reach the head: padding and masked prompt tokens cost no GEMM
(the compaction reads the mask on the host once). Labels are shifted left by one unless ``shift_labels`` (already
aligned with the positions) is given, as in transformers' ``ForCausalLMLoss``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.fused_linear_cross_entropy import DEFAULT_MEMORY_BUDGET_MB, chunk_rows, fused_linear_cross_entropy
from .loss import shifted_labels

IGNORE_INDEX = -100


def _aligned(hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None):
    """(hidden ``[..., H]``, labels ``[...]``) with labels aligned to the positions."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("pass labels (shifted here) or shift_labels")
        shift_labels = shifted_labels(labels, IGNORE_INDEX)
    return hidden, shift_labels.to(hidden.device)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's GEMM dtype: autocast's when it is on (as ``lm_head(hidden)`` would run), else hidden's. The kernels
    then run with autocast off, on operands of that one dtype."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _head_tensors(head: nn.Module, dtype: torch.dtype):
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return weight, bias


def head_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor | None = None, *,
              shift_labels: torch.Tensor | None = None, num_items_in_batch=None, softcap: float | None = None,
              logit_scale: float = 1.0) -> torch.Tensor:
    """transformers' causal-LM loss of ``head(hidden)`` (mean over labelled tokens, or ``sum / num_items_in_batch``).

    Args:
        hidden: final hidden states ``[B, S, H]`` (after the final norm).
        head: the LM head (``weight`` ``[V, H]``, optional ``bias``), frozen or trainable.
        labels / shift_labels: ``[B, S]`` int64 token ids (-100 = not scored).
        num_items_in_batch: divisor over all gradient-accumulation steps (int or tensor), as the Trainer passes it.
        softcap, logit_scale: final-logit soft-capping (Gemma 2/3) and scaling, applied as the model would.
    Returns:
        float32 scalar.
    """
    hidden, y = _aligned(hidden, labels, shift_labels)
    mask = y != IGNORE_INDEX
    dtype = _compute_dtype(hidden)
    weight, bias = _head_tensors(head, dtype)
    h = hidden[mask].to(dtype)
    if h.shape[0] == 0:  # keep the graph connected: a differentiable zero
        return hidden.sum() * 0.0
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_cross_entropy(h, weight, y[mask], bias, softcap=softcap, logit_scale=logit_scale,
                                          num_items_in_batch=num_items_in_batch)


def head_token_outputs(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor | None = None, *,
                       shift_labels: torch.Tensor | None = None, temperature: float = 1.0,
                       softcap: float | None = None, logit_scale: float = 1.0,
                       outputs: tuple[str, ...] = ("log_probs",), upcast: bool = False) -> dict:
    """Per-token outputs of TRL's fused LM head: ``log_probs`` (differentiable), and on request ``entropy`` and
    ``is_top1`` (metrics, no gradient), each ``[B, S']`` and zero where the label is -100, plus ``label_mask``.

    Without ``shift_labels`` the last position has no next token and is dropped (``S' = S - 1``), as TRL does.
    Logits are ``z = softcap·tanh(logit_scale·x/softcap) / temperature`` (TRL's order). ``upcast`` runs the head in
    float32 (TRL's ``cast_lm_head_to_fp32``).
    """
    if shift_labels is None:
        hidden, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    else:
        y = shift_labels.to(hidden.device)
    dtype = torch.float32 if upcast else _compute_dtype(hidden)
    weight, bias = _head_tensors(head, dtype)
    mask = y != IGNORE_INDEX
    # softcap·tanh(s·x/softcap)/t == (softcap/t)·tanh((s/t)·x/(softcap/t)): the temperature folds into both
    t = float(temperature)
    cap = None if softcap is None else softcap / t
    scale = logit_scale / t
    h, yv = hidden[mask].to(dtype), y[mask]
    result = {"label_mask": mask}
    if h.shape[0] == 0:
        zero = hidden.sum() * 0.0
        result["log_probs"] = zero + torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    else:
        with torch.autocast(hidden.device.type, enabled=False):
            nll = fused_linear_cross_entropy(h, weight, yv, bias, reduction="none", softcap=cap, logit_scale=scale)
        result["log_probs"] = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(mask, -nll)
    wanted = [name for name in ("entropy", "is_top1") if name in outputs]
    if wanted:
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            ent, top1 = _metrics(h.detach(), weight.detach(), None if bias is None else bias.detach(), yv, cap, scale)
        if "entropy" in wanted:
            result["entropy"] = torch.zeros(mask.shape, dtype=torch.float32, device=h.device).masked_scatter(mask, ent)
        if "is_top1" in wanted:
            result["is_top1"] = torch.zeros(mask.shape, dtype=torch.bool, device=h.device).masked_scatter(mask, top1)
    return result


def _metrics(h: torch.Tensor, weight: torch.Tensor, bias, y: torch.Tensor, softcap, scale):
    """Entropy ``[N]`` float32 and top-1 flags ``[N]`` bool, chunk by chunk (float32 softmax per chunk).
    A label tied with an earlier maximum is not top-1 (``argmax`` takes the first maximum), as in TRL."""
    n = h.shape[0]
    ent = torch.empty(n, dtype=torch.float32, device=h.device)
    top1 = torch.empty(n, dtype=torch.bool, device=h.device)
    rows = chunk_rows(n, weight.shape[0], weight.dtype, DEFAULT_MEMORY_BUDGET_MB / 4, None, "head_token_outputs")
    for s in range(0, n, rows):
        e = min(s + rows, n)
        logits = nn.functional.linear(h[s:e], weight, bias)
        top1[s:e] = logits.argmax(-1) == y[s:e]
        z = logits.float() * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        logp = torch.log_softmax(z, -1)
        ent[s:e] = -(logp.exp() * logp).sum(-1)
    return ent, top1
