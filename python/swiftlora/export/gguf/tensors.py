"""The tensors of a GGUF file, planned from a Hugging Face causal LM without materialising anything: GGUF names
(gguf-py's tensor name map), shapes, and a loader per tensor that applies the architecture's transforms (Q/K
permutation, +1 norms) in float32 on the weight's own device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from .arch import ArchSpec, llama3_rope_factors, permute_qk, text_config

# Parts of multimodal checkpoints that are not the language model (exported separately by llama.cpp, as mmproj).
_SKIP_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


@dataclass
class TensorSource:
    """One GGUF tensor: ``load()`` returns it as a float32 torch tensor of ``shape`` ([rows, cols] for matrices)."""

    name: str
    hf_name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _hf_name(name: str) -> str:
    # Gemma 3 multimodal and newer VLM-style layouts keep the text model under model.language_model.
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name


def _is_tied(model: torch.nn.Module, params: dict[str, torch.Tensor], cfg: Any) -> bool:
    head, embed = params.get("lm_head.weight"), params.get("model.embed_tokens.weight")
    if head is None:
        return True
    if embed is not None and head.data_ptr() == embed.data_ptr():
        return True
    return bool(getattr(cfg, "tie_word_embeddings", False))


def plan_tensors(model: torch.nn.Module, spec: ArchSpec, config: Any) -> list[TensorSource]:
    """Every tensor of the GGUF file in file order (the model's own order, layers ascending)."""
    cfg = text_config(config)
    n_head = cfg.num_attention_heads
    n_head_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    name_map = gguf.get_tensor_name_map(spec.model_arch, cfg.num_hidden_layers)
    params: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        hf = _hf_name(name)
        if not hf.startswith(_SKIP_PREFIXES) and "rotary_emb" not in hf:
            params.setdefault(hf, t)
    tied = _is_tied(model, params, cfg)
    out: list[TensorSource] = []
    for hf, t in params.items():
        if hf == "lm_head.weight" and (tied or spec.never_output):
            continue
        gname = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"GGUF export: no llama.cpp name for tensor {hf!r} of a {spec.name} model")
        heads = None
        if spec.permute_qk and hf.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif spec.permute_qk and hf.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_head_kv
        offset = spec.norm_offset if hf.endswith("norm.weight") else 0.0
        out.append(TensorSource(gname, hf, tuple(t.shape), _loader(t, heads, offset)))
    factors = llama3_rope_factors(cfg) if spec.permute_qk else None
    if factors is not None:
        out.insert(0, TensorSource("rope_freqs.weight", "(rope scaling)", tuple(factors.shape), lambda: factors))
    return out


def _loader(t: torch.Tensor, heads: int | None, offset: float) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        w = t.detach()
        w = w.float() if w.dtype != torch.float32 else w
        if heads is not None:
            w = permute_qk(w, heads)
        if offset:
            w = w + offset
        return w

    return load
