"""Mistral: Llama's blocks plus a sliding attention window (``config.sliding_window``, None on v0.2+), which the
attention backend gets per layer and transformers' mask builder applies."""
from transformers.models.mistral import modeling_mistral as hf

from . import swaps
from .patching import Architecture

ARCH = Architecture(
    model_types=("mistral",),
    swaps={
        hf.MistralRMSNorm: swaps.rms_norm(offset=False),
        hf.MistralRotaryEmbedding: swaps.rotary,
        hf.MistralAttention: swaps.attention(sliding_window=lambda m: getattr(m.config, "sliding_window", None)),
        hf.MistralMLP: swaps.gated_mlp("hidden_act"),
    },
)
