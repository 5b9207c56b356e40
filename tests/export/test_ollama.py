"""The Ollama Modelfile: its TEMPLATE, rendered by a Go-template interpreter the way Ollama calls it, must give the
same text as the model's Jinja chat template (without BOS), per template family; stop words, SYSTEM, fallbacks,
quoting, atomic writes."""
from __future__ import annotations

import pytest

from swiftlora.export.ollama import write_modelfile
from swiftlora.train.chat_template_table import _TEMPLATES
from swiftlora.train.chat_templates import get_chat_template
from swiftlora.train.template_layout import render_chat_template
from tests.export.gotemplate import Renderer
from tests.train.tiny_tokenizers import get_tokenizer

TEMPLATE_NAMES = [t.name for t in _TEMPLATES]
CONVERSATIONS = [
    [("user", "Hi")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")],
    [("user", 'Say "{{ .Content }}" \\ ok'), ("assistant", "\n  spaced\ttab\n"),
     ("user", "\u65e5\u672c \u2014 \u00e9")],
    [("system", "Line one\nline two"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"),
     ("user", "e")],
]
STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "qwen-2.5": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "llama-3.1": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]", "</s>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi-3": ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
    "zephyr": ["<|user|>", "<|assistant|>", "<|system|>", "</s>"],
    "alpaca": ["### Instruction:", "### Response:", "</s>"],
    "vicuna": ["USER:", "ASSISTANT:", "</s>"],
}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs, read the way Ollama's parser (parser/parser.go) reads a Modelfile: a command word,
    then a value that ends at a newline once it unquotes ("..." or \"\"\"...\"\"\", no escapes); ``#`` comments;
    non-printable characters outside quotes-in-progress are dropped."""
    def unquote(s):
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands, state, buf, name = [], "nil", [], ""
    for ch in text + "\n":
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif not ch.isspace():
                state, buf = "name", [ch]
        elif state == "comment":
            state = "nil" if ch in "\r\n" else "comment"
        elif state == "name":
            if ch.isalpha():
                buf.append(ch)
            else:
                assert ch in " \t", f"bad command character {ch!r}"
                name, state, buf = "".join(buf).lower(), "value", []
                if name == "parameter":
                    state = "parameter"
        elif state == "parameter":
            if ch in " \t":
                name, state, buf = "".join(buf), "value", []
            else:
                buf.append(ch)
        elif state == "value":
            if ch in "\r\n":
                value, ok = unquote("".join(buf).strip())
                if ok:
                    commands.append((name, value))
                    state, buf = "nil", []
                    continue
            if ch.isprintable() or ch in " \t\r\n":
                buf.append(ch)
    assert state == "nil", f"unterminated value for {name}"
    return commands


def _commands(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in parse_modelfile(path.read_text(encoding="utf-8")):
        out.setdefault(name, []).append(value)
    return out


def _ollama_render(template: str, system: str | None, messages: list[dict]) -> str:
    """What Ollama's chat endpoint renders: the Modelfile's SYSTEM goes first unless the request has a system
    message (server/routes.go), then the Go template over .Messages."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    return Renderer(template).render({"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def _jinja_without_bos(tok, messages) -> str:
    """The chat template's text minus a leading BOS written through ``bos_token`` (found with a sentinel BOS, so a
    BOS text that is also a chat marker, like SmolLM2's <|im_start|>, is not mistaken for it)."""
    text = render_chat_template(tok.chat_template, messages, add_generation_prompt=True, bos_token="\x02BOS\x03",
                                eos_token=tok.eos_token)
    text = text.removeprefix("\x02BOS\x03")
    assert "\x02BOS\x03" not in text
    return text


@pytest.fixture
def gguf(tmp_path):
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    return tmp_path


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace", "smollm2"])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_renders_like_the_chat_template(name, kind, gguf):
    tok = get_chat_template(get_tokenizer(kind), name)
    path = write_modelfile(gguf, "model.Q8_0.gguf", tok)
    assert path == gguf / "Modelfile"
    cmds = _commands(path)
    assert cmds["from"] == ["./model.Q8_0.gguf"]
    (template,) = cmds["template"]
    system = cmds.get("system", [None])[0]
    for pairs in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in pairs]
        expected = _jinja_without_bos(tok, messages)
        assert _ollama_render(template, system, messages) == expected
        # Also when the request clears the system prompt: the template renders the default itself.
        assert _ollama_render(template, None, messages) == expected
    if tok.bos_token == "<s>":
        assert "<s>" not in template  # llama.cpp adds BOS
    expected_stops = STOPS[name] if kind != "smollm2" or name not in ("mistral", "zephyr", "alpaca", "vicuna") \
        else STOPS[name][:-1] + ["<|im_end|>"]
    assert cmds["stop"] == expected_stops
    default = {"qwen-2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
               "alpaca": "Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.",
               "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant "
                         "gives helpful, detailed, and polite answers to the user's questions."}.get(name)
    assert system == default


