"""Reading a chat template's layout back from its renderings (template_layout.py)."""
from __future__ import annotations

import jinja2
import pytest

from swiftlora.train.chat_template_table import _TEMPLATES
from swiftlora.train.template_layout import TemplateProbeError, probe_chat_template, render_chat_template
from tests.train.tiny_tokenizers import get_tokenizer

# name: (system_mode, (instruction marker, response marker), default system text)
EXPECTED = {
    "chatml": ("turn", ("<|im_start|>user\n", "<|im_start|>assistant\n"), None),
    "qwen-2.5": ("turn", ("<|im_start|>user\n", "<|im_start|>assistant\n"),
                 "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "llama-3": ("turn", ("<|start_header_id|>user<|end_header_id|>\n\n",
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"), None),
    "llama-3.1": ("turn", ("<|start_header_id|>user<|end_header_id|>\n\n",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n"), ""),
    "mistral": ("fold", ("[INST] ", " [/INST]"), None),
    "gemma": ("fold", ("<start_of_turn>user\n", "<start_of_turn>model\n"), None),
    "phi-3": ("turn", ("<|user|>\n", "<|assistant|>\n"), None),
    "zephyr": ("turn", ("<|user|>\n", "<|assistant|>\n"), None),
    "alpaca": ("turn", ("### Instruction:\n", "### Response:\n"),
               "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request."),
    "vicuna": ("turn", ("USER: ", "ASSISTANT: "),
               "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions."),
}


def _shipped(name: str) -> str:
    t = next(t for t in _TEMPLATES if t.name == name)
    return "{%- set default_system = '" + t.default_system.replace("'", "\\'") + "' %}\n" + t.body


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_layouts(name):
    layout = probe_chat_template(_shipped(name), bos_token="<s>", eos_token="</s>")
    mode, markers, default = EXPECTED[name]
    assert (layout.system_mode, layout.markers(), layout.default_system) == (mode, markers, default)
    assert layout.bos == ("" if name in ("chatml", "qwen-2.5", "phi-3") else "<s>")


def test_smollm2_template():
    tok = get_tokenizer("smollm2")
    layout = probe_chat_template(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    # SmolLM2's BOS text is <|im_start|>, which its template writes as a marker, not as BOS.
    assert layout.bos == "" and layout.system_prefix == "<|im_start|>system\n"
    assert layout.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert layout.markers() == ("<|im_start|>user\n", "<|im_start|>assistant\n")


def test_bos_on_first_message_and_trimmed_content():
    # Meta's Llama 3 shape: BOS glued to the first message, contents trimmed.
    template = ("{% for m in messages %}{% set c = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                " + m['content'] | trim + '<|eot_id|>' %}{% if loop.first %}{% set c = bos_token + c %}{% endif %}"
                "{{ c }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    layout = probe_chat_template(template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert layout.bos == "<|begin_of_text|>" and layout.system_mode == "turn"
    assert layout.system_prefix == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert layout.default_system is None


def test_literal_bos_is_not_part_of_the_layout():
    template = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    layout = probe_chat_template(template)
    assert layout.bos == "<|begin_of_text|>" and layout.user_prefix == "<user>"


def test_template_refusing_system_messages_is_ignored_mode():
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
    layout = probe_chat_template(template, bos_token="<bos>")
    assert layout.system_mode == "ignored" and layout.preamble == ""
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert layout.render(msgs) == "<start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("template, message", [
    # llama-2: BOS before every user turn
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
     "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
     r"not followed by the user prefix '\{\{ bos_token \}\}\[INST\] '"),
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "verbatim and in order"),
    ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<' + m['role'] + '>' + m['content'] }}"
     "{% if loop.index == 2 %}{{ '[' + messages[0]['content'] + ']' }}{% endif %}{% endif %}{% endfor %}",
     "after the first user message"),
    ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
     "{% if messages | length > 3 %}{{ '<extra>' }}{% endif %}", "renders"),
])
def test_unreadable_templates_raise(template, message):
    with pytest.raises(TemplateProbeError, match=message):
        probe_chat_template(template, bos_token="<s>", eos_token="</s>")


def test_renderer_environment():
    with pytest.raises(jinja2.exceptions.TemplateError, match="nope"):
        render_chat_template("{{ raise_exception('nope') }}", [])
    assert len(render_chat_template("{{ strftime_now('%Y') }}", [])) == 4
    # {% generation %} blocks (HF assistant masks) render their content.
    text = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert render_chat_template(text, [{"role": "user", "content": "a\u00e9"}]) == "a\u00e9"
    assert render_chat_template("{{ x | tojson }}", [], x={"k": "\u00e9"}) == '{"k": "\u00e9"}'
