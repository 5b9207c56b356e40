"""Attention input projections with LoRA, in one call: q, k and v, each
``x @ Wᵀ + scale · (dropout(x) @ Aᵀ) @ Bᵀ``.

The three projections share x: one ``qlora_linear`` op computes ``[q | k | v]`` (one dequantized weight panel and
one GEMM on the NF4 path) and returns q, k, v as views of that buffer; the backward forms one ``grad_x`` from the
three gradients. The output projection is a single :func:`~swiftlora.ops.qlora_linear`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .lora_weights import LoRAProjection
from .qlora_linear import lora_projections, lora_reference


def lora_qkv(x: torch.Tensor, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection, dropout_p: float = 0.0,
             dropout_masks: Sequence[torch.Tensor | None] | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v projections of ``x`` with LoRA.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16 (the compute dtype).
        q, k, v: :class:`~swiftlora.ops.LoRAProjection` with base weights ``[N_q|N_k|N_v, K]`` (NF4 or dense).
        dropout_p: LoRA dropout; each projection draws its own mask (as PEFT's per-layer dropout) unless
            ``dropout_masks`` (three bool ``[..., K]`` masks or None) are given.
    Returns:
        ``(q [..., N_q], k [..., N_k], v [..., N_v])`` in x's dtype: views of one ``[..., N_q + N_k + N_v]`` buffer
        (row stride N_q + N_k + N_v).
    """
    y = lora_projections(x, (q, k, v), dropout_p, dropout_masks, generator, fn="lora_qkv")
    return tuple(y.split([q.out_features, k.out_features, v.out_features], dim=-1))


def lora_qkv_reference(x: torch.Tensor, q: LoRAProjection, k: LoRAProjection, v: LoRAProjection,
                       dropout_p: float = 0.0, dropout_masks: Sequence[torch.Tensor | None] | None = None):
    """:func:`lora_qkv` in plain PyTorch, one projection at a time (no dropout unless masks are given)."""
    masks = dropout_masks or (None, None, None)
    return tuple(lora_reference(x, p, m, dropout_p) for p, m in zip((q, k, v), masks))
