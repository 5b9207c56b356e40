"""The LM head and its training objectives on hidden states, without ``[N, V]`` logits: the causal-LM loss
(:func:`head_loss`) and TRL's per-token outputs (:func:`head_token_outputs`: log-probs on
:func:`swiftlora.ops.fused_linear_cross_entropy`, plus the statistics of :mod:`swiftlora.nn.head_metrics`).

Only positions with a label (``!= ignore_index``) reach the head: padding and masked prompt tokens cost no GEMM
(the compaction reads the mask on the host once). Labels are shifted left by one unless ``shift_labels`` (already
aligned with the positions) is given, as in transformers' ``ForCausalLMLoss``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _compat
from ..ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from .head_metrics import STATS, head_metrics
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
    weight, bias = _compat.unsharded(head.weight), _compat.unsharded(getattr(head, "bias", None))
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
    """Per-token outputs of TRL's fused LM head: ``log_probs`` and, on request, ``entropy`` (both differentiable),
    ``is_top1``, ``mean_logits``, ``log_sum_sq_probs`` (no gradient), each ``[B, S']`` and zero where the label is
    -100, plus ``label_mask``.

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
    wanted = [name for name in STATS if name in outputs]
    if h.shape[0] == 0:  # keep the graph connected: differentiable zeros
        zero = hidden.sum() * 0.0 + torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        result["log_probs"] = zero
        for name in wanted:
            kind = torch.bool if name == "is_top1" else torch.float32
            result[name] = zero if name == "entropy" else torch.zeros(mask.shape, dtype=kind, device=hidden.device)
        return result
    with torch.autocast(hidden.device.type, enabled=False):
        nll = fused_linear_cross_entropy(h, weight, yv, bias, reduction="none", softcap=cap, logit_scale=scale)
    result["log_probs"] = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(mask, -nll)
    if wanted:
        with torch.autocast(hidden.device.type, enabled=False):
            stats = head_metrics(h, weight, bias, yv, cap, scale)
        for name in wanted:
            values = stats[name]
            result[name] = torch.zeros(mask.shape, dtype=values.dtype, device=h.device).masked_scatter(mask, values)
    return result
