"""get_chat_template: exact text of every template, EOS mapping, pad handling, role/key mapping, system message;
standardize_sharegpt."""
from __future__ import annotations

import pytest

from swiftlora.train.chat_template_table import CHAT_TEMPLATES
from swiftlora.train.chat_templates import get_chat_template, standardize_sharegpt
from swiftlora.train.template_layout import render_chat_template
from tests.train.tiny_tokenizers import get_tokenizer, tiny_tokenizer

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
_L3 = "<|start_header_id|>{}<|end_header_id|>\n\n".format
_L3_TAIL = (f"{_L3('user')}Hi<|eot_id|>{_L3('assistant')}Hello.<|eot_id|>{_L3('user')}Bye<|eot_id|>"
            f"{_L3('assistant')}")
# Each template's rendering of CONVO with the generation prompt, BOS "<s>", EOS "</s>", written out by hand.
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "Hello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama-3": f"<s>{_L3('system')}Be brief.<|eot_id|>{_L3_TAIL}",
    "llama-3.1": f"<s>{_L3('system')}Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                 f"Be brief.<|eot_id|>{_L3_TAIL}",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST]",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "phi-3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n"
             "<|assistant|>\n",
    "zephyr": "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n<|user|>\nBye</s>\n"
              "<|assistant|>\n",
    "alpaca": "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n### Instruction:\nBye\n\n"
              "### Response:\n",
    "vicuna": "<s>Be brief. USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:",
}
EXPECTED["qwen-2.5"] = EXPECTED["chatml"]
# The text before the first user turn when a conversation has no system message.
DEFAULT_OPENING = {
    "qwen-2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "llama-3.1": f"<s>{_L3('system')}Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>",
    "alpaca": "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n",
    "vicuna": "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions. ",
}
STOP_WORD = {"chatml": "<|im_end|>", "qwen-2.5": "<|im_end|>", "llama-3": "<|eot_id|>", "llama-3.1": "<|eot_id|>",
             "gemma": "<end_of_turn>", "phi-3": "<|end|>"}


