"""Training on the assistant's answers only: every label outside a response becomes -100, found by token ids.

A marker (the text opening an assistant turn, ``response_part``, or a user turn, ``instruction_part``) does not
always tokenize the same way inside a conversation as alone: its last token can merge with the text that follows
(``"\\n"`` + ``"\\nHi"`` -> ``"\\n\\n"``; a BPE that learned ``"[/INST]I"``), and its first token with the text
before (``" USER"`` after a space, ``"USER"`` after ``</s>``). So a marker is matched by its *variants*: for each
text that can precede it, the token ids it keeps whatever follows (the common prefix of its tokenizations before
many different continuations). The preceding texts are read from the tokenizer's chat template (the marker's
occurrences in rendered conversations) plus a few generic ones. After a match, the marker text the variant stops
short of (usually a newline) is skipped when its tokens follow unmerged; a vocabulary token that extends the
variant's last token with following text also matches, and is kept (it carries response text).

A response runs from after a response marker to the start of the next instruction marker (so the end-of-turn
token, e.g. ``<|im_end|>``, is trained) or of the next response marker, or to the end of the sequence.
"""
from __future__ import annotations

import bisect
import warnings

from .. import _compat

IGNORE_INDEX = -100
# Continuations placed after a marker, and generic texts placed before it (see the module docstring).
_AFTER = ("", "Hello", " Hello", "\nHello", "\n\nHello", "7", " 7", "'", "\u201c", "\u65e5\u672c", "\n", " ")
_BEFORE = ("", "\n", "\n\n", " ")


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return first[:k]


