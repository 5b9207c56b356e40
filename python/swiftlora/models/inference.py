"""``for_inference`` / ``for_training``: switching a model between generation and training.

Inference: eval mode (no dropout, no checkpointing), the KV cache on, the tokenizer loaded with the model padding on
the left (batched generation needs the prompts' ends aligned). Training: train mode, right padding, the cache off.
"""
from __future__ import annotations

from .causal_lm import set_checkpointing


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _tokenizer(model):
    ref = getattr(_base(model), "_swiftlora_tokenizer", None)
    return ref() if ref is not None else None


def for_inference(model):
    """Prepare ``model`` (as returned by from_pretrained or get_peft_model) for ``generate``; returns it."""
    base = _base(model)
    model.eval()
    base.config.use_cache = True
    tokenizer = _tokenizer(model)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model


def for_training(model, use_gradient_checkpointing=None):
    """Back to training; ``use_gradient_checkpointing`` (True / False / "unsloth") changes the checkpointing mode
    when given, else the mode chosen in get_peft_model stays. Returns the model."""
    base = _base(model)
    model.train()
    base.config.use_cache = False
    if use_gradient_checkpointing is not None:
        set_checkpointing(base, use_gradient_checkpointing)
    tokenizer = _tokenizer(model)
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    return model
