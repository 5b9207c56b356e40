"""The causal-LM level of a patched model: the LM head and loss on swiftlora's fused linear cross-entropy, TRL's
fused-head calls served by it, and "unsloth" gradient checkpointing that survives the Trainer re-enabling it.

A patched model's class becomes a subclass of its own HF class with :class:`SwiftCausalLM` mixed in (same class
name, so ``config.architectures`` and saving are unchanged; made with ``type()``, one per HF class). Its forward:

- ``model(..., fused_lm_head=True)`` (TRL >= 1.16's trainers): backbone, then per-token log-probs (and the entropy /
  top-1 metrics TRL asked for) from :func:`swiftlora.nn.lm_head.head_token_outputs`, returned as TRL's
  ``FusedCausalLMOutput``. TRL's ``add_fused_lm_head`` assigns its own wrapper to ``model.forward``; the mixin's
  ``__setattr__`` recognises that wrapper, keeps its options (temperature, outputs) and leaves this forward in place.
- ``labels`` with gradients enabled (HF ``Trainer``, a plain training loop): backbone, then the loss from
  :func:`swiftlora.nn.lm_head.head_loss`; ``logits`` is None (never materialised).
- otherwise (generation, evaluation): the HF forward unchanged, its loss on swiftlora's cross-entropy kernel.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import _compat
from ..nn.lm_head import head_loss, head_token_outputs
from ..nn.loss import causal_lm_loss, logit_options
from ..train.checkpointing import make_offloaded_checkpoint

# keyword arguments of the CausalLM forward that its backbone does not take
_HEAD_ONLY_KWARGS = ("logits_to_keep", "return_dict")


class SwiftCausalLM:
    """Mixin placed before an HF ``*ForCausalLM`` class (see the module docstring)."""

    _swiftlora_base: type  # the HF class (set on each generated class)
    _swiftlora_head_request: dict | None = None
    _swiftlora_checkpointing: str | bool | None = None  # "unsloth": offload checkpointed inputs to host memory

    def __setattr__(self, name, value):
        if name == "forward":
            request = _compat.trl_fused_head_request(value)
            if request is not None:
                object.__setattr__(self, "_swiftlora_head_request", request)
                return
        super().__setattr__(name, value)

    def __reduce_ex__(self, protocol):
        # the generated class has its HF base's name, so pickle would find the base by name and refuse: rebuild
        # from the base class instead (the model's own state, minus caches, follows through __setstate__)
        return _rebuild_swift_instance, (self._swiftlora_base,), self.__getstate__()

    def __getstate__(self):
        state = super().__getstate__()
        # a weak reference to the tokenizer (for exports) does not pickle; copies fall back to an explicit tokenizer
        return {k: v for k, v in state.items() if k != "_swiftlora_tokenizer"}

    def _swiftlora_forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None,
                           num_items_in_batch=None, **kwargs):
        if fused_lm_head:
            return self._swiftlora_fused_head(args, kwargs, labels, shift_labels, num_items_in_batch)
        if (labels is not None or shift_labels is not None) and torch.is_grad_enabled():
            return self._swiftlora_train_loss(args, kwargs, labels, shift_labels, num_items_in_batch)
        extra = {k: v for k, v in (("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch))
                 if v is not None}
        return self._swiftlora_base.forward(self, *args, labels=labels, **kwargs, **extra)

    def _swiftlora_backbone(self, args, kwargs):
        for key in _HEAD_ONLY_KWARGS:
            kwargs.pop(key, None)
        return self.base_model(*args, **kwargs)

    def _swiftlora_train_loss(self, args, kwargs, labels, shift_labels, num_items_in_batch):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self._swiftlora_backbone(args, kwargs)
        options = logit_options(self.config)
        loss = head_loss(out.last_hidden_state, self.get_output_embeddings(), labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, softcap=options["softcap"],
                         logit_scale=options["logit_scale"])
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    def _swiftlora_fused_head(self, args, kwargs, labels, shift_labels, num_items_in_batch):
        request = self._swiftlora_head_request or {}
        kwargs["use_cache"] = False
        out = self._swiftlora_backbone(args, kwargs)
        options = logit_options(self.config)
        res = head_token_outputs(out.last_hidden_state, self.get_output_embeddings(), labels,
                                 shift_labels=shift_labels, temperature=request.get("temperature", 1.0),
                                 softcap=options["softcap"], logit_scale=options["logit_scale"],
                                 outputs=request.get("outputs", ("log_probs", "entropy", "is_top1")),
                                 upcast=request.get("cast_lm_head_to_fp32", False))
        mask = res["label_mask"]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -res["log_probs"].sum() / count
        fields = {k: res.get(k) for k in ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")}
        return _compat.fused_causal_lm_output(loss=loss, label_mask=mask, **fields)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, *args, **kwargs):
        """transformers calls this from ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` (the
        Trainer does when ``args.gradient_checkpointing``): in "unsloth" mode the offloading checkpoint is kept."""
        if enable and self._swiftlora_checkpointing == "unsloth":
            gradient_checkpointing_func = self._swiftlora_offload_fn()
        elif gradient_checkpointing_func is None:
            gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        return super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, *args, **kwargs)

    def _swiftlora_offload_fn(self):
        fn = self.__dict__.get("_swiftlora_offload")
        if fn is None:
            fn = make_offloaded_checkpoint()
            object.__setattr__(self, "_swiftlora_offload", fn)
        return fn


_CLASSES: dict[type, type] = {}


def swift_class(base: type) -> type:
    """``SwiftCausalLM`` mixed into the HF class ``base`` (cached). The forward keeps ``base.forward``'s signature
    (``generate`` validates its keyword arguments against it)."""
    cls = _CLASSES.get(base)
    if cls is None:
        @functools.wraps(base.forward)
        def forward(self, *args, **kwargs):
            return SwiftCausalLM._swiftlora_forward(self, *args, **kwargs)

        cls = type(base.__name__, (SwiftCausalLM, base),
                   {"forward": forward, "_swiftlora_base": base, "__module__": base.__module__,
                    "__qualname__": base.__qualname__})
        _CLASSES[base] = cls
    return cls


def _rebuild_swift_instance(base: type):
    """Unpickling: an empty instance of ``swift_class(base)`` (its state is restored next by ``__setstate__``)."""
    obj = base.__new__(base)
    obj.__class__ = swift_class(base)
    return obj


def patch_causal_lm(model: nn.Module) -> None:
    """Gives ``model`` the swiftlora causal-LM behaviour (class swap) and swiftlora's cross-entropy as its
    ``loss_function`` for the logits path."""
    if not isinstance(model, SwiftCausalLM):
        model.__class__ = swift_class(type(model))
    model.loss_function = causal_lm_loss


def set_checkpointing(model: nn.Module, mode) -> None:
    """``mode``: "unsloth" (offloading), True (torch checkpointing, non-reentrant), False (off)."""
    if mode not in (True, False, "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be True, False or 'unsloth', got {mode!r}")
    object.__setattr__(model, "_swiftlora_checkpointing", mode)
    if mode:
        model._set_gradient_checkpointing(True)
    elif getattr(model, "is_gradient_checkpointing", False):
        model._set_gradient_checkpointing(False)
