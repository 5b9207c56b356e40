"""Conversation data for fine-tuning: the embedded default data set (chatterbot-corpus, from PyPI), loaders for
JSONL / JSON files, Hugging Face datasets and Python lists in several formats, and ``format_for_sft``.

Every loader returns a ``datasets.Dataset`` with one ``messages`` column of standard ``{"role", "content"}``
messages (roles ``system``/``user``/``assistant``), or one ``text`` column for plain-text data. Formats (one row):

- ``messages``: ``{"messages": [{"role": "user", "content": ...}, ...]}``;
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``;
- ``alpaca``: ``{"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}``;
- ``prompt_completion``: ``{"prompt": str or messages, "completion": str or messages}``;
- ``text``: ``{"text": ...}``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .chat_templates import ASSISTANT_ALIASES, SYSTEM_ALIASES, USER_ALIASES, standard_message

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
_ROLES = {**{a: "system" for a in SYSTEM_ALIASES}, **{a: "user" for a in USER_ALIASES},
          **{a: "assistant" for a in ASSISTANT_ALIASES}}


def default_chat_dataset(max_conversations: int | None = None, *, categories: list[str] | None = None,
                         language: str = "english"):
    """The main job's default data: chatterbot-corpus (PyPI ``chatterbot-corpus``, BSD), 2,025 hand-written
    English conversations in 21 topic files (greetings, ai, science, ...), turns alternating user/assistant.

    A conversation with an odd number of turns loses its last (user) turn, so every one ends with an answer;
    the corpus's one malformed entry (a bare string) is skipped.
    ``categories``: file stems to keep (e.g. ``["greetings", "ai"]``); ``max_conversations``: the first N in file
    order (files sorted by name). Returns a ``datasets.Dataset`` with a ``messages`` column.
    """
    import yaml
    from datasets import Dataset

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default data set needs the chatterbot-corpus package: pip install chatterbot-corpus")
    folder = Path(spec.submodule_search_locations[0]) / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise ValueError(f"chatterbot-corpus has no language {language!r} (looked in {folder})")
    if categories is not None:
        unknown = sorted(set(categories) - {f.stem for f in files})
        if unknown:
            raise ValueError(f"unknown categories {unknown}; available: {sorted(f.stem for f in files)}")
        files = [f for f in files if f.stem in categories]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~5x faster
    rows = []
    for f in files:
        for turns in yaml.load(f.read_text(encoding="utf-8"), Loader=loader)["conversations"]:
            if not isinstance(turns, list):
                continue  # one entry of the corpus (in trivia.yml) is a bare string, not a conversation
            turns = [str(t).strip() for t in turns][: len(turns) // 2 * 2]
            if turns and all(turns):
                rows.append({"messages": [{"role": ("user", "assistant")[k % 2], "content": t}
                                          for k, t in enumerate(turns)]})
    return Dataset.from_list(rows[:max_conversations])


def load_chat_dataset(source=None, format: str = "auto", *, split: str = "train", max_rows: int | None = None):
    """Loads conversation data (see the module docstring for the formats) as a ``datasets.Dataset``.

    ``source``: None (the default data set), a path to a ``.jsonl`` / ``.json`` file, a ``datasets.Dataset`` /
    ``DatasetDict`` (``split`` picks one), a list of row dicts, or a Hugging Face Hub data set name (needs network).
    ``format``: one of ``FORMATS``; ``"auto"`` decides from the first row's keys. ``max_rows``: keep the first N.
    Bad input raises ValueError naming the row and what was expected.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if source is None:
        return default_chat_dataset(max_rows)
    dataset = _as_dataset(source, split)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"the data set {_describe(source)} has no rows")
    fmt = _detect_format(dataset[0], _describe(source)) if format == "auto" else format
    if fmt == "text":
        if "text" not in dataset.column_names:
            raise ValueError(f"format 'text' needs a 'text' column; {_describe(source)} has {dataset.column_names}")
        return dataset.select_columns(["text"])
    convert = _CONVERTERS[fmt]
    return dataset.map(lambda row, i: {"messages": convert(row, i)}, with_indices=True,
                       remove_columns=dataset.column_names)


