"""``FastLanguageModel``: Unsloth's loading API over transformers, with swiftlora's modules swapped in.

``from_pretrained`` resolves the model (Hub id, local directory, PEFT adapter directory, GGUF file), loads it in
16-bit, quantizes its linear layers to NF4 ``bitsandbytes.nn.Linear4bit`` when ``load_in_4bit`` (pre-quantized
bitsandbytes checkpoints load as they are; ``load_in_8bit`` uses bitsandbytes' int8 layers), applies the
architecture's swap table (:mod:`swiftlora.models.patching`) and the causal-LM patch, and fixes the tokenizer's
pad token.

``dtype=None``: on CUDA bfloat16 where the GPU computes it (Ampere on), else float16. On CPU bfloat16 where the CPU
multiplies it in hardware (AVX512-BF16, AMX), else float32: without that support torch emulates bf16 GEMMs through
float32 (about 4x slower than float32 measured on an AVX2 EPYC), so float32 is the CPU's 16-bit-less fast path.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass

import torch

from .. import _compat
from ..distributed import launched_cuda_device
from . import source as sources
from .causal_lm import patch_causal_lm, set_checkpointing
from .patching import apply_swaps, architecture
from .quantize import SKIP_MODULES, mark_quantized, quantize_linears
from .tokenizer import fix_tokenizer

log = logging.getLogger("swiftlora")

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


@dataclass
class LoadInfo:
    """What swiftlora remembers about how a model was loaded (``model.swiftlora_info``)."""

    source: sources.ModelSource
    dtype: torch.dtype
    load_in_4bit: bool
    quantized_here: bool      # NF4 made from 16-bit weights at load (else pre-quantized or not quantized)
    max_seq_length: int
    full_finetuning: bool
    patched: dict             # swiftlora module class -> how many were swapped in


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """``None`` -> see the module docstring; strings and torch dtypes accepted."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _compat.cpu_has_native_bf16() else torch.float32
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"dtype must be None, a torch float dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    return dtype


def is_bfloat16_supported(device=None) -> bool:
    """Whether ``dtype=None`` picks bfloat16 on ``device`` (default: the GPU if any, else the CPU): Unsloth
    scripts pass ``bf16=is_bfloat16_supported(), fp16=not is_bfloat16_supported()`` to their trainer config."""
    device = torch.device(device) if device is not None else resolve_device(None)
    return resolve_dtype(None, device) == torch.bfloat16