class Marker:
    """A chat marker as token ids: ``variants`` (longest first); per variant, the marker text it stops short of
    (``tails``) and the vocabulary tokens that are its last token merged with following text (``merged``)."""

    def __init__(self, tokenizer, text: str, role: str, befores: tuple[str, ...] = ()):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{role} must be a non-empty string, got {text!r}")
        self.text, self.tokenizer = text, tokenizer
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        specials = tuple(t for t in (tokenizer.eos_token, tokenizer.bos_token) if isinstance(t, str))
        variants = set()
        for before in dict.fromkeys(_BEFORE + specials + tuple(befores)):
            head = encode(before)
            rests = []
            for after in _AFTER:
                full = encode(before + text + after)
                start = len(_common_prefix([head, full]))
                while start < len(full) and before.startswith(tokenizer.decode(full[:start + 1])):
                    start += 1  # a token made of the preceding text only (it split differently next to the marker)
                rests.append(full[start:])
            variant = self._stable_prefix(rests)
            if variant:
                variants.add(variant)
        if not variants:
            raise ValueError(f"{role} {text!r} has no tokens that keep their ids next to other text; choose a "
                             "marker made of whole tokens (e.g. the special tokens of the chat template)")
        self.variants = sorted(variants, key=len, reverse=True)
        self.tails = {v: self._tail(v) for v in self.variants}
        self.merged = self._merged_last_tokens()

    def _stable_prefix(self, rests: list[list[int]]) -> tuple:
        """The tokens a marker keeps whatever follows it: the common prefix of its tokenizations (``rests[0]``
        is the one with nothing after it), plus the next token when the others only extend it (a merge of its
        last token with the following text, which ``find`` accepts too)."""
        base, k = rests[0], len(_common_prefix(rests))
        if k < len(base):
            piece = self.tokenizer.convert_ids_to_tokens(base[k])
            if all(len(r) > k and self.tokenizer.convert_ids_to_tokens(r[k]).startswith(piece) for r in rests):
                k += 1
        return tuple(base[:k])

    def _tail(self, variant: tuple) -> str:
        # The variant covers a prefix of the marker text; its decoding may carry preceding text (" USER") or lose
        # the marker's leading space (SentencePiece decoders strip it).
        decoded = self.tokenizer.decode(list(variant))
        covered = next((j for j in range(len(self.text), 0, -1)
                        if decoded.endswith(self.text[:j]) or (decoded and self.text[:j].endswith(decoded))), 0)
        return self.text[covered:]

    def _merged_last_tokens(self) -> dict[tuple, set[int]]:
        """Per variant, the ids of vocabulary tokens that extend its last token with text compatible with the
        marker's tail (BPE can learn e.g. "[/INST]" + "I" as one token)."""
        vocab = self.tokenizer.get_vocab()
        special = set(self.tokenizer.all_special_ids)
        merged = {}
        for v in self.variants:
            piece = self.tokenizer.convert_ids_to_tokens(v[-1])
            decoded_piece, tail = self.tokenizer.decode([v[-1]]), self.tails[v]
            ids = set()
            for token, i in vocab.items():
                if i != v[-1] and i not in special and token.startswith(piece):
                    extra = self.tokenizer.decode([i])[len(decoded_piece):]
                    if extra and (extra.startswith(tail) or tail.startswith(extra)):
                        ids.add(i)
            merged[v] = ids
        return merged

    def find(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, text_start) of each non-overlapping occurrence in ``ids``: where the marker begins, and where
        the text after it begins (at the last marker token when that token is merged with the text)."""
        hits, i, n = [], 0, len(ids)
        while i < n:
            for v in self.variants:
                m = len(v)
                if i + m > n or (m > 1 and (ids[i] != v[0] or ids[i:i + m - 1] != list(v[:-1]))):
                    continue
                if ids[i + m - 1] == v[-1]:
                    hits.append((i, self._skip_tail(ids, v, i + m)))
                    i += m
                    break
                if ids[i + m - 1] in self.merged[v]:
                    hits.append((i, i + m - 1))
                    i += m
                    break
            else:
                i += 1
        return hits

    def _skip_tail(self, ids: list[int], variant: tuple, pos: int) -> int:
        """Position after the marker text ``variant`` stops short of, if its tokens follow at ``pos`` unmerged."""
        tail, end = self.tails[variant], pos
        for k in range(pos, min(len(ids), pos + len(tail))):
            piece = self.tokenizer.decode(ids[pos:k + 1])
            if not piece or not tail.startswith(piece):
                break
            end = k + 1
        return end


class ResponseMasker:
    """``masker(input_ids, labels=None) -> labels`` with -100 outside the responses (see the module docstring).
    ``labels``, when given, are kept inside the responses (so earlier masking, e.g. TRL's, still applies).
    ``template``: the chat template whose renderings show the texts that precede each marker."""

    def __init__(self, tokenizer, instruction_part: str, response_part: str, last_response_only: bool = False,
                 template: str | None = None):
        befores = _befores(tokenizer, template, (instruction_part, response_part))
        self.instruction = Marker(tokenizer, instruction_part, "instruction_part", befores[instruction_part])
        self.response = Marker(tokenizer, response_part, "response_part", befores[response_part])
        shared = set(self.instruction.variants) & set(self.response.variants)
        for marker in (self.instruction, self.response):  # ids both markers can take tell neither apart
            marker.variants = [v for v in marker.variants if v not in shared]
            if not marker.variants:
                raise ValueError(f"instruction_part {instruction_part!r} and response_part {response_part!r} "
                                 f"tokenize to the same ids {sorted(shared)}")
        self.last_response_only = last_response_only

    def spans(self, input_ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) token ranges of the responses in ``input_ids``."""
        responses = self.response.find(input_ids)
        # An instruction match inside a response marker ("INST]" in "[/INST]") is not an instruction.
        instructions = [s for s, _ in self.instruction.find(input_ids)
                        if not any(r <= s < t for r, t in responses)]
        spans = []
        for k, (_, start) in enumerate(responses):
            nxt = bisect.bisect_left(instructions, start)
            end = min(instructions[nxt] if nxt < len(instructions) else len(input_ids),
                      responses[k + 1][0] if k + 1 < len(responses) else len(input_ids))
            spans.append((start, end))
        return spans[-1:] if self.last_response_only else spans

    def __call__(self, input_ids: list[int], labels: list[int] | None = None) -> list[int]:
        source = list(input_ids if labels is None else labels)
        out = [IGNORE_INDEX] * len(source)
        for start, end in self.spans(list(input_ids)):
            out[start:end] = source[start:end]
        return out


def _befores(tokenizer, template: str | None, markers: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """For each marker, the texts (up to 32 characters) that precede it in renderings of ``template``."""
    found = {m: set() for m in markers}
    if template:
        from .template_layout import render_chat_template

        turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", " What?"),
                 ("assistant", "\nFine"), ("user", "7"), ("assistant", "ok")]
        for msgs in ([{"role": r, "content": c} for r, c in turns], [{"role": r, "content": c} for r, c in turns[1:]]):
            try:
                text = render_chat_template(template, msgs, add_generation_prompt=False,
                                            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
            except Exception:  # noqa: BLE001 - a template that refuses these turns just gives no contexts
                continue
            for marker in markers:
                at = text.find(marker)
                while at >= 0:
                    found[marker].add(text[max(0, at - 32):at])
                    at = text.find(marker, at + 1)
    return {m: tuple(sorted(b)) for m, b in found.items()}


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            force_match: bool = True, tokenizer=None, return_function: bool = False,
                            num_proc: int | None = None, last_response_only: bool = False):
    """Makes ``trainer`` learn from the assistant's answers only (Unsloth's API).

    Sets the ``labels`` column of ``trainer.train_dataset`` (and ``eval_dataset``), which must already be
    tokenized (``input_ids``; TRL's SFTTrainer does this at init), to -100 outside the responses; see the module
    docstring for how markers are matched. With both parts None, they are read from ``tokenizer.chat_template``
    (the text opening a user turn and an assistant turn). Rows left with no trainable token are dropped with a
    warning; if every row is, ValueError explains which markers were looked for. The collator is wrapped so that
    a batch with no trainable token raises instead of training on nothing.

    ``force_match`` is accepted for Unsloth compatibility; matching is always by token ids. ``return_function``:
    return the batched ``examples -> {"labels": ...}`` function instead of changing the trainer.
    Returns the trainer.
    """
    del force_match
    tokenizer = tokenizer if tokenizer is not None else _compat.trainer_tokenizer(trainer)
    if instruction_part is None or response_part is None:
        from .template_layout import probe_chat_template

        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template to read the markers from; pass instruction_part "
                             "and response_part")
        inferred = probe_chat_template(tokenizer.chat_template, bos_token=tokenizer.bos_token,
                                       eos_token=tokenizer.eos_token).markers()
        instruction_part = inferred[0] if instruction_part is None else instruction_part
        response_part = inferred[1] if response_part is None else response_part
    masker = ResponseMasker(tokenizer, instruction_part, response_part, last_response_only,
                            getattr(tokenizer, "chat_template", None))

    def label_batch(examples):
        labels = examples["labels"] if "labels" in examples else [None] * len(examples["input_ids"])
        return {"labels": [masker(ids, lab) for ids, lab in zip(examples["input_ids"], labels)]}

    if return_function:
        return label_batch
    trainer.train_dataset = _relabel(trainer.train_dataset, label_batch, masker, tokenizer, num_proc, "train")
    evals = getattr(trainer, "eval_dataset", None)
    if isinstance(evals, dict):
        trainer.eval_dataset = {k: _relabel(v, label_batch, masker, tokenizer, num_proc, f"eval[{k}]")
                                for k, v in evals.items()}
    elif evals is not None:
        trainer.eval_dataset = _relabel(evals, label_batch, masker, tokenizer, num_proc, "eval")
    trainer.data_collator = ResponseOnlyCollator(_label_keeping(trainer.data_collator, tokenizer))
    return trainer


