"""A fine-tuned model as plain transformers tensors: LoRA merged into its base weights, modules_to_save copies in
place of the originals, NF4 / int8 layers dense again, keys as the original checkpoint names them.

The base weight a LoRA delta ``scale · B @ A`` is added to (in float32) is the original 16-bit weight re-read from
the checkpoint's local safetensors when the model was quantized from them at load (no NF4 rounding in the merged
model), else the dequantized NF4/int8 weight, else the layer's own weight.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .. import _compat
from ..quant import dequantize_nf4, from_bnb_quant_state

log = logging.getLogger("swiftlora")


class OriginalWeights:
    """Lazy reader of a local safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            self.files = {}
            from safetensors import safe_open

            for f in sorted(self.directory.glob("*.safetensors")):
                with safe_open(f, framework="pt") as st:
                    self.files.update({k: f.name for k in st.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.directory / self.files[key], framework="pt") as st:
            return st.get_tensor(key)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_lora(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _is_modules_to_save(module) -> bool:
    return hasattr(module, "modules_to_save") and hasattr(module, "original_module")


def dense_weight(layer: nn.Module, key: str, original: OriginalWeights | None) -> torch.Tensor:
    """The unquantized ``[out, in]`` weight of a (possibly bitsandbytes) linear layer."""
    if original is not None and key in original:
        return original.get(key).to(layer.weight.device)
    kind = type(layer).__name__
    if kind == "Linear4bit":
        packed, state = _compat.bnb_4bit_weight(layer)
        return dequantize_nf4(packed, from_bnb_quant_state(state))
    if kind == "Linear8bitLt":  # int8 rows with per-row absmax; after its first forward bnb keeps SCB in .state
        scb = getattr(layer.weight, "SCB", None)
        scb = scb if scb is not None else layer.state.SCB
        return layer.weight.data.float() * (scb.float()[:, None] / 127.0)
    return layer.weight


def merged_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(key, tensor on CPU in dtype for floating tensors, is_linear_weight)`` for every persistent tensor of the
    merged model, in module order."""
    base = base_model_of(model)
    info = getattr(base, "swiftlora_info", None)
    original = None
    if info is not None and info.quantized_here and info.source.weights_dir:
        original = OriginalWeights(info.source.weights_dir)
    skip: tuple[str, ...] = ()
    for name, module in base.named_modules():
        if skip and name.startswith(skip):
            continue
        prefix = name + "." if name else ""
        if _is_lora(module):
            skip += (prefix,)
            yield from _lora_tensors(module, prefix, original, dtype)
        elif _is_modules_to_save(module):
            skip += (prefix,)
            trained = module.modules_to_save[module.active_adapters[0]]
            yield from ((prefix + k, _cast(v, dtype), False) for k, v in trained.state_dict().items())
        elif type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            skip += (prefix,)
            yield prefix + "weight", _cast(dense_weight(module, prefix + "weight", original), dtype), True
            if module.bias is not None:
                yield prefix + "bias", _cast(module.bias, dtype), False
        else:
            for k, v in module.named_parameters(recurse=False):
                yield prefix + k, _cast(v, dtype), isinstance(module, nn.Linear) and k == "weight"
            for k, v in module.named_buffers(recurse=False):
                if k not in module._non_persistent_buffers_set:
                    yield prefix + k, _cast(v, dtype), False


def _lora_tensors(module, prefix, original, dtype):
    layer = module.get_base_layer()
    weight = dense_weight(layer, prefix + "weight", original).float()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).float().to(weight.device)
    if not torch.isfinite(weight).all():
        raise FloatingPointError(f"merging LoRA into {prefix}weight produced inf/NaN")
    yield prefix + "weight", _cast(weight, dtype), True
    if getattr(layer, "bias", None) is not None:
        yield prefix + "bias", _cast(layer.bias, dtype), False


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous()
