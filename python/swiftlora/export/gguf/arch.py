"""Per-architecture facts for GGUF export: the llama.cpp architecture, the tensor transforms it expects (Llama's
Q/K row permutation, Gemma's +1 norms, tied output) and the ``{arch}.*`` metadata keys, with the types llama.cpp
accepts (counts u32, floats f32: gguf-py's typed helpers). Learned from llama.cpp's converter and model loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch

from ... import _compat


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face ``model_type`` maps onto a llama.cpp architecture."""

    model_arch: gguf.MODEL_ARCH
    permute_qk: bool = False       # llama.cpp's NORM rope (adjacent pairs) vs HF's rotate-half: llama, mistral
    norm_offset: float = 0.0       # Gemma stores w and computes x·(1 + w); llama.cpp wants 1 + w
    never_output: bool = False     # Gemma 1/2: llama.cpp always reuses token_embd (an output.weight is an error)
    sliding_window: bool = False   # write sliding_window + per-layer pattern (Gemma 2/3)
    softcaps: bool = False         # attn/final logit softcapping keys (Gemma 2)
    no_space_prefix: bool = False  # Gemma's SentencePiece vocab adds no leading space

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.model_arch]


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3),
    "gemma": ArchSpec(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0, never_output=True, no_space_prefix=True),
    "gemma2": ArchSpec(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, never_output=True, sliding_window=True, softcaps=True,
                       no_space_prefix=True),
    "gemma3_text": ArchSpec(gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, sliding_window=True, no_space_prefix=True),
}


def text_config(config: Any) -> Any:
    """The language model's config (Gemma 3 multimodal checkpoints nest it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def arch_spec(config: Any) -> ArchSpec:
    """The ArchSpec of a model config, or a ValueError listing the supported model types."""
    model_type = getattr(text_config(config), "model_type", None)
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration's text part
        model_type = "gemma3_text"
    if model_type not in ARCHS:
        raise ValueError(f"GGUF export: model_type {model_type!r} is not supported; supported: {sorted(ARCHS)}")
    return ARCHS[model_type]


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp adjacent-pair rows, per head: GGUF row h·d + 2i + j = HF row h·d + j·d/2 + i.
    w: [n_head·d, ...] weight or [n_head·d] bias."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layer_is_sliding(cfg: Any) -> list[bool] | None:
    """Per-layer sliding-window flags from ``config.layer_types`` (transformers >= 4.53), or None."""
    types = getattr(cfg, "layer_types", None)
    if not types:
        return None
    return [t == "sliding_attention" for t in types]


def write_arch_metadata(writer: gguf.GGUFWriter, spec: ArchSpec, config: Any, n_vocab: int) -> None:
    """The ``{arch}.*`` keys llama.cpp reads for this architecture."""
    cfg = text_config(config)
    n_head = cfg.num_attention_heads
    head_dim = _compat.head_dim(cfg)
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 0) or 8192))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if spec.model_arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim)
    _write_rope(writer, cfg, spec)
    if spec.softcaps:
        if getattr(cfg, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        if getattr(cfg, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    elif spec.model_arch == gguf.MODEL_ARCH.GEMMA3 and getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if spec.sliding_window and getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(int(cfg.sliding_window))
        pattern = layer_is_sliding(cfg)
        if pattern is not None:
            writer.add_sliding_window_pattern(pattern)


def _write_rope(writer: gguf.GGUFWriter, cfg: Any, spec: ArchSpec) -> None:
    sliding = spec.sliding_window and isinstance(getattr(cfg, "rope_parameters", None), dict) \
        and "full_attention" in cfg.rope_parameters
    params = _compat.rope_parameters(cfg, "full_attention" if sliding else None)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    if sliding:
        local = _compat.rope_parameters(cfg, "sliding_attention")
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    rope_type, factor = params.get("rope_type", "default"), params.get("factor")
    if rope_type == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3", None):
        raise ValueError(f"GGUF export: RoPE type {rope_type!r} is not supported (default, linear, yarn, llama3)")


def llama3_rope_factors(cfg: Any) -> torch.Tensor | None:
    """Llama 3.1-style RoPE scaling as llama.cpp takes it: a ``rope_freqs.weight`` float32 [head_dim/2] tensor of
    per-frequency divisors (None for other RoPE types)."""
    params = _compat.rope_parameters(cfg)
    if params.get("rope_type") != "llama3":
        return None
    dim = _compat.head_dim(cfg)
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * torch.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(wavelen),
                      torch.where(wavelen > old_ctx / low, torch.full_like(wavelen, factor), mid))
    return out.float()
