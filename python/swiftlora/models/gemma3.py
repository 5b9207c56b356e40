"""Gemma 3 (text): Gemma 2's layout with q/k RMSNorm ((1 + w), head dim), one RoPE setting per layer type (local
sliding layers vs global layers; the rotary module builds tables for both), optional final-logit soft-capping."""
from transformers.models.gemma3 import modeling_gemma3 as hf

from . import swaps
from .gemma2 import _attn_implementation
from .patching import Architecture

ARCH = Architecture(
    model_types=("gemma3_text",),
    swaps={
        hf.Gemma3RMSNorm: swaps.rms_norm(offset=True),
        hf.Gemma3RotaryEmbedding: swaps.rotary,
        hf.Gemma3Attention: swaps.attention(),
        hf.Gemma3MLP: swaps.gated_mlp("hidden_activation"),
    },
    attn_implementation=_attn_implementation,
)