def test_smollm2_own_template(gguf):
    tok = get_tokenizer("smollm2")
    cmds = _commands(write_modelfile(gguf, "model.Q8_0.gguf", tok))
    assert cmds["system"] == ["You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    assert cmds["stop"] == ["<|im_start|>", "<|im_end|>"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert _ollama_render(cmds["template"][0], cmds["system"][0], messages) == expected
    assert "(family: chatml)" in (gguf / "Modelfile").read_text().splitlines()[0]


# Ollama's own llama3-instruct and chatml templates (template/*.gotmpl), for an independent cross-check.
OLLAMA_LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
                 "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")


@pytest.mark.parametrize("name, reference", [("llama-3", OLLAMA_LLAMA3), ("chatml", OLLAMA_CHATML)])
def test_matches_ollamas_own_templates(name, reference, gguf):
    tok = get_chat_template(get_tokenizer("bytelevel"), name)
    (template,) = _commands(write_modelfile(gguf, "model.Q8_0.gguf", tok))["template"]
    for pairs in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in pairs]
        assert _ollama_render(template, None, messages) == _ollama_render(reference, None, messages)


def test_unknown_family_is_derived_with_a_warning(gguf):
    jinja = ("{% for m in messages %}{{ '<<' + m['role'] + '>> ' + m['content'] + ' <</turn>>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<<assistant>> ' }}{% endif %}")
    with pytest.warns(UserWarning, match="no known family"):
        path = write_modelfile(gguf, "model.Q8_0.gguf", jinja, eos_token="</s>")
    cmds = _commands(path)
    assert cmds["stop"] == ["<</turn>>", "<<user>>", "</s>"]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert _ollama_render(cmds["template"][0], None, messages) == render_chat_template(
        jinja, messages, add_generation_prompt=True)


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "verbatim and in order"),
    (None, "has no chat template"),
])
def test_unreadable_template_writes_no_template(template, reason, gguf):
    with pytest.warns(UserWarning, match=f"no Ollama TEMPLATE written \\(.*{reason}"):
        path = write_modelfile(gguf, "model.Q8_0.gguf", template, eos_token="<|end|>")
    cmds = _commands(path)
    assert "template" not in cmds and cmds["stop"] == ["<|end|>"]


def test_quoting_of_odd_characters(gguf):
    # A marker with a quote, a backslash, a tab and a zero-width space (which Ollama's parser would drop raw).
    jinja = ("{% for m in messages %}{{ '[\"' + m['role'] + '\\\\\\t\u200b] ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '[\"assistant\\\\\\t\u200b] ' }}{% endif %}")
    with pytest.warns(UserWarning, match="no known family"):
        path = write_modelfile(gguf, "model.Q8_0.gguf", jinja, system_message='Say "hi"\nthen stop.')
    text = path.read_text(encoding="utf-8")
    assert "\u200b" not in text and "\\u200b" in text
    cmds = _commands(path)
    assert cmds["system"] == ['Say "hi"\nthen stop.']
    assert "stop" not in cmds  # the derived stop word '["user\\\t\u200b]' cannot be written
    messages = [{"role": "user", "content": "x"}]
    assert _ollama_render(cmds["template"][0], cmds["system"][0], messages) == render_chat_template(
        jinja, [{"role": "system", "content": 'Say "hi"\nthen stop.'}] + messages, add_generation_prompt=True)


def test_parameters_and_stop_override(gguf):
    tok = get_chat_template(get_tokenizer("bytelevel"), "gemma")
    path = write_modelfile(gguf, "model.Q8_0.gguf", tok, parameters={"temperature": 0.7, "num_ctx": 4096},
                           stop=["<end_of_turn>"], system_message="Answer in French.")
    cmds = _commands(path)
    assert (cmds["temperature"], cmds["num_ctx"], cmds["stop"]) == (["0.7"], ["4096"], ["<end_of_turn>"])
    assert cmds["system"] == ["Answer in French."]


def test_failed_write_keeps_the_previous_modelfile(gguf):
    tok = get_chat_template(get_tokenizer("bytelevel"), "chatml")
    path = write_modelfile(gguf, "model.Q8_0.gguf", tok)
    before = path.read_text()
    with pytest.raises(ValueError, match='contains """'):
        write_modelfile(gguf, "model.Q8_0.gguf", tok, system_message='a """ b')
    assert path.read_text() == before
    assert sorted(p.name for p in gguf.iterdir()) == ["Modelfile", "model.Q8_0.gguf"]


def test_bad_arguments(gguf):
    tok = get_chat_template(get_tokenizer("bytelevel"), "chatml")
    with pytest.raises(FileNotFoundError, match="no GGUF file 'other.gguf'"):
        write_modelfile(gguf, "other.gguf", tok)
    with pytest.raises(ValueError, match="gguf_filename must be a file name inside directory"):
        write_modelfile(gguf.parent, f"{gguf.name}/model.Q8_0.gguf", tok)
    with pytest.raises(ValueError, match="pass eos_token="):
        write_modelfile(gguf, "model.Q8_0.gguf", next(t for t in _TEMPLATES if t.name == "mistral").body)
