"""Tiny random models of every exported architecture, with a real tokenizer of the kind each family uses:
byte-level BPE with the Llama 3 / Qwen 2 pre-tokenizers (``tokenizers`` trained in-process) and SentencePiece
models (``sentencepiece`` trained in-process) behind LlamaTokenizer / GemmaTokenizer. Sizes keep every matrix
width a multiple of 256 (K-quants apply) except where a test wants the fallbacks."""
from __future__ import annotations

import functools
import io
import os
import tempfile

import torch

from tests.train.tiny_tokenizers import _LLAMA3_SPLIT, _corpus

_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
                  "else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Numbers like 7, 42 and 2024 appear too. Hello, how are you "
        "today? I am fine, thank you. What would you like to know about the sea and its 3 facts?")


@functools.lru_cache(maxsize=None)
def bytelevel_tokenizer(split: str):
    """Byte-level BPE, pre-tokenizer "llama3" or "qwen2", with ChatML special tokens; adds no BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    regex = _LLAMA3_SPLIT if split == "llama3" else _QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus() + [TEXT] * 3, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = CHATML
    return out


@functools.lru_cache(maxsize=None)
def sentencepiece_tokenizer(family: str):
    """A SentencePiece BPE model (byte fallback; identity normalization, no whitespace folding, like the real
    Llama 2 / Mistral / Gemma models) behind LlamaTokenizer ("llama") or GemmaTokenizer ("gemma")."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    model = io.BytesIO()
    user = ["<start_of_turn>", "<end_of_turn>"] if family == "gemma" else ["[INST]", "[/INST]"]
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3) if family == "llama" else dict(pad_id=0, eos_id=1, bos_id=2,
                                                                                          unk_id=3)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus() + [TEXT] * 3), model_writer=model,
                                   vocab_size=600, model_type="bpe", byte_fallback=True, user_defined_symbols=user,
                                   add_dummy_prefix=family == "llama", remove_extra_whitespaces=False,
                                   normalization_rule_name="identity",
                                   minloglevel=2, **ids,
                                   **({"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>"}
                                      if family == "gemma" else {}))
    folder = tempfile.mkdtemp(prefix=f"spm-{family}-")
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    cls = GemmaTokenizer if family == "gemma" else LlamaTokenizer
    tok = cls.from_pretrained(folder)
    tok.chat_template = GEMMA_TEMPLATE if family == "gemma" else None
    return tok


def tokenizer_for(arch: str):
    if arch == "llama":
        return bytelevel_tokenizer("llama3")
    if arch in ("qwen2", "qwen3"):
        return bytelevel_tokenizer("qwen2")
    return sentencepiece_tokenizer("gemma" if arch.startswith("gemma") else "llama")


def tiny_model(arch: str, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init float32 causal LM of ``arch`` (eval mode, eager attention)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  rms_norm_eps=1e-6)
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=None)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(tie_word_embeddings=False)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(hidden_activation="gelu_pytorch_tanh")),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(query_pre_attn_scalar=64, sliding_window=16,
                                                               attn_logit_softcapping=50.0,
                                                               final_logit_softcapping=30.0)),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                   dict(query_pre_attn_scalar=64, sliding_window=16, num_hidden_layers=3,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    }
    config_cls, model_cls, extra = configs[arch]
    config = config_cls(**{**common, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms away from their init value 0 (Gemma) / 1, so a missing +1 or a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def train_steps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 40,
                lr: float = 3e-3) -> float:
    """``steps`` AdamW steps of next-token loss on ids [1, T] (labels default: ids) over the trainable parameters;
    leaves the model in eval mode and returns the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids if labels is None else labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def fit_to_text(model: torch.nn.Module, tok, text: str = TEXT, steps: int = 40) -> float:
    """A few steps on ``text``, so the model's next-token predictions have the margins a trained model's have
    (a random init's top-1 is decided by hairs, which any quantization flips). Returns the last loss."""
    return train_steps(model, torch.tensor([tok(text).input_ids]), steps=steps)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
