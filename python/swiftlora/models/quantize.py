"""NF4 quantization of a loaded 16-bit model's linear layers into standard ``bitsandbytes.nn.Linear4bit`` modules
(blocksize 64, double quantization, the layout transformers writes and reads), and the bookkeeping that makes the
model look like one transformers loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (``hf_quantizer``,
``config.quantization_config``, ``is_loaded_in_4bit``), so PEFT, the Trainer and ``save_pretrained`` treat it so.

The quantizer is :func:`swiftlora.quant.quantize_linear_to_bnb` (swiftlora's NF4 kernels, bitsandbytes' bytes).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import quantize_linear_to_bnb

# modules never quantized: the LM head (often tied to the embeddings) stays 16-bit, as in transformers' bnb loader
SKIP_MODULES = ("lm_head",)


def bnb_4bit_config(compute_dtype: torch.dtype, skip_modules=SKIP_MODULES):
    """The ``BitsAndBytesConfig`` describing what :func:`quantize_linears` produces."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=list(skip_modules))


def quantize_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """One ``nn.Linear`` ``[out, in]`` (16/32-bit, any device) -> ``bnb.nn.Linear4bit`` (NF4, blocksize 64, double
    quantization) on the same device, frozen."""
    return quantize_linear_to_bnb(linear, compute_dtype=compute_dtype).requires_grad_(False)


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, skip_modules=SKIP_MODULES) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (except ``skip_modules`` by name) with a 4-bit one, one at a
    time (the 16-bit weight is freed as its layer is done). Returns how many were quantized."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rpartition(".")[2] in skip_modules:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(module, compute_dtype))
        count += 1
    return count


def mark_quantized(model: nn.Module, compute_dtype: torch.dtype, skip_modules=SKIP_MODULES) -> None:
    """Attach transformers' bnb 4-bit quantizer state to a model quantized by :func:`quantize_linears`."""
    from transformers.quantizers.auto import AutoHfQuantizer

    config = bnb_4bit_config(compute_dtype, skip_modules)
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    quantizer.modules_to_not_convert = list(skip_modules)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
