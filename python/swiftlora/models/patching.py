"""Applying an architecture's swap table to a loaded model: each HF module whose class is in the table is replaced,
in its parent, by the swiftlora module the table's factory builds from it (children first, so an attention module
is rebuilt around already-swapped q/k norms). Nothing global changes: only this model instance's modules.

An architecture file (``models/llama.py`` ...) is one :class:`Architecture`: its HF model types and a dict
``HF module class -> factory(module, config) -> nn.Module or None`` (None keeps the HF module, e.g. an activation
or rope type the kernels do not cover).
"""
from __future__ import annotations

import importlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

Factory = Callable[[nn.Module, Any], "nn.Module | None"]

# model_type -> module (under swiftlora.models) holding its ARCH
FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}


@dataclass(frozen=True)
class Architecture:
    """An architecture family's table of module swaps."""

    model_types: tuple[str, ...]
    swaps: dict[type, Factory]
    # the attention backend to load with when the caller does not choose one: "sdpa", or "eager" where SDPA cannot
    # express the model (Gemma 2's attention-logit soft-capping)
    attn_implementation: Callable[[Any], str] = field(default=lambda config: "sdpa")


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def architecture(model_type: str) -> Architecture | None:
    """The swap table for an HF ``config.model_type`` (None when swiftlora has none: the model runs unpatched)."""
    family = FAMILIES.get(model_type)
    if family is None:
        return None
    return importlib.import_module(f"{__package__}.{family}").ARCH


def apply_swaps(model: nn.Module, arch: Architecture, config: Any) -> Counter:
    """Replace every module of ``model`` whose class is in ``arch.swaps``; returns how many of each new class."""
    done: Counter = Counter()
    for name, module in reversed(list(model.named_modules())):
        factory = arch.swaps.get(type(module))
        if factory is None or not name:
            continue
        new = factory(module, config)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        done[type(new).__name__] += 1
    return done
