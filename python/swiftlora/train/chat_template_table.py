"""The chat templates swiftlora ships: each one's Jinja text, end-of-turn word and response-masking markers.

Every template is one of two shapes, written out by ``_turn_body`` / ``_fold_body``:

- *turn*: each message is ``prefix + content + suffix`` for its role; a system message is a turn of its own
  (chatml, qwen-2.5, llama-3, llama-3.1, phi-3, zephyr, alpaca, vicuna);
- *fold*: there is no system turn; the system text goes at the start of the first user message, followed by a
  separator (mistral, gemma).

The bodies read ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``default_system``
(the system text used when the conversation has none; :func:`swiftlora.train.chat_templates.get_chat_template`
sets it in a header line). Roles are ``system``/``user``/``assistant``; other roles are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

EOS = object()  # a piece of turn text that is the tokenizer's eos_token (mistral, zephyr, alpaca, vicuna)


@dataclass(frozen=True)
class ChatTemplate:
    """One shipped template.

    ``body``: Jinja text (without the ``default_system`` header). ``stop_word``: the text that ends an assistant
    turn and that ``map_eos_token`` makes the tokenizer's EOS; None when the template ends turns with the
    tokenizer's own ``eos_token``. ``default_system``: system text used when a conversation has no system message
    ("" = none). (The markers of ``train_on_responses_only`` are read from the rendered template, see
    template_layout.py.)
    """

    name: str
    body: str
    stop_word: str | None
    default_system: str = ""


def _jinja_str(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal (Jinja decodes Python-style escapes)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"


class _Raw(str):
    """A piece of turn text that is Jinja code (a variable), not a literal."""


def _flatten(pieces):
    for piece in pieces:
        if isinstance(piece, tuple):
            yield from _flatten(piece)
        else:
            yield piece


def _expr(*pieces) -> str:
    """A Jinja expression concatenating literal strings, ``EOS`` (the tokenizer's eos_token), ``_Raw`` code and
    tuples of those; empty literals are left out."""
    parts = []
    for piece in _flatten(pieces):
        if piece is EOS:
            parts.append("eos_token")
        elif isinstance(piece, _Raw):
            parts.append(str(piece))
        elif piece:
            parts.append(_jinja_str(piece))
    return " + ".join(parts) if parts else "''"


def _join(*lines: str) -> str:
    # One tag per line; every tag trims the whitespace before it, so only the literals reach the output.
    return "\n".join(line for line in lines if line)


# The system message is messages[0] when its role is system; otherwise the template's default_system.
_SYSTEM_PRELUDE = _join(
    "{%- if messages and messages[0]['role'] == 'system' %}",
    "{%- set system = messages[0]['content'] %}",
    "{%- set loop_messages = messages[1:] %}",
    "{%- else %}",
    "{%- set system = default_system %}",
    "{%- set loop_messages = messages %}",
    "{%- endif %}",
)

_CONTENT = _Raw("message['content']")
_SYSTEM = _Raw("system")


def _turn_body(*, bos: bool, system: tuple, user: tuple, assistant: tuple, generation: str,
               system_always: bool = False) -> str:
    """A turn-shaped template; ``system``/``user``/``assistant`` are (prefix, suffix) pairs, each a str, EOS or a
    tuple of those.
    ``system_always``: render the system turn even when the system text is empty (llama-3.1's date header)."""
    (sp, ss), (up, us), (ap, as_) = system, user, assistant
    system_turn = "{{- " + _expr(sp, _SYSTEM, ss) + " }}"
    return _join(
        _SYSTEM_PRELUDE,
        "{{- bos_token }}" if bos else "",
        system_turn if system_always else "{%- if system %}" + system_turn + "{%- endif %}",
        "{%- for message in loop_messages %}",
        "{%- if message['role'] == 'user' %}{{- " + _expr(up, _CONTENT, us) + " }}",
        "{%- elif message['role'] == 'assistant' %}{{- " + _expr(ap, _CONTENT, as_) + " }}",
        "{%- elif message['role'] == 'system' %}{{- " + _expr(sp, _CONTENT, ss) + " }}",
        "{%- endif %}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}{{- " + _expr(generation) + " }}{%- endif %}",
    )


def _fold_body(*, bos: bool, user: tuple, separator: str, assistant: tuple, generation: str) -> str:
    """A fold-shaped template: the system text opens the first user message, then ``separator``."""
    (up, us), (ap, as_) = user, assistant
    return _join(
        _SYSTEM_PRELUDE,
        "{%- set ns = namespace(system=system) %}",
        "{{- bos_token }}" if bos else "",
        "{%- for message in loop_messages %}",
        "{%- if message['role'] == 'user' %}{{- " + _expr(up) + " }}",
        "{%- if ns.system %}{{- " + _expr(_Raw("ns.system"), separator) + " }}{%- set ns.system = '' %}{%- endif %}",
        "{{- " + _expr(_CONTENT, us) + " }}",
        "{%- elif message['role'] == 'assistant' %}{{- " + _expr(ap, _CONTENT, as_) + " }}",
        "{%- endif %}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}{{- " + _expr(generation) + " }}{%- endif %}",
    )


def _chatml(name: str, default_system: str = "") -> ChatTemplate:
    body = _turn_body(
        bos=False,
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
        generation="<|im_start|>assistant\n",
    )
    return ChatTemplate(name, body, "<|im_end|>", default_system)


def _llama3(name: str, system_lead: str = "") -> ChatTemplate:
    header = "<|start_header_id|>{}<|end_header_id|>\n\n".format
    body = _turn_body(
        bos=True,
        system=(header("system") + system_lead, "<|eot_id|>"),
        user=(header("user"), "<|eot_id|>"),
        assistant=(header("assistant"), "<|eot_id|>"),
        generation=header("assistant"),
        system_always=bool(system_lead),
    )
    return ChatTemplate(name, body, "<|eot_id|>")


_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Llama 3.1's own template opens every conversation with this system header (its default date).
_LLAMA31_LEAD = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")

_TEMPLATES = [
    _chatml("chatml"),
    _chatml("qwen-2.5", _QWEN_SYSTEM),
    _llama3("llama-3"),
    _llama3("llama-3.1", _LLAMA31_LEAD),
    ChatTemplate("mistral", _fold_body(
        bos=True, user=("[INST] ", " [/INST]"), separator="\n\n", assistant=("", EOS), generation="",
    ), None),
    ChatTemplate("gemma", _fold_body(
        bos=True, user=("<start_of_turn>user\n", "<end_of_turn>\n"), separator="\n\n",
        assistant=("<start_of_turn>model\n", "<end_of_turn>\n"), generation="<start_of_turn>model\n",
    ), "<end_of_turn>"),
    ChatTemplate("phi-3", _turn_body(
        bos=False, system=("<|system|>\n", "<|end|>\n"), user=("<|user|>\n", "<|end|>\n"),
        assistant=("<|assistant|>\n", "<|end|>\n"), generation="<|assistant|>\n",
    ), "<|end|>"),
    ChatTemplate("zephyr", _turn_body(
        bos=True, system=("<|system|>\n", (EOS, "\n")), user=("<|user|>\n", (EOS, "\n")),
        assistant=("<|assistant|>\n", (EOS, "\n")), generation="<|assistant|>\n",
    ), None),
    ChatTemplate("alpaca", _turn_body(
        bos=True, system=("", "\n\n"), user=("### Instruction:\n", "\n\n"),
        assistant=("### Response:\n", (EOS, "\n\n")), generation="### Response:\n",
    ), None, _ALPACA_SYSTEM),
    ChatTemplate("vicuna", _turn_body(
        bos=True, system=("", " "), user=("USER: ", " "), assistant=("ASSISTANT: ", EOS), generation="ASSISTANT:",
    ), None, _VICUNA_SYSTEM),
]

# Names accepted by get_chat_template: each template's own name plus these aliases.
_ALIASES = {
    "llama3": "llama-3", "llama-31": "llama-3.1", "llama3.1": "llama-3.1", "llama-3.2": "llama-3.1",
    "llama-3.3": "llama-3.1", "qwen2.5": "qwen-2.5", "qwen-25": "qwen-2.5", "qwen25": "qwen-2.5",
    "gemma2": "gemma", "gemma-2": "gemma", "gemma3": "gemma", "gemma-3": "gemma",
    "phi-35": "phi-3", "phi-3.5": "phi-3", "phi3": "phi-3",
}
CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _TEMPLATES}
CHAT_TEMPLATES.update({alias: CHAT_TEMPLATES[target] for alias, target in _ALIASES.items()})
