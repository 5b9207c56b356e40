"""Rotary embedding tables from a model config, cached, and a module that applies them with the rope kernel.

inv_freq and the attention scaling follow transformers' definitions for rope types ``default``, ``linear``,
``dynamic`` (NTK), ``llama3`` and ``yarn`` (tests compare against transformers' own functions). Tables are half
width ``[T, R/2]`` in float32: ``cos(t * inv_freq) * attention_scaling`` with ``t * inv_freq`` rounded in float32
exactly as HF computes it; the kernel reads them in float32 and rounds the rotated values once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from .. import _compat
from ..ops.rope import rope

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """What determines a model's rotary tables (from a HF config via :meth:`from_config`)."""

    head_dim: int
    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None   # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {SUPPORTED_ROPE_TYPES}, got {self.rope_type!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and in [2, head_dim={self.head_dim}], got {self.rotary_dim}")
        needs_factor = self.rope_type in ("linear", "dynamic", "llama3")
        if needs_factor and self.factor is None:
            raise ValueError(f"rope_type {self.rope_type!r} needs a scaling factor, got factor=None")

    @classmethod
    def from_config(cls, config: Any, layer_type: str | None = None) -> "RopeConfig":
        """From a transformers config (4.x ``rope_scaling``/``rope_theta`` or 5.x ``rope_parameters``)."""
        p = _compat.rope_parameters(config, layer_type)
        head_dim = _compat.head_dim(config)
        max_pos = getattr(config, "max_position_embeddings", 2048)
        known = {f.name for f in fields(cls)}
        kwargs = {k: p[k] for k in known & p.keys() if p[k] is not None}
        kwargs.update(
            head_dim=head_dim,
            rotary_dim=int(head_dim * p.get("partial_rotary_factor", 1.0)),
            theta=float(p["rope_theta"]),
            rope_type=p["rope_type"],
            max_position_embeddings=max_pos,
        )
        if kwargs["rope_type"] in ("llama3", "yarn"):
            kwargs.setdefault("original_max_position_embeddings", max_pos)
        return cls(**kwargs)


def _base_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def inv_freq_and_scaling(cfg: RopeConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [R/2] float32, attention_scaling)``; ``seq_len`` matters only for ``dynamic`` (the longest
    position + 1 in the batch: beyond max_position_embeddings the base grows, as HF's dynamic NTK does)."""
    dim, kind = cfg.rotary_dim, cfg.rope_type
    if kind == "default":
        return _base_inv_freq(cfg.theta, dim, device), 1.0
    if kind == "linear":
        return _base_inv_freq(cfg.theta, dim, device) / cfg.factor, 1.0
    if kind == "dynamic":
        length = max(seq_len or 0, cfg.max_position_embeddings)
        ratio = cfg.factor * length / cfg.max_position_embeddings - (cfg.factor - 1)
        return _base_inv_freq(cfg.theta * ratio ** (dim / (dim - 2)), dim, device), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(cfg, device), 1.0
    return _yarn_inv_freq(cfg, device)


def _llama3_inv_freq(cfg: RopeConfig, device) -> torch.Tensor:
    inv = _base_inv_freq(cfg.theta, cfg.rotary_dim, device)
    old_len = cfg.original_max_position_embeddings
    low, high = cfg.low_freq_factor, cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    long_wave = wavelen > old_len / low    # low frequencies: fully interpolated
    short_wave = wavelen < old_len / high  # high frequencies: unchanged
    scaled = torch.where(long_wave, inv / cfg.factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    return torch.where(~long_wave & ~short_wave, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(cfg: RopeConfig, device) -> tuple[torch.Tensor, float]:
    dim, base, orig = cfg.rotary_dim, cfg.theta, cfg.original_max_position_embeddings
    factor = cfg.factor if cfg.factor is not None else cfg.max_position_embeddings / orig
    scaling = cfg.attention_factor
    if scaling is None:
        if cfg.mscale and cfg.mscale_all_dim:
            scaling = _yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim)
        else:
            scaling = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dim index that turns `rotations` times over `orig`
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(cfg.beta_fast or 32), correction_dim(cfg.beta_slow or 1)
    if cfg.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolate = 1 - ramp  # weight of the unscaled frequency
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(scaling)


def rope_tables(
    cfg: RopeConfig, length: int, device=None, dtype: torch.dtype = torch.float32, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width ``(cos, sin)`` of shape ``[length, rotary_dim/2]`` for positions ``0 .. length-1``."""
    # inv_freq on the CPU, as HF computes it at init: pow/exp on another device may differ by an ulp, which
    # position ~1e4 turns into a visible angle error.
    inv, scaling = inv_freq_and_scaling(cfg, seq_len=seq_len)
    t = torch.arange(length, device=device, dtype=torch.int64).float()
    freqs = t[:, None] * inv.float().to(device)[None, :]
    return (freqs.cos() * scaling).to(dtype), (freqs.sin() * scaling).to(dtype)


class RotaryEmbedding(torch.nn.Module):
    """Applies a model's rotary embedding to q and k with the fused rope kernel.

    Tables are built lazily per (device, dtype) and grown to the next power of two that covers the positions
    asked for, so a training run builds them a handful of times. ``dynamic`` scaling depends on the longest
    position, as in HF: its tables are rebuilt whenever that length changes beyond max_position_embeddings.
    """

    def __init__(self, cfg: RopeConfig):
        super().__init__()
        self.cfg = cfg
        self._cache: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, config: Any, layer_type: str | None = None) -> "RotaryEmbedding":
        return cls(RopeConfig.from_config(config, layer_type))

    def tables(self, length: int, device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` covering at least ``length`` positions (float32 unless asked otherwise)."""
        if length < 1:
            raise ValueError(f"tables: length must be >= 1, got {length}")
        device = torch.device(device)
        dynamic_len = length if self.cfg.rope_type == "dynamic" and length > self.cfg.max_position_embeddings else 0
        key = (device, dtype, dynamic_len)
        hit = self._cache.get(key)
        if hit is None or hit[0] < length:
            size = length if dynamic_len else max(256, 1 << (length - 1).bit_length())
            cos, sin = rope_tables(self.cfg, size, device, dtype, seq_len=dynamic_len or None)
            if dynamic_len:  # one entry per length: keep only the latest
                self._cache = {k: v for k, v in self._cache.items() if not k[2]}
            hit = self._cache[key] = (size, cos, sin)
        return hit[1], hit[2]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        layout: str = "bshd",
        inplace: bool = False,
        max_position: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q``/``k`` (see :func:`swiftlora.ops.rope`). ``max_position`` (the largest position id) saves a
        device->host sync when position_ids are given; without it the maximum is read from position_ids."""
        seq = q.shape[1] if layout == "bshd" else q.shape[2]
        if position_ids is None:
            length = seq
        elif max_position is not None:
            length = int(max_position) + 1
        else:
            length = int(position_ids.max().item()) + 1
        cos, sin = self.tables(length, q.device)
        return rope(q, k, cos, sin, position_ids, layout=layout, inplace=inplace)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"rope_type={c.rope_type}, head_dim={c.head_dim}, rotary_dim={c.rotary_dim}, theta={c.theta}"
