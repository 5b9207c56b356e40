"""Qwen3: Qwen2's blocks without q/k/v biases, plus per-head RMSNorm on q and k before the rope (q_norm/k_norm, the
same w·x̂ norm class as the layer norms, so the norm rule swaps them too)."""
from transformers.models.qwen3 import modeling_qwen3 as hf

from . import swaps
from .patching import Architecture

ARCH = Architecture(
    model_types=("qwen3",),
    swaps={
        hf.Qwen3RMSNorm: swaps.rms_norm(offset=False),
        hf.Qwen3RotaryEmbedding: swaps.rotary,
        hf.Qwen3Attention: swaps.attention(),
        hf.Qwen3MLP: swaps.gated_mlp("hidden_act"),
    },
)