def _eos_as_s(tok):
    """The rendering with "</s>" standing for EOS (templates that end turns with the tokenizer's eos_token)."""
    return lambda msgs, gen=True: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_text_is_exact(name):
    tok = get_chat_template(tiny_tokenizer("bytelevel"), name)
    assert tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True) == EXPECTED[name]
    no_system = tok.apply_chat_template(CONVO[1:], tokenize=False, add_generation_prompt=True)
    opening = DEFAULT_OPENING.get(name, "<s>" if EXPECTED[name].startswith("<s>") else "")
    first_user = {"mistral": "[INST] Hi", "gemma": "<start_of_turn>user\nHi"}.get(name)
    if first_user:  # folding templates: the system text simply disappears
        assert no_system == EXPECTED[name].replace("Be brief.\n\n", "")
    else:
        body = EXPECTED[name][EXPECTED[name].index("Be brief.") + len("Be brief."):]
        system_end = {"chatml": "<|im_end|>\n", "qwen-2.5": "<|im_end|>\n", "phi-3": "<|end|>\n",
                      "zephyr": "</s>\n", "alpaca": "\n\n", "vicuna": " "}.get(name, "<|eot_id|>")
        assert no_system == opening + body[len(system_end):]
    # Without the generation prompt the conversation ends right after the last message.
    ending = tok.apply_chat_template(CONVO[:3], tokenize=False)
    assert not ending.endswith(("assistant\n", "model\n", "### Response:\n"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("kind", ["bytelevel", "smollm2"])
def test_our_renderer_matches_transformers(name, kind):
    # The layout probe and the Modelfile rely on render_chat_template giving transformers' text.
    tok = get_chat_template(get_tokenizer(kind), name)
    for msgs in (CONVO, CONVO[1:], CONVO[1:3]):
        for gen in (False, True):
            ours = render_chat_template(tok.chat_template, msgs, add_generation_prompt=gen,
                                        bos_token=tok.bos_token, eos_token=tok.eos_token)
            assert ours == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_names_and_aliases():
    required = {"llama-3", "llama-3.1", "chatml", "mistral", "gemma", "gemma-2", "gemma-3", "qwen-2.5", "phi-3",
                "alpaca", "vicuna", "zephyr"}
    assert required <= set(CHAT_TEMPLATES)
    tok = tiny_tokenizer("bytelevel")
    assert get_chat_template(tok, "gemma-3").chat_template == get_chat_template(tok, "gemma").chat_template
    with pytest.raises(ValueError, match="unknown chat_template 'llama-9'.*chatml"):
        get_chat_template(tok, "llama-9")


@pytest.mark.parametrize("name", sorted(STOP_WORD))
def test_eos_renamed_when_stop_word_is_not_a_token(name):
    base = tiny_tokenizer("wordlevel")  # chat markers are split into words and punctuation here
    eos_id, size = base.eos_token_id, len(base)
    stop = STOP_WORD[name]
    assert stop not in base.get_vocab()
    tok = get_chat_template(base, name)
    assert (tok.eos_token, tok.eos_token_id, len(tok)) == (stop, eos_id, size)
    assert tok.encode(stop, add_special_tokens=False) == [eos_id]
    assert tok.convert_ids_to_tokens(eos_id) == stop
    assert base.eos_token == "</s>" and base.encode("</s>", add_special_tokens=False) == [eos_id]  # untouched
    # The end of every assistant turn is now the EOS id.
    ids = tok.apply_chat_template(CONVO[1:3], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert eos_id in ids


@pytest.mark.parametrize("name", sorted(STOP_WORD))
def test_eos_set_to_existing_stop_token(name):
    base = tiny_tokenizer("bytelevel")  # every chat marker is a special token here
    tok = get_chat_template(base, name)
    assert tok.eos_token == STOP_WORD[name]
    assert tok.eos_token_id == base.convert_tokens_to_ids(STOP_WORD[name]) != base.eos_token_id
    assert len(tok) == len(base)


def test_map_eos_token_false():
    base = tiny_tokenizer("wordlevel")
    with pytest.warns(UserWarning, match="not a token of this tokenizer"):
        tok = get_chat_template(base, "chatml", map_eos_token=False)
    assert tok.eos_token == "</s>"
    tok = get_chat_template(tiny_tokenizer("bytelevel"), "llama-3", map_eos_token=False)
    assert tok.eos_token == "</s>"


def test_templates_ending_turns_with_eos_keep_it():
    for name in ("mistral", "zephyr", "alpaca", "vicuna"):
        tok = get_chat_template(tiny_tokenizer("metaspace"), name)
        assert tok.eos_token == "</s>"
        assert "</s>" in tok.apply_chat_template(CONVO[1:3], tokenize=False)


def test_pad_moves_off_eos():
    tok = get_chat_template(tiny_tokenizer("metaspace"), "chatml")
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_smollm2_eos_and_pad():
    base = get_tokenizer("smollm2")
    assert base.pad_token_id == base.eos_token_id  # the GGUF pads with <|im_end|>
    tok = get_chat_template(base, "chatml")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == base.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    tok = get_chat_template(base, "llama-3")
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", base.eos_token_id)
    assert tok.encode("Hi<|eot_id|>", add_special_tokens=False)[-1] == base.eos_token_id


def test_save_and_reload_keep_template_and_eos(tmp_path):
    from transformers import AutoTokenizer

    tok = get_chat_template(tiny_tokenizer("metaspace"), "gemma")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == tok.chat_template
    assert (again.eos_token, again.eos_token_id, again.pad_token) == (tok.eos_token, tok.eos_token_id, tok.pad_token)
    assert again.apply_chat_template(CONVO, tokenize=False) == tok.apply_chat_template(CONVO, tokenize=False)


def test_mapping_reads_sharegpt_and_standard_messages():
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tok = get_chat_template(tiny_tokenizer("bytelevel"), "llama-3", mapping=mapping)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CONVO]
    assert tok.apply_chat_template(sharegpt, tokenize=False, add_generation_prompt=True) == EXPECTED["llama-3"]
    assert tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True) == EXPECTED["llama-3"]
    with pytest.raises(ValueError, match="unknown keys \\['speaker'\\]"):
        get_chat_template(tiny_tokenizer("bytelevel"), "chatml", mapping={"speaker": "from"})


def test_system_message_sets_the_default():
    tok = get_chat_template(tiny_tokenizer("bytelevel"), "chatml", system_message="You are 'Sam'.\nShort answers.")
    text = tok.apply_chat_template(CONVO[1:2], tokenize=False)
    assert text == "<|im_start|>system\nYou are 'Sam'.\nShort answers.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(CONVO[:2], tokenize=False).startswith("<|im_start|>system\nBe brief.")
    tok = get_chat_template(tiny_tokenizer("bytelevel"), "qwen-2.5", system_message="Custom.")
    assert "You are Qwen" not in tok.apply_chat_template(CONVO[1:2], tokenize=False)


def test_custom_template():
    jinja = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '<|end|>' }}{% endfor %}"
    tok = get_chat_template(tiny_tokenizer("metaspace"), (jinja, "<|end|>"))
    assert tok.apply_chat_template(CONVO[1:3], tokenize=False) == "<user>Hi<|end|><assistant>Hello.<|end|>"
    assert tok.eos_token == "<|end|>"
    with pytest.raises(ValueError, match="system_message applies to swiftlora's named templates"):
        get_chat_template(tiny_tokenizer("metaspace"), (jinja, None), system_message="x")


def test_standardize_sharegpt_list_and_dataset():
    from datasets import Dataset

    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": 42, "weight": 1}], "id": 7}]
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "42"}]
    assert standardize_sharegpt(rows) == [{"conversations": expected, "id": 7}]
    rows[0]["conversations"][2]["value"] = "42"  # arrow columns hold one type
    ds = standardize_sharegpt(Dataset.from_list(rows))
    assert ds[0]["conversations"] == expected and ds[0]["id"] == 7


@pytest.mark.parametrize("rows, message", [
    ([{"conversations": [{"from": "robot", "value": "x"}]}], "row 0, turn 0: unknown role 'robot'"),
    ([{"conversations": [{"speaker": "human", "text": "x"}]}], "row 0, turn 0: expected from/value or role/content"),
    ([{"dialog": []}], "no conversation column"),
    ([{"conversations": "hello"}], "row 0: 'conversations' must be a list of turns"),
])
def test_standardize_sharegpt_errors(rows, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        standardize_sharegpt(rows)
