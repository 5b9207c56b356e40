"""Factories shared by the architecture tables: each builds a swiftlora.nn module from the HF module it replaces
(sharing its parameters), or returns None to keep the HF module."""
from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

from ..nn.attention import Attention, RotaryPositions
from ..nn.mlp import ACTIVATIONS, GatedMLP
from ..nn.rms_norm import RMSNorm

log = logging.getLogger("swiftlora")


def rms_norm(offset: bool) -> Callable[[nn.Module, Any], nn.Module]:
    """Llama-style ``w·x̂`` (offset False) or Gemma's ``(1 + w)·x̂`` (offset True)."""
    return lambda module, config: RMSNorm.from_module(module, offset=offset)


def rotary(module: nn.Module, config: Any) -> nn.Module | None:
    """The model-level rotary module; None (keep HF's) for rope types swiftlora builds no tables for — the
    attention then rotates with HF's cos/sin through the same kernel."""
    try:
        return RotaryPositions.from_config(getattr(module, "config", config))
    except ValueError as err:
        log.info("swiftlora: keeping %s (%s)", type(module).__name__, err)
        return None


def attention(sliding_window: Callable[[nn.Module], int | None] | None = None):
    """``sliding_window(module)`` reads the window where the HF module does not keep it as an attribute
    (Mistral reads ``config.sliding_window`` in its forward)."""
    def build(module: nn.Module, config: Any) -> nn.Module:
        window = sliding_window(module) if sliding_window is not None else None
        return Attention.from_module(module, sliding_window=window)
    return build


def gated_mlp(activation_attr: str) -> Callable[[nn.Module, Any], nn.Module | None]:
    """``activation_attr``: the config attribute the HF MLP reads its activation from."""
    def build(module: nn.Module, config: Any) -> nn.Module | None:
        act = getattr(config, activation_attr, None)
        if act not in ACTIVATIONS:
            log.info("swiftlora: keeping %s (activation %r has no GLU kernel)", type(module).__name__, act)
            return None
        return GatedMLP.from_module(module, act)
    return build
