"""Qwen2 / Qwen2.5: Llama's blocks with q/k/v biases (kept on the projections) and optional sliding-window layers
(``layer_types``; the HF attention keeps its layer's window as ``sliding_window``)."""
from transformers.models.qwen2 import modeling_qwen2 as hf

from . import swaps
from .patching import Architecture

ARCH = Architecture(
    model_types=("qwen2",),
    swaps={
        hf.Qwen2RMSNorm: swaps.rms_norm(offset=False),
        hf.Qwen2RotaryEmbedding: swaps.rotary,
        hf.Qwen2Attention: swaps.attention(),
        hf.Qwen2MLP: swaps.gated_mlp("hidden_act"),
    },
)
