"""Causal-LM loss the way transformers computes it (``ForCausalLMLoss``), on swiftlora's cross-entropy kernels.

transformers' semantics, kept: labels are shifted left by one inside the loss (``labels[..., 1:]``, the last position
padded with ``ignore_index``) unless ``shift_labels`` is given (already shifted, e.g. sequence parallel or TRL's
padding-free batches); the logits are not sliced; ``ignore_index=-100``; without ``num_items_in_batch`` the loss is
the mean over the labelled tokens, with it ``sum / num_items_in_batch`` (the Trainer passes the count over all
gradient-accumulation steps). Differences: the logits are never upcast (float32 math inside the kernel instead of
``logits.float()``), and a batch without a labelled token gives loss 0 and zero gradient instead of NaN.

The fused form takes the hidden states and the LM head instead of the logits (``lm_head_weight=``) and never
materialises the logits (:func:`swiftlora.ops.fused_linear_cross_entropy`). Logit soft-capping (Gemma 2/3
``final_logit_softcapping``) and scaling (Cohere ``logit_scale``, Granite ``1 / logits_scaling``) then have to be
passed as ``softcap`` / ``logit_scale``, since no model code touches the logits; :func:`logit_options` reads them
from a config.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.cross_entropy import cross_entropy
from ..ops.fused_linear_cross_entropy import DEFAULT_MEMORY_BUDGET_MB, fused_linear_cross_entropy


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels[..., 1:]`` padded at the end with ignore_index: position t is scored on token t + 1."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def logit_options(config: Any) -> dict:
    """``softcap`` and ``logit_scale`` for the fused loss from an HF config: Gemma 2/3 ``final_logit_softcapping``,
    Cohere ``logit_scale`` (multiplies), Granite ``logits_scaling`` (divides)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None) or None
    scale = float(getattr(text, "logit_scale", None) or 1.0)
    if getattr(text, "logits_scaling", None):
        scale /= float(text.logits_scaling)
    return {"softcap": softcap, "logit_scale": scale}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, vocab_size: int | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, *, lm_head_weight: torch.Tensor | None = None,
                   lm_head_bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                   softcap: float | None = None, logit_scale: float = 1.0, z_loss: float = 0.0,
                   inplace_backward: bool = False, chunk_size: int | None = None,
                   memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss``, usable as ``model.loss_function`` (called as ``loss_function(logits=...,
    labels=..., vocab_size=..., **kwargs)``; extra keyword arguments are ignored, as there).

    Args:
        logits: logits ``[B, T, V]`` (any float dtype; not upcast), or, with ``lm_head_weight``, the final hidden
            states ``[B, T, H]`` (the name stays ``logits`` for transformers' keyword call).
        labels: ``[B, T]`` token ids, shifted here; ignored when ``shift_labels`` is given.
        vocab_size: checked against the logits' last dim (or the head's rows) when given.
        num_items_in_batch: divisor replacing the labelled-token count (int or tensor; no host sync).
        ignore_index: label that is not scored.
        shift_labels: ``[B, T]`` labels already aligned with the positions.
        lm_head_weight, lm_head_bias: the LM head ``[V, H]`` / ``[V]``: the fused loss on hidden states.
        label_smoothing, softcap, logit_scale, z_loss: see :func:`swiftlora.ops.cross_entropy`.
        inplace_backward: unfused only: the logits' buffer receives their gradient (they are unusable afterwards).
        chunk_size, memory_budget_mb: fused only: chunking of the tokens.
    Returns:
        float32 scalar loss.
    """
    x = logits
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss: pass labels (shifted here) or shift_labels")
        shift_labels = shifted_labels(labels, ignore_index)
    shift_labels = shift_labels.to(x.device)
    vocab = x.shape[-1] if lm_head_weight is None else lm_head_weight.shape[0]
    if vocab_size is not None and vocab_size != vocab:
        raise ValueError(f"causal_lm_loss: vocab_size={vocab_size} but the "
                         f"{'logits have' if lm_head_weight is None else 'lm_head has'} {vocab}")
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                   logit_scale=logit_scale, z_loss=z_loss, num_items_in_batch=num_items_in_batch)
    if lm_head_weight is None:
        return cross_entropy(x, shift_labels, inplace_backward=inplace_backward, **options)
    return fused_linear_cross_entropy(x, lm_head_weight, shift_labels, lm_head_bias, chunk_size=chunk_size,
                                      memory_budget_mb=memory_budget_mb, **options)


class CausalLMLoss(nn.Module):
    """:func:`causal_lm_loss` with its options fixed at construction.

    ``loss(logits, labels, num_items_in_batch=None)``, or the fused form on hidden states
    ``loss(hidden_states, labels, lm_head_weight=head.weight, lm_head_bias=head.bias)``.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, softcap: float | None = None,
                 logit_scale: float = 1.0, z_loss: float = 0.0, inplace_backward: bool = False,
                 chunk_size: int | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.options = dict(label_smoothing=float(label_smoothing), softcap=softcap, logit_scale=float(logit_scale),
                            z_loss=float(z_loss), inplace_backward=bool(inplace_backward), chunk_size=chunk_size,
                            memory_budget_mb=memory_budget_mb)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor | None,
                num_items_in_batch: int | torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                lm_head_weight: torch.Tensor | None = None, lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
        return causal_lm_loss(logits, labels, None, num_items_in_batch, self.ignore_index, shift_labels,
                              lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias, **self.options)

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.options.items() if v not in (None, 0.0, 1.0, False)}
        return ", ".join([f"ignore_index={self.ignore_index}"] + [f"{k}={v}" for k, v in shown.items()])
