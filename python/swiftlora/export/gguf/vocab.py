"""Tokenizer -> GGUF vocabulary keys (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

Three kinds of Hugging Face tokenizer, told apart by their ``tokenizer.json``:
- byte-level BPE (GPT-2, Llama 3, Qwen 2, SmolLM): ``tokenizer.ggml.model = "gpt2"``, merges, and the pre-tokenizer
  name llama.cpp must use (``tokenizer.ggml.pre``), read from the tokenizer's own pre-tokenizer regexes;
- SentencePiece (Llama 2, Mistral, Gemma): ``"llama"`` with per-token scores and types, taken from the
  SentencePiece model file when the tokenizer still knows it, else from ``tokenizer.json`` (Unigram scores, or BPE
  merge ranks as scores: llama.cpp's SentencePiece tokenizer merges the highest score first, BPE the lowest rank);
- special tokens, add-BOS/EOS and add-space-prefix are measured by encoding text with the tokenizer itself.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import gguf

_T = gguf.TokenType

# Pre-tokenizer regexes of the byte-level BPE families llama.cpp knows (as they appear in tokenizer.json).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class Vocab:
    """What the GGUF needs of a tokenizer, padded to the embedding's row count."""

    model: str                     # "gpt2" | "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        return json.loads(backend.to_str())
    with tempfile.TemporaryDirectory() as tmp:  # slow tokenizers: let transformers convert it
        tokenizer.save_pretrained(tmp)
        path = os.path.join(tmp, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"GGUF export: cannot read the vocabulary of {type(tokenizer).__name__} "
                             "(no tokenizer.json); pass a fast tokenizer")
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def _bytelevel_pre(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or ValueError."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_RE:
            return "llama-bpe"
        if regex == _QWEN2_RE:
            return "qwen2"
    raise ValueError("GGUF export: this byte-level BPE tokenizer's pre-tokenizer matches none llama.cpp knows "
                     f"(GPT-2, SmolLM, Llama 3, Qwen 2); its definition: {json.dumps(pre)[:400]}")


def _merges(tj: dict) -> list[str]:
    out = []
    for m in tj["model"].get("merges", []):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        # llama.cpp splits a merge at its first space; a space inside a piece travels as U+0120 (byte-level space)
        out.append(f"{a.replace(' ', chr(0x120))} {b.replace(' ', chr(0x120))}")
    return out


def _base_tokens(tokenizer: Any, n_rows: int) -> tuple[list[str], list[int]]:
    """id -> token text and GGUF type for ids < n_rows: added tokens CONTROL (special) or USER_DEFINED (with
    their raw text), <0xXX> byte pieces BYTE, holes [PADi] UNUSED."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= n_rows:
        raise ValueError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, but the model's "
                         f"embedding has only {n_rows} rows")
    tokens, types = [f"[PAD{i}]" for i in range(n_rows)], [int(_T.UNUSED)] * n_rows
    for text, i in vocab.items():
        tokens[i] = text
        is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        types[i] = int(_T.BYTE if is_byte else _T.NORMAL)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < n_rows:
            tokens[i] = added.content
            types[i] = int(_T.CONTROL if added.special else _T.USER_DEFINED)
    return tokens, types


def _spm_from_model_file(path: str, tokens: list[str], types: list[int]) -> list[float]:
    """Scores (and the SentencePiece model's own piece types) from a .model file; HF's added tokens keep theirs."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    scores = [-1000.0] * len(tokens)
    for i, piece in enumerate(proto.pieces[: len(tokens)]):
        scores[i] = piece.score
        if types[i] not in (_T.CONTROL, _T.USER_DEFINED) or piece.type in (_T.CONTROL, _T.UNKNOWN):
            types[i] = int(piece.type)  # SentencePiece's enum is GGUF's: normal 1 ... byte 6
    return scores


def _spm_scores_from_json(tj: dict, tokens: list[str]) -> list[float]:
    model = tj["model"]
    index = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    if model["type"] == "Unigram":
        for i, (_, score) in enumerate(model["vocab"][: len(tokens)]):
            scores[i] = float(score)
        return scores
    for rank, m in enumerate(model.get("merges", [])):  # BPE: earlier merge = higher score
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        i = index.get(a + b)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    return scores


def _special_behaviour(tokenizer: Any, vocab: Vocab) -> None:
    """Special ids, and whether encoding adds BOS/EOS, measured on the tokenizer itself."""
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and 0 <= tid < len(vocab.tokens):
            vocab.special_ids[kind] = int(tid)
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    vocab.add_bos = "bos" in vocab.special_ids and len(full) > len(plain) and full[0] == vocab.special_ids["bos"]
    vocab.add_eos = "eos" in vocab.special_ids and len(full) > len(plain) and full[-1] == vocab.special_ids["eos"]


def build_vocab(tokenizer: Any, n_rows: int, force_no_space_prefix: bool = False) -> Vocab:
    """The GGUF vocabulary of ``tokenizer`` for a model whose embedding has ``n_rows`` rows."""
    tj = _tokenizer_json(tokenizer)
    kind = tj["model"]["type"]
    tokens, types = _base_tokens(tokenizer, n_rows)
    byte_level = kind == "BPE" and not tj["model"].get("byte_fallback") \
        and (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        vocab = Vocab("gpt2", tokens, types, merges=_merges(tj), pre=_bytelevel_pre(tj))
    elif kind in ("BPE", "Unigram"):
        sp_file = getattr(tokenizer, "vocab_file", None)
        if isinstance(sp_file, str) and sp_file.endswith(".model") and os.path.isfile(sp_file):
            scores = _spm_from_model_file(sp_file, tokens, types)
        else:
            scores = _spm_scores_from_json(tj, tokens)
        vocab = Vocab("llama", tokens, types, scores=scores)
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
        vocab.add_space_prefix = bool(first) and first[0].startswith("\u2581") and not force_no_space_prefix
    else:
        raise ValueError(f"GGUF export: tokenizer model type {kind!r} is not supported (BPE, Unigram)")
    _special_behaviour(tokenizer, vocab)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    vocab.chat_template = template or None
    return vocab