def _relabel(dataset, label_batch, masker: ResponseMasker, tokenizer, num_proc, name: str):
    if dataset.column_names is not None and "input_ids" not in dataset.column_names:
        raise ValueError(f"train_on_responses_only needs a tokenized {name} dataset (an input_ids column), got "
                         f"columns {dataset.column_names}; build the trainer (which tokenizes) first")
    sized = hasattr(dataset, "__len__")  # a streaming (iterable) dataset has no length and maps lazily
    kwargs = {"num_proc": num_proc, "desc": f"Masking non-response tokens ({name})"} if sized else {}
    dataset = dataset.map(label_batch, batched=True, **kwargs)
    if not sized:  # rows are checked batch by batch in the collator
        return dataset.filter(lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]))
    total = len(dataset)
    kept = dataset.filter(lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]), num_proc=num_proc)
    if len(kept) == 0 and total:
        sample = tokenizer.decode(dataset[0]["input_ids"][:200])
        raise ValueError(
            f"every label of the {name} dataset would be -100: no response was found between the markers "
            f"instruction_part={masker.instruction.text!r} (ids {masker.instruction.variants}) and "
            f"response_part={masker.response.text!r} (ids {masker.response.variants}). Pass the markers your chat "
            f"template writes; the first example begins: {sample!r}")
    if len(kept) < total:
        warnings.warn(f"{total - len(kept)} of {total} {name} examples have no response tokens left (no response "
                      "marker found, or the response was truncated away) and were dropped", stacklevel=3)
    return kept


def _label_keeping(collator, tokenizer):
    """A collator that pads and keeps the dataset's labels: transformers' language-modeling collator (which
    rebuilds labels from input_ids) and padding collator (which cannot pad labels) are replaced by
    DataCollatorForSeq2Seq; TRL's collators keep labels already."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if isinstance(collator, ResponseOnlyCollator):
        collator = collator.inner
    if collator is None or isinstance(collator, (DataCollatorForLanguageModeling, DataCollatorWithPadding)):
        return DataCollatorForSeq2Seq(tokenizer, padding=True)
    return collator


class ResponseOnlyCollator:
    """Wraps a collator; raises when a batch has no label other than -100 (it would train on nothing: the loss
    of an empty batch is 0/0)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if labels is not None and not (labels != IGNORE_INDEX).any():
            raise RuntimeError("every label in this batch is -100 after train_on_responses_only: no response "
                               "tokens to train on (check the markers and max_seq_length)")
        return batch
