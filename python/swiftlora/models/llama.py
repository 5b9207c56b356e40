"""Llama 2 / 3 / 3.1 / 3.2 (and SmolLM2, which is a Llama): w·x̂ RMSNorm, SwiGLU MLP, rope (default or llama3
scaling), GQA; tied embeddings on the small models (the LM head then reads the embedding matrix)."""
from transformers.models.llama import modeling_llama as hf

from . import swaps
from .patching import Architecture

ARCH = Architecture(
    model_types=("llama",),
    swaps={
        hf.LlamaRMSNorm: swaps.rms_norm(offset=False),
        hf.LlamaRotaryEmbedding: swaps.rotary,
        hf.LlamaAttention: swaps.attention(),
        hf.LlamaMLP: swaps.gated_mlp("hidden_act"),
    },
)
