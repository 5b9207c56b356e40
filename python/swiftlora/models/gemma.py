"""Gemma (1): (1 + w)·x̂ RMSNorm computed in float32 then cast, tanh-approximate GeGLU MLP, embeddings scaled by
sqrt(hidden) (HF's embedding, unchanged), tied LM head."""
from transformers.models.gemma import modeling_gemma as hf

from . import swaps
from .patching import Architecture

ARCH = Architecture(
    model_types=("gemma",),
    swaps={
        hf.GemmaRMSNorm: swaps.rms_norm(offset=True),
        hf.GemmaRotaryEmbedding: swaps.rotary,
        hf.GemmaAttention: swaps.attention(),
        hf.GemmaMLP: swaps.gated_mlp("hidden_act"),
    },
)
