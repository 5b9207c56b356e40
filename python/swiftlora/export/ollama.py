"""An Ollama ``Modelfile`` written beside a GGUF file, derived from the model's actual chat template.

The Jinja chat template is read into a layout (swiftlora.train.template_layout: the text around each role's
messages, the system-message handling, a default system text) and re-written as an Ollama Go template over
``.Messages``, so ``ollama run`` formats conversations as the model was trained. Literal text is written as Go
string constants (``{{ "<|im_start|>user\\n" }}``) so that the ``{{-`` trim markers used for readability never eat
template whitespace. BOS is never written (llama.cpp adds it from the GGUF's ``add_bos_token``). A default system
text becomes a ``SYSTEM`` line (and is also rendered when a conversation has no system message).

``PARAMETER stop`` lines come from the template's family (llama-3, chatml, qwen-2.5, gemma, phi-3, zephyr, mistral,
alpaca, vicuna), plus the EOS token. Templates of no known family:
- if their layout can be read (and reproduces the Jinja renderings), the derived TEMPLATE is written with stop
  words taken from the layout (end of an assistant turn, start of a user turn) and a warning says so;
- otherwise no TEMPLATE is written — Ollama then uses the chat template embedded in the GGUF
  (``tokenizer.chat_template``) or its own autodetection — with a warning. A wrong TEMPLATE is never written.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from ..train.template_layout import TemplateLayout, TemplateProbeError, probe_chat_template

# (family, texts that identify it in the layout, its stop words), most specific first.
_FAMILIES = (
    ("llama-3", ("<|start_header_id|>", "<|eot_id|>"), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("qwen-2.5", ("<|im_start|>", "<|im_end|>", "Qwen"), ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>"), ("<|im_start|>", "<|im_end|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>"), ("<start_of_turn>", "<end_of_turn>")),
    ("phi-3", ("<|user|>", "<|end|>"), ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>")),
    ("zephyr", ("<|user|>", "<|assistant|>"), ("<|user|>", "<|assistant|>", "<|system|>")),
    ("mistral", ("[INST]", "[/INST]"), ("[INST]", "[/INST]")),
    ("alpaca", ("### Instruction:", "### Response:"), ("### Instruction:", "### Response:")),
    ("vicuna", ("USER:", "ASSISTANT:"), ("USER:", "ASSISTANT:")),
)


def template_family(layout: TemplateLayout) -> str | None:
    """The known family a layout belongs to (see ``_FAMILIES``), or None."""
    text = "\0".join((layout.user_prefix, layout.user_suffix, layout.assistant_prefix, layout.assistant_suffix,
                      layout.system_prefix, layout.system_suffix, layout.default_system or ""))
    return next((name for name, needles, _ in _FAMILIES if all(n in text for n in needles)), None)


def _stop_words(layout: TemplateLayout, family: str | None, eos_token: str | None) -> list[str]:
    if family is not None:
        words = list(next(stops for name, _, stops in _FAMILIES if name == family))
    else:
        words = [layout.assistant_suffix.strip(), layout.user_prefix.strip()]
    words.append(eos_token or "")
    # A word Ollama's parser cannot read back (non-printable characters, triple quotes) is left out.
    return [w for w in dict.fromkeys(words) if w and _printable(w) and '"""' not in w]


def _printable(text: str) -> bool:
    return all(ch.isprintable() or ch in "\n\t\r" for ch in text)


def _go_str(text: str) -> str:
    """``text`` as a Go string constant. Non-printable characters are escaped: Ollama's Modelfile parser drops
    them from raw text."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _lit(text: str) -> str:
    return "{{ " + _go_str(text) + " }}" if text else ""


def go_template(layout: TemplateLayout) -> str:
    """The Ollama (Go text/template) TEMPLATE rendering ``.Messages`` as the layout does, ending with the
    generation prompt. Only builtins ``eq``, ``not``, ``and`` and variables are used."""
    lo = layout
    lines = []
    turns = [("user", lo.user_prefix, lo.user_suffix), ("assistant", lo.assistant_prefix, lo.assistant_suffix)]
    if lo.system_mode == "turn":
        turns.insert(0, ("system", lo.system_prefix, lo.system_suffix))
        if lo.default_system is not None:
            lines += ["{{- $hasSystem := false }}",
                      '{{- range .Messages }}{{- if eq .Role "system" }}{{- $hasSystem = true }}{{- end }}{{- end }}',
                      "{{- if not $hasSystem }}" + _lit(lo.system_prefix + lo.default_system + lo.system_suffix)
                      + "{{- end }}"]
    elif lo.system_mode == "fold":
        lines += ["{{- $system := " + _go_str(lo.default_system or "") + " }}",
                  "{{- $seen := false }}",
                  '{{- range .Messages }}{{- if and (eq .Role "system") (not $seen) }}{{- $system = .Content }}'
                  "{{- $seen = true }}{{- end }}{{- end }}",
                  "{{- $first := true }}"]
    elif lo.preamble:
        lines.append(_lit(lo.preamble))
    lines.append("{{- range .Messages }}")
    for k, (role, prefix, suffix) in enumerate(turns):
        middle = "{{ .Content }}"
        if role == "user" and lo.system_mode == "fold":
            middle = ("{{- if and $first $system }}{{ $system }}" + _lit(lo.fold_separator) + "{{- end }}"
                      "{{- $first = false }}" + middle)
        lines.append(("{{- if" if k == 0 else "{{- else if") + f' eq .Role "{role}" }}}}' + _lit(prefix) + middle
                     + _lit(suffix))
    lines += ["{{- end }}", "{{- end }}" + _lit(lo.generation_prompt)]
    return "\n".join(lines)


def _modelfile_value(value: str, what: str) -> str:
    """A Modelfile argument: quoted, triple-quoted when it has newlines or outer spaces (the parser has no
    escapes)."""
    if not _printable(value):
        raise ValueError(f"{what} {value!r} has non-printable characters, which Ollama's Modelfile parser drops")
    if '"""' in value:
        raise ValueError(f'{what} {value!r} contains """, which a Modelfile cannot hold')
    if "\n" in value or value != value.strip() or value.startswith('"') or value.endswith('"'):
        return f'"""{value}"""'
    return f'"{value}"'


