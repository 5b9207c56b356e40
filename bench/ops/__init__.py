"""One benchmark spec per op (see common.py for what a spec defines)."""
from __future__ import annotations

import importlib
from types import ModuleType

OPS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy", "token_logprobs",
       "nf4_dequantize", "nf4_gemv", "qlora_linear", "lora_mlp")


def load(op: str) -> ModuleType:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    return importlib.import_module(f"{__name__}.{op}")
