"""train_on_responses_only: token-id masking checked against character offsets, per template and tokenizer."""
from __future__ import annotations

import pytest

from swiftlora.train.chat_template_table import _TEMPLATES
from swiftlora.train.chat_templates import get_chat_template
from swiftlora.train.response_masking import (IGNORE_INDEX, ResponseMasker, ResponseOnlyCollator,
                                              train_on_responses_only)
from swiftlora.train.template_layout import probe_chat_template
from tests.train.tiny_tokenizers import ALL_KINDS, get_tokenizer

TEMPLATE_NAMES = [t.name for t in _TEMPLATES]
# Assistant answers start with text that merges with a marker's last token in some tokenizers.
CONVERSATIONS = [
    [("user", "Hello, how are you today?"), ("assistant", "I am fine, thank you.")],
    [("system", "You are a helpful assistant."), ("user", "Tell me 3 facts about the sea."),
     ("assistant", "\nThe sea is big."), ("user", "What would you like to know?"),
     ("assistant", " 7 facts, 42 and 2024.")],
    [("user", "Quotes: 'single'"), ("assistant", "\n\nA\n\nB"), ("user", "7"),
     ("assistant", "\u201cdouble\u201d text")],
]


def _messages(pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def _expected_tokens(text, offsets, messages, assistant_suffix):
    """(must, may): token indices that must be kept (every token touching an answer, and the tokens of the
    turn's end marker) and that may be kept (anything touching the answer or its whole suffix)."""
    must, may, pos = set(), set(), 0
    end_marker = assistant_suffix.rstrip()
    for m in messages:
        start = text.index(m["content"], pos)
        end = start + len(m["content"])
        pos = end
        if m["role"] != "assistant":
            continue
        assert text[end:end + len(assistant_suffix)] == assistant_suffix or end == len(text)
        for k, (a, b) in enumerate(offsets):
            if a < end and b > start:
                must.add(k)
            if a >= end and b <= end + len(end_marker) and b > a:
                must.add(k)
            if a < end + len(assistant_suffix) and b > start:
                may.add(k)
        pos = end + len(assistant_suffix)
    return must, may


def _masked(tok, masker, messages):
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, enc["input_ids"], enc["offset_mapping"], masker(enc["input_ids"])


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_masks_exactly_the_answers(name, kind):
    tok = get_chat_template(get_tokenizer(kind), name)
    layout = probe_chat_template(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    masker = ResponseMasker(tok, *layout.markers(), template=tok.chat_template)
    for pairs in CONVERSATIONS:
        messages = _messages(pairs)
        text, ids, offsets, labels = _masked(tok, masker, messages)
        kept = {k for k, lab in enumerate(labels) if lab != IGNORE_INDEX}
        assert all(labels[k] == ids[k] for k in kept)
        must, may = _expected_tokens(text, offsets, messages, layout.assistant_suffix)
        assert must <= kept, f"answer tokens masked: {tok.convert_ids_to_tokens([ids[k] for k in sorted(must - kept)])}"
        assert kept <= may, f"non-answer tokens kept: {tok.convert_ids_to_tokens([ids[k] for k in sorted(kept - may)])}"


@pytest.mark.parametrize("kind, name, answer", [
    # wordlevel: "\n" ending "<|im_start|>assistant\n" and "\n" starting the answer form one "\n\n" token
    ("wordlevel", "chatml", "\nHello"),
    # metaspace BPE learned "▁[/INST]I": the marker's last token merged with the answer's first letter
    ("metaspace", "mistral", "I am fine, thank you."),
])
def test_marker_merging_with_the_answer_is_handled(kind, name, answer):
    tok = get_chat_template(get_tokenizer(kind), name)
    layout = probe_chat_template(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    masker = ResponseMasker(tok, *layout.markers(), template=tok.chat_template)
    messages = _messages([("user", "Hi"), ("assistant", answer)])
    text, ids, offsets, labels = _masked(tok, masker, messages)
    start = text.index(answer)
    straddling = [k for k, (a, b) in enumerate(offsets) if a < start < b]
    assert straddling, "the test lost its point: no token straddles the marker/answer boundary"
    assert all(labels[k] == ids[k] for k in straddling)
    assert labels[straddling[0] - 1] == IGNORE_INDEX  # the marker before it is not trained


def test_last_response_only():
    tok = get_chat_template(get_tokenizer("bytelevel"), "llama-3")
    masker = ResponseMasker(tok, "<|start_header_id|>user<|end_header_id|>\n\n",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n", last_response_only=True)
    messages = _messages(CONVERSATIONS[1])
    text, ids, offsets, labels = _masked(tok, masker, messages)
    kept_text = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert kept_text == " 7 facts, 42 and 2024.<|eot_id|>"


def test_existing_labels_are_kept_masked():
    tok = get_chat_template(get_tokenizer("bytelevel"), "chatml")
    masker = ResponseMasker(tok, "<|im_start|>user\n", "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(_messages(CONVERSATIONS[0]), tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    full = masker(ids)
    labels = list(ids)
    first_kept = next(k for k, t in enumerate(full) if t != IGNORE_INDEX)
    labels[first_kept] = IGNORE_INDEX
    out = masker(ids, labels)
    assert out[first_kept] == IGNORE_INDEX and out[first_kept + 1:] == full[first_kept + 1:]


def test_bad_markers():
    tok = get_chat_template(get_tokenizer("bytelevel"), "chatml")
    with pytest.raises(ValueError, match="instruction_part must be a non-empty string"):
        ResponseMasker(tok, "  ", "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="tokenize to the same ids"):
        ResponseMasker(tok, "<|im_start|>", "<|im_start|>")


class _Trainer:
    """The attributes train_on_responses_only uses from a transformers/TRL trainer."""

    def __init__(self, dataset, tokenizer, collator=None, eval_dataset=None):
        self.train_dataset, self.eval_dataset = dataset, eval_dataset
        self.processing_class, self.data_collator = tokenizer, collator


def _tokenized(tok, conversations):
    from datasets import Dataset

    rows = []
    for pairs in conversations:
        ids = tok.apply_chat_template(_messages(pairs), tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        rows.append({"input_ids": ids, "labels": list(ids)})
    return Dataset.from_list(rows)


def test_trainer_dataset_and_collator():
    from transformers import DataCollatorForLanguageModeling

    tok = get_chat_template(get_tokenizer("metaspace"), "mistral")
    ds = _tokenized(tok, CONVERSATIONS)
    trainer = _Trainer(ds, tok, DataCollatorForLanguageModeling(tok, mlm=False), eval_dataset=ds)
    assert train_on_responses_only(trainer) is trainer  # markers read from the template: "[INST] ", " [/INST]"
    masker = ResponseMasker(tok, "[INST] ", " [/INST]", template=tok.chat_template)
    for row in trainer.train_dataset:
        assert row["labels"] == masker(row["input_ids"])
    assert trainer.eval_dataset["labels"] == trainer.train_dataset["labels"]
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    # transformers' LM collator would rebuild labels from input_ids; it was replaced by one that pads them.
    first = trainer.train_dataset[0]["labels"]
    assert batch["labels"][0, :len(first)].tolist() == first
    assert (batch["labels"][0, len(first):] == IGNORE_INDEX).all()


def test_everything_masked_raises():
    tok = get_chat_template(get_tokenizer("bytelevel"), "chatml")
    trainer = _Trainer(_tokenized(tok, CONVERSATIONS), tok)
    with pytest.raises(ValueError, match="every label of the train dataset would be -100.*<\\|start_header_id\\|>"):
        train_on_responses_only(trainer, instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
                                response_part="<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_rows_without_answers_are_dropped_with_a_warning():
    tok = get_chat_template(get_tokenizer("bytelevel"), "gemma")
    trainer = _Trainer(_tokenized(tok, CONVERSATIONS + [[("user", "Only a question?")]]), tok)
    with pytest.warns(UserWarning, match="1 of 4 train examples have no response tokens"):
        train_on_responses_only(trainer)
    assert len(trainer.train_dataset) == 3


def test_collator_refuses_a_batch_with_nothing_to_train():
    collator = ResponseOnlyCollator(lambda rows: {"labels": __import__("torch").full((2, 3), IGNORE_INDEX)})
    with pytest.raises(RuntimeError, match="every label in this batch is -100"):
        collator([{}, {}])


def test_return_function():
    tok = get_chat_template(get_tokenizer("bytelevel"), "phi-3")
    ds = _tokenized(tok, CONVERSATIONS)
    fn = train_on_responses_only(_Trainer(ds, tok), return_function=True)
    out = fn({"input_ids": ds["input_ids"]})
    masker = ResponseMasker(tok, "<|user|>\n", "<|assistant|>\n", template=tok.chat_template)
    assert out["labels"] == [masker(ids) for ids in ds["input_ids"]]


def test_with_trl_sft_trainer(tmp_path):
    """End to end with TRL: the SFTTrainer's tokenized dataset is masked and one training step runs on it."""
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = get_chat_template(get_tokenizer("bytelevel"), "llama-3")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    data = Dataset.from_list([{"messages": _messages(p)} for p in CONVERSATIONS * 2])
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                           use_cpu=True, logging_steps=1, save_strategy="no", max_length=128)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    train_on_responses_only(trainer)
    masker = ResponseMasker(tok, "<|start_header_id|>user<|end_header_id|>\n\n",
                            "<|start_header_id|>assistant<|end_header_id|>\n\n", template=tok.chat_template)
    for row in trainer.train_dataset:
        assert row["labels"] == masker(row["input_ids"]) and any(t != IGNORE_INDEX for t in row["labels"])
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != IGNORE_INDEX).sum() < (batch["attention_mask"] == 1).sum()
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
