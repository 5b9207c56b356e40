"""``save_pretrained_merged`` / ``push_to_hub_merged`` (Unsloth's saving API) and the atomic adapter save.

save_method:
- ``"lora"``: the adapters only (PEFT's adapter_config.json + adapter_model.safetensors).
- ``"merged_16bit"``: a plain transformers checkpoint (safetensors, no quantization config) with LoRA merged into
  the original 16-bit weights when the model was quantized from them at load, else into the dequantized weights
  (:mod:`swiftlora.export.merge`). Written in the model's 16-bit dtype (bfloat16 for a float32 model).
- ``"merged_4bit"`` (aliases ``"merged_4bit_forced"``, ``"forced_merged_4bit"``): the same merge re-quantized to
  NF4 in bitsandbytes' layout with its quantization config (loads with transformers as a 4-bit model). The NF4
  rounding swallows part of the fine-tune's delta: prefer merged_16bit for accuracy.

The tokenizer (chat template, EOS and pad tokens) and the generation config are written beside the weights.
Everything goes to a temporary directory renamed into place (:mod:`swiftlora.export.atomic`).
"""
from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from ..distributed import check_not_sharded, on_main_process
from .atomic import atomic_dir
from .merge import base_model_of, merged_tensors
from .writer import write_safetensors

log = logging.getLogger("swiftlora")

SAVE_METHODS = {"lora": "lora", "merged_16bit": "merged_16bit", "merged_4bit": "merged_4bit",
                "merged_4bit_forced": "merged_4bit", "forced_merged_4bit": "merged_4bit"}


def save_pretrained(self, save_directory, *args, **kwargs):
    """The model's own ``save_pretrained`` (PEFT: the adapters), written atomically."""
    with atomic_dir(save_directory) as tmp:
        type(self).save_pretrained(self, str(tmp), *args, **kwargs)


@on_main_process
def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                           push_to_hub: bool = False, token=None, max_shard_size="5GB", dtype=None, **kwargs):
    """Save the fine-tuned model (see the module docstring). ``dtype`` overrides the merged weights' dtype.
    Unsloth's other arguments (``safe_serialization``, ``maximum_memory_usage``, ...) are accepted and unused:
    the writer streams one shard at a time and always writes safetensors."""
    method = SAVE_METHODS.get(save_method)
    if method is None:
        raise ValueError(f"save_method must be one of {sorted(SAVE_METHODS)}, got {save_method!r}")
    check_not_sharded(self, "save_pretrained_merged")
    if push_to_hub:
        return push_to_hub_merged(self, str(save_directory), tokenizer, save_method, token=token,
                                  max_shard_size=max_shard_size, **kwargs)
    if method == "lora":
        if not hasattr(self, "peft_config"):
            raise ValueError("save_method='lora' needs a model with LoRA adapters (from get_peft_model)")
        with atomic_dir(save_directory) as tmp:
            type(self).save_pretrained(self, str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return
    if method == "merged_4bit":
        warnings.warn("swiftlora: merging into NF4 weights loses part of the fine-tune; merged_16bit keeps it",
                      stacklevel=2)
    base = base_model_of(self)
    dtype = dtype or _merged_dtype(base)
    with atomic_dir(save_directory) as tmp:
        tensors = _checkpoint_tensors(self, base, dtype, quantize=method == "merged_4bit")
        write_safetensors(tmp, tensors, max_shard_size)
        _write_config(base, tmp, dtype, tokenizer, quantized=method == "merged_4bit")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


@on_main_process
def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                       private=None, commit_message: str = "Trained with swiftlora", create_pr: bool = False,
                       revision=None, max_shard_size="5GB", **kwargs):
    """``save_pretrained_merged`` into a temporary directory, then upload it to the Hub repo ``repo_id``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="swiftlora-push-") as tmp:
        folder = Path(tmp) / "model"
        save_pretrained_merged(self, folder, tokenizer, save_method, max_shard_size=max_shard_size)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                                 create_pr=create_pr, revision=revision)


def _merged_dtype(base) -> torch.dtype:
    info = getattr(base, "swiftlora_info", None)
    dtype = info.dtype if info is not None else next(base.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _tied(base) -> bool:
    return bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False))


def _checkpoint_tensors(model, base, dtype, quantize: bool):
    """Merged tensors with transformers' key names; the tied LM head is left out (it is the embedding);
    with ``quantize``, linear weights (not the LM head) as bitsandbytes NF4 entries."""
    skip_head = _tied(base)
    for key, t, is_linear in merged_tensors(model, dtype):
        if skip_head and key == "lm_head.weight":
            continue
        if quantize and is_linear and not key.startswith("lm_head."):
            yield from _nf4_entries(key, t)
        else:
            yield key, t


def _nf4_entries(key: str, weight: torch.Tensor):
    """A dense ``[out, in]`` weight as the state-dict entries ``bnb.nn.Linear4bit`` saves (NF4, blocksize 64,
    double quantization; swiftlora's quantizer, bitsandbytes' bytes)."""
    from ..quant import quantize_nf4

    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, state = quantize_nf4(weight.to(device), blocksize=64, compress_statistics=True)
    yield key, packed.cpu()
    for name, value in state.as_dict(packed=True).items():
        yield f"{key}.{name}", value.cpu()


def _write_config(base, directory: Path, dtype: torch.dtype, tokenizer, quantized: bool) -> None:
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("_is_quantized", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    if quantized:
        from ..models.quantize import bnb_4bit_config

        config.quantization_config = bnb_4bit_config(dtype).to_dict()
    config.dtype = dtype
    config.architectures = [type(base).__name__]
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = _with_eos(config.eos_token_id, tokenizer.eos_token_id)
    config.save_pretrained(str(directory))
    generation = getattr(base, "generation_config", None)
    if generation is not None:
        generation = copy.deepcopy(generation)
        if tokenizer is not None:
            generation.pad_token_id = tokenizer.pad_token_id
            generation.eos_token_id = _with_eos(generation.eos_token_id, tokenizer.eos_token_id)
        generation.save_pretrained(str(directory))


def _with_eos(current, eos):
    """The model's EOS id(s) plus the tokenizer's (a chat template's end-of-turn token must stop generation too;
    the model's own EOS ids are kept)."""
    if eos is None:
        return current
    ids = [] if current is None else list(current) if isinstance(current, (list, tuple)) else [current]
    if eos not in ids:
        ids.append(eos)
    return ids[0] if len(ids) == 1 else ids
