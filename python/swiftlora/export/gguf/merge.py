"""The model a GGUF export writes: a plain Hugging Face causal LM with any LoRA adapters merged in full precision.

One small function on purpose: the QLoRA workflow's merge (branch flm: export/merge.py, ``merged_tensors``, which
also densifies NF4/int8 bases) can replace it or hand the exporter an already merged model. It lives here, not in
export/merge.py, so the two branches do not both add that file. Nothing is written to disk.
"""
from __future__ import annotations

import copy

import torch


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_for_export(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself for a plain model; for a PEFT model, a float32 copy in memory with its adapters merged
    (peft's ``merge_and_unload``; the caller's model is untouched). The copy costs 4 bytes per parameter on the
    model's device. Raises ValueError for weights that are not floating point (quantized bases: merge first)."""
    if _is_peft(model):
        merged = copy.deepcopy(model)
        merged.to(torch.float32)
        model = merged.merge_and_unload()
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise ValueError(f"GGUF export: parameter {name} is stored as {p.dtype} (a quantized base?); export "
                             "needs floating-point weights: merge/dequantize the model first")
    return model
