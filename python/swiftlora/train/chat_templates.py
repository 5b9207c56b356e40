"""Chat templates and conversation data helpers with Unsloth's API: ``get_chat_template`` and
``standardize_sharegpt``. (``train_on_responses_only`` is in response_masking.py, the loaders in data.py.)

The templates themselves are in chat_template_table.py; how a template's text is read back (for masking and for
the Ollama Modelfile) is in template_layout.py.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping

from .. import _compat
from ..models.tokenizer import choose_pad_token
from .chat_template_table import CHAT_TEMPLATES, ChatTemplate, _jinja_str

DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant", "system": "system"}
# Tokens tried, in order, as the pad token when the tokenizer has none or pads with EOS.


def get_chat_template(tokenizer, chat_template="chatml", mapping: Mapping[str, str] | None = None,
                      map_eos_token: bool = True, system_message: str | None = None):
    """A copy of ``tokenizer`` whose ``chat_template`` is one of swiftlora's templates, with EOS and pad set for it.

    Args:
        tokenizer: a Hugging Face tokenizer (fast, i.e. Rust-backed, when EOS must be renamed; see below).
        chat_template: a name — ``chatml``, ``qwen-2.5``, ``llama-3``, ``llama-3.1``, ``mistral``, ``gemma``
            (aliases ``gemma-2``, ``gemma-3``), ``phi-3``, ``zephyr``, ``alpaca``, ``vicuna`` and the aliases in
            ``CHAT_TEMPLATES`` — or a ``(jinja_text, stop_word)`` pair for a template of your own (``stop_word``
            None: turns end with the tokenizer's ``eos_token``).
        mapping: the keys and role names your messages use, e.g. ShareGPT's ``{"role": "from", "content":
            "value", "user": "human", "assistant": "gpt"}``. The template then reads those messages directly (and
            still reads standard ``role``/``content`` ones, so the saved template works in llama.cpp and Ollama).
        map_eos_token: make the template's end-of-turn word (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
            ``<|end|>``) the tokenizer's EOS, so generation stops after one answer. If the word is a token of the
            vocabulary, ``eos_token`` is set to it; otherwise the current EOS token is *renamed* to it (same id, so
            the model's embedding is reused and the vocabulary does not grow — Unsloth's behaviour).
        system_message: the default system text, used when a conversation has no system message (replaces the
            template's own default, e.g. qwen-2.5's).

    Returns the new tokenizer; ``tokenizer`` itself is not modified. The pad token is moved off EOS when the
    vocabulary has a safe alternative (a pad, ``<|endoftext|>`` or unk token the template does not use), so
    collators that mask pad positions never mask the EOS the model must learn.
    """
    template = _resolve(chat_template)
    if system_message is not None and template.name == "custom":
        raise ValueError("system_message applies to swiftlora's named templates; write the default system text "
                         "into your own template instead")
    default_system = template.default_system if system_message is None else system_message
    text = _header(default_system, _check_mapping(mapping)) + template.body
    if "eos_token" in template.body and getattr(tokenizer, "eos_token", None) is None:
        raise ValueError(f"chat template {template.name!r} ends turns with the tokenizer's eos_token, "
                         "but this tokenizer has none")
    tokenizer = _set_stop_word(tokenizer, template.stop_word, map_eos_token)
    tokenizer.chat_template = text
    _fix_pad_token(tokenizer, text)
    return tokenizer


def _resolve(chat_template) -> ChatTemplate:
    if isinstance(chat_template, tuple):
        if len(chat_template) != 2 or not isinstance(chat_template[0], str):
            raise ValueError("chat_template as a tuple must be (jinja_text, stop_word)")
        return ChatTemplate("custom", chat_template[0], chat_template[1])
    if not isinstance(chat_template, str) or chat_template.lower() not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat_template {chat_template!r}; expected one of {sorted(CHAT_TEMPLATES)} "
                         "or a (jinja_text, stop_word) tuple")
    return CHAT_TEMPLATES[chat_template.lower()]


def _check_mapping(mapping: Mapping[str, str] | None) -> dict[str, str]:
    if mapping is None:
        return dict(DEFAULT_MAPPING)
    unknown = sorted(set(mapping) - set(DEFAULT_MAPPING))
    if unknown:
        raise ValueError(f"mapping has unknown keys {unknown}; expected some of {sorted(DEFAULT_MAPPING)}")
    return {**DEFAULT_MAPPING, **mapping}


def _header(default_system: str, mapping: dict[str, str]) -> str:
    """Jinja lines run before a template body: the default system text and, for a non-standard mapping, a
    rewrite of ``messages`` into standard role/content messages."""
    lines = ["{%- set default_system = " + _jinja_str(default_system) + " %}"]
    if mapping != DEFAULT_MAPPING:
        roles = ", ".join(f"{_jinja_str(mapping[r])}: {_jinja_str(r)}" for r in ("user", "assistant", "system"))
        role_key, content_key = _jinja_str(mapping["role"]), _jinja_str(mapping["content"])
        lines += [
            "{%- set mapped = namespace(messages=[]) %}",
            "{%- for m in messages %}",
            f"{{%- set role = m[{role_key}] if m[{role_key}] is defined else m['role'] %}}",
            f"{{%- set content = m[{content_key}] if m[{content_key}] is defined else m['content'] %}}",
            f"{{%- set mapped.messages = mapped.messages + [{{'role': {{{roles}}}.get(role, role), "
            "'content': content}] %}",
            "{%- endfor %}",
            "{%- set messages = mapped.messages %}",
        ]
    return "\n".join(lines) + "\n"


def _set_stop_word(tokenizer, stop_word: str | None, map_eos_token: bool):
    """A copy of the tokenizer whose EOS is ``stop_word`` when ``map_eos_token`` (see get_chat_template)."""
    vocab = tokenizer.get_vocab()
    if stop_word is None or stop_word in vocab or not map_eos_token:
        tokenizer = copy.deepcopy(tokenizer)
    if stop_word is None:
        return tokenizer
    if stop_word in vocab:
        if tokenizer.encode(stop_word, add_special_tokens=False) != [vocab[stop_word]]:
            # In the vocabulary but split by the pre-tokenizer: make it atomic (same id, no new row).
            tokenizer.add_tokens([stop_word], special_tokens=True)
        if map_eos_token:
            tokenizer.eos_token = stop_word
        return tokenizer
    if not map_eos_token:
        warnings.warn(f"{stop_word!r} ends the template's turns but is not a token of this tokenizer, and "
                      "map_eos_token=False: it is trained as plain text and generation will not stop at it unless "
                      "you pass it as a stop string", stacklevel=3)
        return tokenizer
    if tokenizer.eos_token_id is None:
        raise ValueError(f"map_eos_token=True renames the EOS token to {stop_word!r}, but the tokenizer has no EOS")
    old = tokenizer.eos_token
    tokenizer = _compat.rename_token(tokenizer, tokenizer.eos_token_id, stop_word)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        if getattr(tokenizer, attr, None) == old:
            setattr(tokenizer, attr, stop_word)
    return tokenizer


def _fix_pad_token(tokenizer, template_text: str) -> None:
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != eos_id:
        return
    candidate = choose_pad_token(tokenizer, avoid_text=template_text)
    if candidate is not None:
        tokenizer.pad_token = candidate
        return
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # nothing else is safe; labels are padded with -100 anyway


USER_ALIASES = ("user", "human", "input")
ASSISTANT_ALIASES = ("gpt", "assistant", "output")
SYSTEM_ALIASES = ("system",)


def standardize_sharegpt(dataset, aliases_for_system=SYSTEM_ALIASES, aliases_for_user=USER_ALIASES,
                         aliases_for_assistant=ASSISTANT_ALIASES, column: str | None = None):
    """ShareGPT-style conversations (``{"from": "human", "value": ...}`` turns) as standard ``{"role": "user",
    "content": ...}`` messages, in the same column.

    ``dataset``: a ``datasets.Dataset`` or a list of rows (dicts). ``column``: the conversation column; by default
    the first of ``conversations``, ``messages``, ``conversation`` present. Turn keys ``from``/``value`` and
    ``role``/``content`` are both read; role names go through the alias lists. Returns the same kind of object.
    Unknown roles and malformed turns raise ValueError naming the row and turn.
    """
    roles = {}
    for canonical, aliases in (("system", aliases_for_system), ("user", aliases_for_user),
                               ("assistant", aliases_for_assistant)):
        roles.update({alias: canonical for alias in aliases})
    rows = dataset if isinstance(dataset, list) else None
    names = list(rows[0]) if rows else list(getattr(dataset, "column_names", None) or [])
    column = column or next((c for c in ("conversations", "messages", "conversation") if c in names), None)
    if column is None or column not in names:
        raise ValueError(f"no conversation column in the dataset (columns {names}); pass column=")

    def convert(turns, row_index):
        if not isinstance(turns, list):
            raise ValueError(f"row {row_index}: {column!r} must be a list of turns, got {type(turns).__name__}")
        return [standard_message(turn, roles, row_index, k) for k, turn in enumerate(turns)]

    if rows is not None:
        return [{**row, column: convert(row[column], i)} for i, row in enumerate(rows)]
    return dataset.map(lambda row, i: {column: convert(row[column], i)}, with_indices=True)


def standard_message(turn, roles: dict[str, str], row: int, k: int) -> dict:
    """One turn (``from``/``value`` or ``role``/``content`` keys) as ``{"role", "content"}`` with its role mapped
    through ``roles`` (alias -> system/user/assistant); ``row``/``k`` only name the turn in errors. Content that is
    neither text nor a list of parts (multimodal) becomes text."""
    if not isinstance(turn, Mapping):
        raise ValueError(f"row {row}, turn {k}: expected a dict, got {type(turn).__name__}")
    role = next((turn[key] for key in ("from", "role") if turn.get(key) is not None), None)
    content = next((turn[key] for key in ("value", "content", "text") if turn.get(key) is not None), None)
    if role is None or content is None:
        raise ValueError(f"row {row}, turn {k}: expected from/value or role/content keys, got {sorted(turn)}")
    if role not in roles:
        raise ValueError(f"row {row}, turn {k}: unknown role {role!r}; known roles and aliases: {sorted(roles)}")
    return {"role": roles[role], "content": content if isinstance(content, (str, list)) else str(content)}
