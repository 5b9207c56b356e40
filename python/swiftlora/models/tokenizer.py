"""Tokenizer set-up at load time: a pad token distinct from EOS where the vocabulary has one.

Padding with EOS is what makes fine-tunes that never stop (their EOS labels get masked with the padding by
collators that mask by token id). So when the tokenizer has no pad token, or pads with EOS, the first of these
that the vocabulary already holds becomes the pad token: Llama 3's reserved ``<|finetune_right_pad_id|>``, the
usual ``<|pad|>`` / ``<pad>`` / ``[PAD]``, Unsloth's ``<|PAD_TOKEN|>``, ``<|endoftext|>`` (when it is not EOS), then
the unknown token. No token is added (that would resize the embeddings). Only when none exists does EOS stay the
pad token. Training pads on the right; :func:`swiftlora.models.inference.for_inference` switches to the left.
"""
from __future__ import annotations

import logging

log = logging.getLogger("swiftlora")

PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|endoftext|>")


def choose_pad_token(tokenizer, avoid_text: str = "") -> str | None:
    """The pad token to use (None: nothing better than EOS): a known pad-like token, else UNK, that is in the
    vocabulary, is neither EOS nor BOS, and does not occur in ``avoid_text`` (e.g. the chat template, whose own
    tokens must stay trainable)."""
    vocab = tokenizer.get_vocab()
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    for token in (*PAD_CANDIDATES, tokenizer.unk_token):
        if token and token in vocab and vocab[token] not in taken and token not in avoid_text:
            return token
    return None


def fix_tokenizer(tokenizer, model=None) -> None:
    """Set a pad token (see the module docstring), right padding, and the pad id on the model's configs."""
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        token = choose_pad_token(tokenizer)
        if token is not None:
            tokenizer.pad_token = token
        elif tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token first")
            log.warning("swiftlora: %s has no pad token other than EOS; padding with EOS %r",
                        type(tokenizer).__name__, tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.pad_token_id = tokenizer.pad_token_id