def _describe(source) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else type(source).__name__


def _as_dataset(source, split: str):
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the DatasetDict (splits {list(source)})")
        return source[split]
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, list):
        if not all(isinstance(row, dict) for row in source):
            raise ValueError("a data set given as a list must hold one dict per row")
        return datasets.Dataset.from_list(source)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"source must be None, a path, a datasets.Dataset or a list of dicts, got {_describe(source)}")
    path = Path(source)
    if path.exists():
        return datasets.Dataset.from_list(_read_json_rows(path))
    if isinstance(source, Path) or Path(source).suffix in (".json", ".jsonl"):
        raise FileNotFoundError(f"data file {str(source)!r} does not exist")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/offline failure becomes one clear message
        raise ValueError(f"{source!r} is not a local file, and loading it from the Hugging Face Hub failed "
                         f"({type(e).__name__}: {e}); without network, pass a .jsonl/.json file") from e


def _read_json_rows(path: Path) -> list[dict]:
    if path.is_dir() or path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"data file {str(path)!r}: expected a .jsonl or .json file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected one JSON object per row (a list of objects in a .json file)")
    return rows


def _detect_format(row: dict, where: str) -> str:
    keys = set(row)
    for fmt, needed in (("messages", {"messages"}), ("sharegpt", {"conversations"}),
                        ("alpaca", {"instruction", "output"}), ("prompt_completion", {"prompt", "completion"}),
                        ("text", {"text"})):
        if needed <= keys:
            return fmt
    raise ValueError(f"cannot tell the format of {where}: its rows have keys {sorted(keys)}; expected 'messages', "
                     "'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), 'prompt'+'completion' or 'text'")


def _turns(turns, row: int, what: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"row {row}: {what} must be a non-empty list of messages, got {turns!r:.80}")
    return [standard_message(t, _ROLES, row, k) for k, t in enumerate(turns)]


def _from_alpaca(row: dict, i: int) -> list[dict]:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise ValueError(f"row {i}: Alpaca rows need string 'instruction' and 'output' fields")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_prompt_completion(row: dict, i: int) -> list[dict]:
    def part(value, role, name):
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        return _turns(value, i, repr(name))

    return part(row.get("prompt"), "user", "prompt") + part(row.get("completion"), "assistant", "completion")


_CONVERTERS = {
    "messages": lambda row, i: _turns(row.get("messages"), i, "'messages'"),
    "sharegpt": lambda row, i: _turns(row.get("conversations"), i, "'conversations'"),
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def format_for_sft(dataset, tokenizer, *, messages_field: str = "messages", text_field: str = "text"):
    """Each conversation as one training text through ``tokenizer.chat_template`` (``apply_chat_template``), in a
    ``text`` column that replaces ``messages_field`` (TRL's SFTTrainer trains on ``text`` when no ``messages``
    column is left).

    Two adjustments keep the tokens equal to what the chat template means: a leading BOS is dropped when the
    tokenizer adds BOS itself (TRL tokenizes the text with special tokens, which would double it), and a text
    ending in EOS plus whitespace ends at the EOS (TRL appends EOS to texts that do not end with it).
    ``dataset``: a ``datasets.Dataset`` or a list of row dicts; returns the same kind.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; call get_chat_template(tokenizer, ...) first")
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    drop_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    def to_text(messages) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if drop_bos and text.startswith(bos):
            text = text[len(bos):]
        if eos and text.rstrip().endswith(eos):
            text = text.rstrip()
        return text

    if isinstance(dataset, list):
        return [{**{k: v for k, v in row.items() if k != messages_field}, text_field: to_text(row[messages_field])}
                for row in dataset]
    if messages_field not in dataset.column_names:
        raise ValueError(f"no {messages_field!r} column (columns {dataset.column_names}); load the data with "
                         "load_chat_dataset or pass messages_field=")
    return dataset.map(lambda row: {text_field: to_text(row[messages_field])}, remove_columns=[messages_field])
