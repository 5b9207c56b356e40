"""Data loading (train/data.py): the default chatterbot data set, file and in-memory loaders, format_for_sft."""
from __future__ import annotations

import json

import pytest

from swiftlora.train.chat_templates import get_chat_template
from swiftlora.train.data import default_chat_dataset, format_for_sft, load_chat_dataset
from swiftlora.train.response_masking import IGNORE_INDEX, ResponseMasker
from swiftlora.train.template_layout import probe_chat_template
from tests.train.tiny_tokenizers import get_tokenizer, tiny_tokenizer

pytest.importorskip("chatterbot_corpus")

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def default_data():
    return default_chat_dataset()


def test_default_data_set(default_data):
    assert len(default_data) == 2025 and default_data.column_names == ["messages"]
    for row in default_data:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(m["content"] and m["content"] == m["content"].strip() for m in row["messages"])
    assert default_data[0]["messages"][0] == {"role": "user", "content": "What is AI?"}  # ai.yml comes first


def test_default_data_set_options():
    greetings = default_chat_dataset(categories=["greetings"])
    assert 0 < len(greetings) < 2025 and greetings[0]["messages"][0]["content"] == "Hello"
    assert len(default_chat_dataset(5)) == 5
    with pytest.raises(ValueError, match="unknown categories \\['cooking'\\]"):
        default_chat_dataset(categories=["cooking"])
    with pytest.raises(ValueError, match="no language 'klingon'"):
        default_chat_dataset(language="klingon")
    assert load_chat_dataset(None, max_rows=3)["messages"] == default_chat_dataset(3)["messages"]


ROWS = {
    "messages": {"messages": [{"role": "system", "content": "S"}, {"role": "human", "content": "Q"},
                              {"role": "assistant", "content": "A"}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                   {"from": "gpt", "value": "A"}]},
    "alpaca": {"system": "S", "instruction": "Q", "input": "", "output": "A"},
    "prompt_completion": {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                          "completion": "A"},
}
STANDARD = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("via", ["jsonl", "json", "list", "dataset"])
def test_formats_and_sources(fmt, via, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [ROWS[fmt], ROWS[fmt]]
    if via == "jsonl":
        source = tmp_path / "data.jsonl"
        source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    elif via == "json":
        source = tmp_path / "data.json"
        source.write_text(json.dumps(rows), encoding="utf-8")
    elif via == "list":
        source = rows
    else:
        source = DatasetDict({"train": Dataset.from_list(rows)})
    for fmt_arg in ("auto", fmt):
        ds = load_chat_dataset(str(source) if via in ("jsonl", "json") else source, fmt_arg)
        assert ds.column_names == ["messages"] and ds["messages"] == [STANDARD, STANDARD]


def test_alpaca_input_and_text_format():
    ds = load_chat_dataset([{"instruction": "Add", "input": "1+1", "output": "2"}])
    assert ds[0]["messages"] == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    ds = load_chat_dataset([{"text": "plain", "meta": 1}])
    assert ds.column_names == ["text"] and ds[0]["text"] == "plain"
    assert len(load_chat_dataset([{"text": str(i)} for i in range(9)], max_rows=4)) == 4


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"foo": 1}], "auto", "rows have keys \\['foo'\\]; expected 'messages'"),
    ([{"messages": []}], "auto", "row 0: 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "auto", "row 0, turn 0: unknown role 'robot'"),
    ([{"instruction": 1, "output": "x"}], "alpaca", "row 0: Alpaca rows need string 'instruction'"),
    ([{"text": "x"}], "chatml", "unknown format 'chatml'"),
    ([{"messages": MESSAGES}], "text", "format 'text' needs a 'text' column"),
    ([], "auto", "has no rows"),
])
def test_bad_data(rows, fmt, message):
    with pytest.raises(ValueError, match=message):
        load_chat_dataset(rows, fmt)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_chat_dataset(str(bad))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a .jsonl or .json file"):
        load_chat_dataset(csv)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_chat_dataset(str(tmp_path / "missing.jsonl"))
    obj = tmp_path / "obj.json"
    obj.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="expected one JSON object per row"):
        load_chat_dataset(obj)


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/chats' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="'someone/chats' is not a local file, and loading it from the Hugging Face "
                                         "Hub failed \\(ConnectionError"):
        load_chat_dataset("someone/chats")


def test_format_for_sft_text():
    tok = get_chat_template(get_tokenizer("smollm2"), "chatml")
    rows = [{"messages": MESSAGES, "id": 3}]
    out = format_for_sft(rows, tok)
    assert out == [{"id": 3, "text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"}]
    from datasets import Dataset

    ds = format_for_sft(Dataset.from_list(rows), tok)
    assert ds.column_names == ["id", "text"] and ds[0]["text"] == out[0]["text"]
    with pytest.raises(ValueError, match="no 'conversation' column"):
        format_for_sft(Dataset.from_list(rows), tok, messages_field="conversation")


def test_format_for_sft_drops_bos_the_tokenizer_adds():
    from tokenizers.processors import TemplateProcessing

    tok = get_chat_template(tiny_tokenizer("bytelevel"), "llama-3")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                              special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    text = format_for_sft([{"messages": MESSAGES}], tok)[0]["text"]
    assert text.startswith("<|start_header_id|>") and text.endswith("<|eot_id|>")
    ids = tok(text)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    plain = get_chat_template(tiny_tokenizer("bytelevel"), "llama-3")  # adds no BOS: the template's BOS stays
    assert format_for_sft([{"messages": MESSAGES}], plain)[0]["text"].startswith("<s><|start_header_id|>")
    with pytest.raises(ValueError, match="no chat_template"):
        format_for_sft([{"messages": MESSAGES}], tiny_tokenizer("bytelevel"))


@pytest.mark.parametrize("name", ["chatml", "llama-3", "mistral", "gemma", "phi-3", "alpaca", "vicuna", "zephyr"])
def test_masking_finds_every_default_answer(name, default_data):
    """The main job's data through every template on the real SmolLM2 tokenizer: each answer is trained."""
    tok = get_chat_template(get_tokenizer("smollm2"), name)
    layout = probe_chat_template(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    masker = ResponseMasker(tok, *layout.markers(), template=tok.chat_template)
    for row in default_data.select(range(0, len(default_data), 25)):
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        kept = tok.decode([t for t in masker(ids) if t != IGNORE_INDEX])
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert kept.count(tok.eos_token) == len(answers)
        pos = 0
        for answer in answers:
            pos = kept.index(answer, pos) + len(answer)