def resolve_device(device_map) -> torch.device:
    """Unsloth's ``device_map`` ("sequential", "auto", None, a device string or a {"": device} dict) -> the single
    device the model goes to: the current CUDA device when there is one, and under torchrun/accelerate with CUDA
    the rank's own GPU, ``cuda:LOCAL_RANK`` (made the current device, as data-parallel training expects)."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map: swiftlora places the whole model on one device, got {device_map}")
        device_map = devices.pop()
    if device_map in (None, "sequential", "auto", "balanced", "balanced_low_0"):
        launched = launched_cuda_device()
        if launched is not None:  # torchrun/accelerate: each rank loads its own copy on its own GPU
            torch.cuda.set_device(launched)
            return launched
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def load_model(model_name="unsloth/Llama-3.2-1B-Instruct", max_seq_length=2048, dtype=None, load_in_4bit=True,
               load_in_8bit=False, load_in_16bit=False, full_finetuning=False, token=None, device_map="sequential",
               rope_scaling=None, fix_tokenizer_=True, trust_remote_code=False, use_gradient_checkpointing="unsloth",
               revision=None, attn_implementation=None, fast_inference=False, random_state=3407, **kwargs):
    """See :meth:`FastLanguageModel.from_pretrained`."""
    if fast_inference:
        warnings.warn("swiftlora: fast_inference (vLLM) is not supported; generation uses transformers' generate",
                      stacklevel=3)
    if sum(map(bool, (load_in_4bit and not full_finetuning, load_in_8bit, load_in_16bit))) > 1:
        raise ValueError("load_in_4bit, load_in_8bit and load_in_16bit are mutually exclusive: pass one of them")
    if not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
    hub = {k: kwargs.pop(k) for k in ("cache_dir", "local_files_only") if k in kwargs}
    if kwargs:
        log.info("swiftlora: from_pretrained ignores %s", sorted(kwargs))
    torch.manual_seed(random_state)
    device = resolve_device(device_map)
    dtype = resolve_dtype(dtype, device)
    source, config = sources.resolve(model_name, token, revision, trust_remote_code, **hub)
    if rope_scaling is not None and config is not None:
        _compat.set_rope_scaling(config, rope_scaling)
    arch = architecture(getattr(config, "model_type", None)) if config is not None else None
    attn = attn_implementation or (arch.attn_implementation(config) if arch else "sdpa")
    quantize_here = load_in_4bit and not full_finetuning and not load_in_8bit and not load_in_16bit
    model = _read_model(source, config, dtype, device, attn, load_in_8bit, token, revision, trust_remote_code, hub)
    if config is None:  # GGUF: the config came with the model
        arch = architecture(model.config.model_type)
        if rope_scaling is not None:
            _compat.set_rope_scaling(model.config, rope_scaling)
        if arch is not None and attn_implementation is None and arch.attn_implementation(model.config) != attn:
            model.set_attn_implementation(arch.attn_implementation(model.config))
    if arch is None:
        log.warning("swiftlora: no swap table for model_type %r: it trains with transformers' own modules",
                    model.config.model_type)
    if quantize_here and not _is_prequantized(model.config):
        quantize_linears(model, dtype, SKIP_MODULES)
        mark_quantized(model, dtype, SKIP_MODULES)
    else:
        quantize_here = False
    if source.weights_dir is None and not source.is_gguf:
        source.weights_dir = sources.hub_snapshot_dir(source, token, revision)
    if not sources.is_16bit_checkpoint(source.weights_dir):
        source.weights_dir = None
    bnb_layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    for m in bnb_layers:  # bitsandbytes' standard NF4 layout stays (our kernels read it), on CPUs with AVX512-BF16 too
        _compat.keep_bnb_standard_layout(m)
    if bnb_layers:
        _compat.fix_bnb_cpu_dequantize()
    patched = apply_swaps(model, arch, model.config) if arch else {}
    patch_causal_lm(model)
    tokenizer = sources.load_tokenizer(_tokenizer_source(source), token, revision, trust_remote_code, **hub)
    if fix_tokenizer_:
        fix_tokenizer(tokenizer, model)
    if max_seq_length > getattr(model.config, "max_position_embeddings", max_seq_length) and rope_scaling is None:
        log.warning("swiftlora: max_seq_length %d exceeds the model's max_position_embeddings %d (pass rope_scaling)",
                    max_seq_length, model.config.max_position_embeddings)
    model.max_seq_length = max_seq_length
    model.swiftlora_info = LoadInfo(source, dtype, bool(load_in_4bit and not full_finetuning), quantize_here,
                                    max_seq_length, full_finetuning, dict(patched))
    model._swiftlora_tokenizer = weakref.ref(tokenizer)
    if full_finetuning:
        model.requires_grad_(True)
        set_checkpointing(model, use_gradient_checkpointing)
    else:
        model.requires_grad_(False)
    log.info("swiftlora: loaded %s (%s%s) with %s", source.name, str(dtype).removeprefix("torch."),
             ", NF4" if load_in_4bit and not full_finetuning else "", dict(patched) or "no swaps")
    if source.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter_dir, is_trainable=True)
        from .peft import attach_methods

        attach_methods(model)
    return model, tokenizer


def _is_prequantized(config) -> bool:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES")


def _tokenizer_source(source: sources.ModelSource) -> sources.ModelSource:
    from pathlib import Path

    if source.adapter_dir and (Path(source.adapter_dir) / "tokenizer_config.json").is_file():
        return sources.ModelSource(source.adapter_dir, source.adapter_dir)
    return source


def _read_model(source, config, dtype, device, attn, load_in_8bit, token, revision, trust_remote_code, hub):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if source.is_gguf:
        return sources.load_gguf(source, dtype, device, attn)
    kwargs = dict(config=config, dtype=dtype, attn_implementation=attn, token=token, revision=revision,
                  trust_remote_code=trust_remote_code, device_map={"": device}, **hub)
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