def modelfile_text(gguf_filename: str, chat_template: str | None, *, bos_token: str | None = None,
                   eos_token: str | None = None, system_message: str | None = None,
                   parameters: Mapping[str, object] | None = None, stop: list[str] | None = None) -> str:
    """The Modelfile's text (see the module docstring). ``system_message`` overrides the template's default
    system text; ``parameters`` adds ``PARAMETER name value`` lines (e.g. ``{"temperature": 0.7}``); ``stop``
    replaces the derived stop words."""
    if chat_template and "eos_token" in chat_template and not eos_token:
        raise ValueError("the chat template writes eos_token; pass eos_token= (or a tokenizer)")
    layout, family, note = None, None, ""
    if chat_template:
        try:
            layout = probe_chat_template(chat_template, bos_token=bos_token, eos_token=eos_token)
        except TemplateProbeError as e:
            note = str(e)
    else:
        note = "the model has no chat template"
    lines = [f"# Ollama Modelfile for {gguf_filename}, written by swiftlora from the model's chat template",
             "# Use: ollama create <name> -f Modelfile", f"FROM ./{gguf_filename}"]
    if layout is None:
        warnings.warn(f"no Ollama TEMPLATE written ({note}); Ollama will use the chat template embedded in the "
                      "GGUF or guess one", stacklevel=3)
        stops = [eos_token] if eos_token else []
    else:
        family = template_family(layout)
        if family is None:
            warnings.warn("the chat template is of no known family; the Ollama TEMPLATE was derived from its "
                          f"layout and the stop words {_stop_words(layout, None, eos_token)} from its turn markers: "
                          "check them", stacklevel=3)
        lines[0] += f" (family: {family or 'unknown, derived from its layout'})."
        lines.append(f"TEMPLATE {_modelfile_value(go_template(layout), 'TEMPLATE')}")
        stops = _stop_words(layout, family, eos_token)
        if system_message is None:
            system_message = layout.default_system or None
        elif layout.system_mode == "ignored":
            warnings.warn("system_message given, but the chat template ignores system messages", stacklevel=3)
    if system_message:
        lines.append(f"SYSTEM {_modelfile_value(system_message, 'SYSTEM')}")
    for word in stops if stop is None else stop:
        lines.append(f"PARAMETER stop {_modelfile_value(word, 'stop word')}")
    for name, value in (parameters or {}).items():
        lines.append(f"PARAMETER {name} {_modelfile_value(str(value), f'parameter {name}')}")
    return "\n".join(lines) + "\n"


def write_modelfile(directory, gguf_filename: str, tokenizer_or_chat_template, *, bos_token: str | None = None,
                    eos_token: str | None = None, system_message: str | None = None,
                    parameters: Mapping[str, object] | None = None, stop: list[str] | None = None,
                    filename: str = "Modelfile") -> Path:
    """Writes ``directory/Modelfile`` for ``directory/gguf_filename`` and returns its path.

    ``tokenizer_or_chat_template``: a tokenizer (its ``chat_template``, ``bos_token``, ``eos_token`` are used) or
    the Jinja chat template text (then pass ``eos_token`` if it uses one). Written to a temporary file and renamed,
    so a failure never leaves a half-written Modelfile. Other arguments: see :func:`modelfile_text`.
    """
    directory = Path(directory)
    if not gguf_filename or Path(gguf_filename).name != gguf_filename or gguf_filename != gguf_filename.strip():
        raise ValueError(f"gguf_filename must be a file name inside directory, got {gguf_filename!r}")
    if not (directory / gguf_filename).is_file():
        raise FileNotFoundError(f"no GGUF file {gguf_filename!r} in {str(directory)!r}")
    if isinstance(tokenizer_or_chat_template, str) or tokenizer_or_chat_template is None:
        template = tokenizer_or_chat_template
    else:
        tok = tokenizer_or_chat_template
        template = getattr(tok, "chat_template", None)
        bos_token = bos_token if bos_token is not None else getattr(tok, "bos_token", None)
        eos_token = eos_token if eos_token is not None else getattr(tok, "eos_token", None)
    if isinstance(template, dict):  # tokenizers with several named templates
        template = template.get("default") or next(iter(template.values()), None)
    text = modelfile_text(gguf_filename, template, bos_token=bos_token, eos_token=eos_token,
                          system_message=system_message, parameters=parameters, stop=stop)
    path = directory / filename
    tmp = directory / f".{filename}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
