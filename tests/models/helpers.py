"""Tiny random models for the workflow tests: one config per architecture family, a character-level tokenizer
with a ChatML template (so tests need no download and run in seconds), and checkpoint directories built from them."""
from __future__ import annotations

import string
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<s>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
VOCAB = SPECIALS + CHARS


def char_tokenizer():
    """A fast tokenizer with one token per character (vocab 101), pad/eos/bos/unk specials and ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def _common(**extra):
    base = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=4, eos_token_id=2, initializer_range=0.1)
    base.update(extra)
    return base


def tiny_config(arch: str):
    """A 2-layer random config of ``arch`` exercising its specific features (tied embeddings, biases, q/k norms,
    sliding windows, soft-capping, per-layer-type RoPE)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_common(tie_word_embeddings=True))
    if arch == "mistral":
        return tf.MistralConfig(**_common(sliding_window=8, tie_word_embeddings=False))
    if arch == "qwen2":
        return tf.Qwen2Config(**_common(tie_word_embeddings=False))
    if arch == "qwen3":
        return tf.Qwen3Config(**_common(head_dim=16, tie_word_embeddings=True))
    if arch == "gemma":
        return tf.GemmaConfig(**_common(head_dim=16, hidden_act="gelu_pytorch_tanh"))
    if arch == "gemma2":
        return tf.Gemma2Config(**_common(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0))
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_common(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                             final_logit_softcapping=None, num_hidden_layers=2,
                                             layer_types=["sliding_attention", "full_attention"]))
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


def save_tiny(directory: Path, arch: str, dtype=torch.bfloat16, seed: int = 0) -> Path:
    """A random ``arch`` checkpoint (safetensors in ``dtype``) plus the char tokenizer in ``directory``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return Path(directory)
