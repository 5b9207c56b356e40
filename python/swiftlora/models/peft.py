"""``get_peft_model`` with Unsloth's arguments, on PEFT's LoRA.

LoRA wraps the projections inside swiftlora's attention and MLP modules (they keep the HF child names, so PEFT's
``target_modules`` work unchanged); adapters are float32 (PEFT's ``autocast_adapter_dtype``) over NF4 or 16-bit
bases. Unsloth's rules kept: ``embed_tokens``/``lm_head`` named in ``target_modules`` are trained whole
(``modules_to_save``) instead; LoftQ initialisation needs a model loaded without 4-bit quantization; a second call
with the same arguments returns the model as it is, with other arguments it raises. ``random_state`` seeds the
adapters' initialisation. ``use_gradient_checkpointing``: "unsloth" (checkpointed layer inputs offloaded to pinned
host memory, :mod:`swiftlora.train.checkpointing`), True (torch's checkpointing), False.
"""
from __future__ import annotations

import functools
import logging
import warnings

import torch

from .causal_lm import set_checkpointing

log = logging.getLogger("swiftlora")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WHOLE_MODULES = ("embed_tokens", "lm_head")


def attach_methods(model) -> None:
    """Bind swiftlora's saving methods (``save_pretrained_merged`` ...) to this model instance (as partials, which
    pickle with the model: ``types.MethodType`` pickles as a ``getattr`` on the half-restored model and fails)."""
    from ..export import MODEL_METHODS

    for name, fn in MODEL_METHODS.items():
        setattr(model, name, functools.update_wrapper(functools.partial(fn, model), fn))


def _check(name, ok, expected, value):
    if not ok:
        raise ValueError(f"get_peft_model: {name} must be {expected}, got {value!r}")


def _lora_config(r, target_modules, lora_alpha, lora_dropout, bias, layers_to_transform, layers_pattern,
                 use_rslora, modules_to_save, init_lora_weights, loftq_config, kwargs):
    from peft import LoftQConfig, LoraConfig

    _check("r", isinstance(r, int) and not isinstance(r, bool) and r > 0, "a positive int", r)
    _check("lora_alpha", isinstance(lora_alpha, (int, float)) and lora_alpha > 0, "a positive number", lora_alpha)
    _check("lora_dropout", isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1, "in [0, 1)",
           lora_dropout)
    _check("bias", bias in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'", bias)
    if isinstance(target_modules, str):
        targets = target_modules if target_modules == "all-linear" else [target_modules]
    else:
        _check("target_modules", target_modules and all(isinstance(t, str) for t in target_modules),
               "a non-empty list of module names or 'all-linear'", target_modules)
        targets = list(target_modules)
    whole = list(modules_to_save or [])
    if isinstance(targets, list):
        for name in WHOLE_MODULES:
            if name in targets:
                targets.remove(name)
                whole += [name] if name not in whole else []
        _check("target_modules", targets, "at least one projection besides embed_tokens/lm_head", target_modules)
    loftq = None
    if init_lora_weights == "loftq":
        loftq = loftq_config if isinstance(loftq_config, LoftQConfig) else LoftQConfig(**(loftq_config or {}))
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=float(lora_dropout),
                      bias=bias, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                      use_rslora=use_rslora, modules_to_save=whole or None, init_lora_weights=init_lora_weights,
                      loftq_config=loftq or {}, task_type="CAUSAL_LM", **kwargs)


def _same_lora(a, b) -> bool:
    fields = ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "layers_to_transform", "init_lora_weights")
    if a is None or any(getattr(a, f) != getattr(b, f) for f in fields):
        return False
    as_set = lambda v: set(v) if isinstance(v, (list, set, tuple)) else v  # noqa: E731
    return (as_set(a.target_modules) == as_set(b.target_modules)
            and as_set(a.modules_to_save or []) == as_set(b.modules_to_save or []))


def get_peft_model(model, r=16, target_modules=DEFAULT_TARGETS, lora_alpha=16, lora_dropout=0.0, bias="none",
                   layers_to_transform=None, layers_pattern=None, use_gradient_checkpointing="unsloth",
                   random_state=3407, max_seq_length=2048, use_rslora=False, modules_to_save=None,
                   init_lora_weights=True, loftq_config=None, temporary_location=None, **kwargs):
    """See :meth:`swiftlora.FastLanguageModel.get_peft_model`."""
    import peft

    if use_gradient_checkpointing not in (True, False, "unsloth"):
        raise ValueError(f"get_peft_model: use_gradient_checkpointing must be True, False or 'unsloth', got "
                         f"{use_gradient_checkpointing!r}")
    info = getattr(model, "swiftlora_info", None)
    if info is not None and info.full_finetuning:
        warnings.warn("swiftlora: full_finetuning=True: get_peft_model adds no adapters", stacklevel=3)
        return model
    if init_lora_weights == "loftq" and getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("get_peft_model: LoftQ initialises from the full-precision weights: load the model with "
                         "load_in_4bit=False")
    config = _lora_config(r, target_modules, lora_alpha, lora_dropout, bias, layers_to_transform, layers_pattern,
                          use_rslora, modules_to_save, init_lora_weights, loftq_config, kwargs)
    if isinstance(model, peft.PeftModel):
        if _same_lora(model.peft_config.get("default"), config):
            return model
        raise TypeError("get_peft_model: the model already has LoRA adapters with other settings; load it again")
    if lora_dropout or bias != "none":
        log.info("swiftlora: lora_dropout=%s, bias=%r: these LoRA layers run PEFT's own forward", lora_dropout, bias)
    torch.manual_seed(random_state)
    peft_model = peft.get_peft_model(model, config)
    if info is not None:
        peft_model.peft_config["default"].base_model_name_or_path = info.source.name
    set_checkpointing(model, use_gradient_checkpointing)
    attach_methods(peft_model)
    peft_model.max_seq_length = getattr(model, "max_seq_length", max_seq_length)
    return peft_model
