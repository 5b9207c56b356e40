"""Gemma 2: Gemma's blocks plus pre/post feed-forward norms (all (1 + w) norms), alternating sliding-window layers,
attention-logit soft-capping (SDPA cannot express it: such configs load with eager attention, or flash-attention
when the caller asks) and final-logit soft-capping (fused into the loss)."""
from transformers.models.gemma2 import modeling_gemma2 as hf

from . import swaps
from .patching import Architecture


def _attn_implementation(config) -> str:
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


ARCH = Architecture(
    model_types=("gemma2",),
    swaps={
        hf.Gemma2RMSNorm: swaps.rms_norm(offset=True),
        hf.Gemma2RotaryEmbedding: swaps.rotary,
        hf.Gemma2Attention: swaps.attention(),
        hf.Gemma2MLP: swaps.gated_mlp("hidden_activation"),
    },
    attn_implementation=_attn_implementation,
)
