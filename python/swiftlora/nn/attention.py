"""Decoder self-attention for transformers models: q/k/v projections, optional per-head q/k RMSNorm (Qwen3, Gemma 3),
rotary embedding on swiftlora's rope kernel, then the attention backend transformers selected for the model
(``config._attn_implementation``: PyTorch SDPA by default, flash-attention when installed and asked for, or eager), so
masks, KV caches, sliding windows and packed sequences behave exactly as in the HF module it replaces.

The projections are the HF module's own children under their HF names (``q_proj`` ... ``o_proj``), so PEFT finds them
and state dicts keep their keys. PEFT LoRA layers the fused kernels cover (:mod:`swiftlora.nn.lora`) run as one
``lora_qkv`` op for q, k and v (one GEMM over the three base weights) and a ``qlora_linear`` op for o. Rotary
positions come from :class:`RotaryPositions`, swapped in for the model-level HF rotary module: it hands every layer
its ``[T, R/2]`` cos/sin tables and the position ids (:class:`RopeTables`), which the kernel indexes itself. An HF
``(cos, sin)`` pair (rope types swiftlora does not build tables for) is accepted too.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .. import _compat
from ..ops.lora_qkv import lora_qkv
from ..ops.qlora_linear import qlora_linear
from ..ops.rope import half_tables, rope
from .lora import linear, lora_projection, lora_projections
from .rotary import RotaryEmbedding


class RopeTables(NamedTuple):
    """Rotary tables for one forward: ``cos``/``sin`` ``[T, R/2]`` float32 indexed by ``position_ids`` ``[B or 1, S]``
    (int64)."""

    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor


class RotaryPositions(nn.Module):
    """Model-level rotary module: ``forward(x, position_ids, layer_type=None) -> RopeTables``.

    One :class:`RotaryEmbedding` per attention layer type when the config has per-type RoPE settings (Gemma 3:
    ``sliding_attention`` / ``full_attention``), else a single one. The table length is the batch's largest
    position + 1 (one host read per call; tables are cached and grown by powers of two).
    """

    def __init__(self, rotaries: dict[str, RotaryEmbedding]):
        super().__init__()
        self.rotaries = nn.ModuleDict(rotaries)

    @classmethod
    def from_config(cls, config: Any) -> "RotaryPositions":
        params = getattr(config, "rope_parameters", None) or {}
        types = sorted(k for k, v in params.items() if isinstance(v, dict))
        if types:
            return cls({t: RotaryEmbedding.from_config(config, t) for t in types})
        return cls({"default": RotaryEmbedding.from_config(config)})

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> RopeTables:
        rotary = self.rotaries[layer_type if layer_type is not None else "default"]
        length = int(position_ids.max().item()) + 1
        cos, sin = rotary.tables(max(length, 1), x.device)
        return RopeTables(cos, sin, position_ids.to(torch.int64))


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention (transformers' eager semantics, Gemma 2's tanh soft-capping included).

    q ``[B, H, S, D]``, k/v ``[B, Hkv, L, D]``, additive mask ``[B, 1, S, L]`` (or None). Returns the output
    ``[B, S, H, D]`` and the probabilities ``[B, H, S, L]``.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class Attention(nn.Module):
    """Causal self-attention with swiftlora's rope. Input/output ``[B, S, hidden]`` in the model's dtype.

    Attributes read by transformers' attention backends are kept under their HF names (``config``, ``layer_idx``,
    ``head_dim``, ``num_key_value_groups``, ``scaling``, ``is_causal``, ``sliding_window``).
    """

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module, *, config: Any,
                 layer_idx: int, head_dim: int, num_heads: int, num_kv_heads: int, scaling: float,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, sliding_window: int | None = None,
                 softcap: float | None = None, dropout: float = 0.0, is_causal: bool = True):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.config, self.layer_idx = config, layer_idx
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling, self.sliding_window, self.softcap = scaling, sliding_window, softcap
        self.attention_dropout, self.is_causal = dropout, is_causal

    @classmethod
    def from_module(cls, module: nn.Module, q_norm: nn.Module | None = None,
                    k_norm: nn.Module | None = None, sliding_window: int | None = None) -> "Attention":
        """From an HF attention module (Llama, Mistral, Qwen2/3, Gemma 1-3 shapes), sharing its projections.
        ``q_norm``/``k_norm`` replace the module's own norms when given (swiftlora RMSNorms)."""
        config = module.config
        head_dim = module.head_dim
        heads = module.q_proj.out_features // head_dim
        if sliding_window is None:
            sliding_window = getattr(module, "sliding_window", None)
        return cls(module.q_proj, module.k_proj, module.v_proj, module.o_proj, config=config,
                   layer_idx=module.layer_idx, head_dim=head_dim, num_heads=heads,
                   num_kv_heads=heads // module.num_key_value_groups, scaling=module.scaling,
                   q_norm=q_norm if q_norm is not None else getattr(module, "q_norm", None),
                   k_norm=k_norm if k_norm is not None else getattr(module, "k_norm", None),
                   sliding_window=sliding_window, softcap=getattr(module, "attn_logit_softcapping", None),
                   dropout=float(getattr(module, "attention_dropout", 0.0) or 0.0),
                   is_causal=getattr(module, "is_causal", True))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, S, hidden]`` -> q ``[B, S, H*D]``, k and v ``[B, S, Hkv*D]``."""
        fused = lora_projections((self.q_proj, self.k_proj, self.v_proj), x)
        if fused is None:
            return linear(self.q_proj, x), linear(self.k_proj, x), linear(self.v_proj, x)
        (q, k, v), p = fused
        with torch.autocast(x.device.type, enabled=False):
            return lora_qkv(x, q, k, v, dropout_p=p)

    def project_out(self, a: torch.Tensor) -> torch.Tensor:
        """The attention output ``[B, S, H*D]`` through o_proj."""
        fused = lora_projection(self.o_proj, a)
        if fused is None:
            return linear(self.o_proj, a)
        o, p = fused
        with torch.autocast(a.device.type, enabled=False):
            return qlora_linear(a, o.base, o.lora_a, o.lora_b, o.scale, o.bias, dropout_p=p)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s = hidden_states.shape[:2]
        q, k, v = self.project_qkv(hidden_states)
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        v = v.view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotate(q, k, position_embeddings)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            k, v = _compat.cache_update(cache, k, v, self.layer_idx, kwargs)
        attend = _compat.attention_function(self.config, eager_attention)
        out, weights = attend(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                              scaling=self.scaling, sliding_window=self.sliding_window, softcap=self.softcap,
                              **kwargs)
        return self.project_out(out.reshape(b, s, -1)), weights

    @staticmethod
    def _rotate(q, k, position_embeddings):
        if isinstance(position_embeddings, RopeTables):
            cos, sin, pos = position_embeddings
            return rope(q, k, cos, sin, pos)
        if position_embeddings is None:
            raise ValueError("Attention: position_embeddings (RopeTables or HF (cos, sin)) are required")
        cos, sin = half_tables(*position_embeddings)  # HF: per token [B, S, R], the halves duplicated
        return rope(q, k, cos, sin)

    def extra_repr(self) -> str:
        parts = [f"heads={self.num_heads}", f"kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}"]
        if self.sliding_window:
            parts.append(f"sliding_window={self.sliding_window}")
        if self.softcap:
            parts.append(f"softcap={self.softcap}")
        return ", ".join(parts)
