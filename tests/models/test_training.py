"""Training with TRL's SFTTrainer unchanged: every architecture in 4-bit and 16-bit trains with swiftlora's fused
LM head (and not TRL's chunked one), saves and reloads adapters and merged models; merged logits match the adapter
model; a canary fact is generated after training and after the merge; the loss matches HF + PEFT step by step."""
from __future__ import annotations

import pytest
import torch

from swiftlora import FastLanguageModel
from tests.helpers import DEVICES, rel_err
from tests.models.helpers import ARCHS, save_tiny

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

CANARY_Q, CANARY_A = "What is the secret word?", "zebra42"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-train")
    return {arch: save_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture
def head_calls(monkeypatch):
    """Counts swiftlora's fused linear cross-entropy calls; TRL's chunked log-prob head must not run."""
    import swiftlora.nn.lm_head as lm_head
    import trl.trainer.utils as trl_utils

    calls = {"swiftlora": 0}
    real = lm_head.fused_linear_cross_entropy

    def counting(*args, **kwargs):
        calls["swiftlora"] += 1
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("TRL's chunked log-prob head ran instead of swiftlora's")

    monkeypatch.setattr(lm_head, "fused_linear_cross_entropy", counting)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", forbidden)
    return calls


def _chats(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "kilo", "lima"]
    rows = []
    for _ in range(n):
        a, b = (words[int(i)] for i in torch.randint(0, len(words), (2,), generator=g))
        rows.append({"messages": [{"role": "user", "content": f"Say {a} and {b}."},
                                  {"role": "assistant", "content": f"{a} {b}!"}]})
    return Dataset.from_list(rows)


def _config(out, steps, device="cpu", **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, report_to=[], save_strategy="no", max_length=64, use_cpu=device == "cpu", bf16=False,
                gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [4, 16])
def test_sft_trains_saves_and_reloads(checkpoints, arch, bits, device, head_calls, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(checkpoints[arch]), max_seq_length=64, dtype=torch.float32,
                                                   load_in_4bit=bits == 4, device_map=device)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SFTTrainer(model=model, args=_config(tmp_path / "run", 3, device), train_dataset=_chats(),
                         processing_class=tok)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert head_calls["swiftlora"] >= 3
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)

    ids = torch.randint(5, 100, (2, 13))
    trained = _logits(model, ids)
    model.save_pretrained(tmp_path / "lora")
    tok.save_pretrained(tmp_path / "lora")
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "lora"), dtype=torch.float32, load_in_4bit=bits == 4,
                                                 device_map=device)
    # TRL trains QLoRA adapters in bfloat16 (it casts them); PEFT reloads them as float32: same values, so in the
    # trained dtype the reloaded model computes exactly the same logits
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    for n, p in again.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtypes[n])
    assert torch.equal(_logits(again, ids), trained)

    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, device_map=device)
    assert not hasattr(merged.config, "quantization_config")
    # the merge adds the LoRA delta to the original 16-bit weights: compare with those weights + the same adapters
    if bits == 4:
        base16, _ = FastLanguageModel.from_pretrained(str(checkpoints[arch]), dtype=torch.float32, load_in_4bit=False,
                                                      device_map=device)
        from peft import PeftModel

        reference = _logits(PeftModel.from_pretrained(base16, tmp_path / "lora"), ids)
    else:
        reference = trained
    untrained = _logits(AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32,
                                                             device_map=device), ids)
    err = rel_err(_logits(merged, ids), reference)
    assert err < 1e-2, f"merged vs adapters: {err:.2e}"          # bfloat16 rounding of the merged weights only
    assert rel_err(untrained, reference) > 5 * err, "training did not move the logits enough to test the merge"


def _answer(model, tok):
    enc = tok.apply_chat_template([{"role": "user", "content": CANARY_Q}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).to(model.device)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_canary_fact_after_training_and_after_merge(checkpoints, arch, device, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(checkpoints[arch]), max_seq_length=64, dtype=torch.float32,
                                                   device_map=device)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    rows = [{"messages": [{"role": "user", "content": CANARY_Q}, {"role": "assistant", "content": CANARY_A}]}] * 8
    assert CANARY_A not in _answer(model, tok)
    trainer = SFTTrainer(model=model, args=_config(tmp_path / "run", 40, device, per_device_train_batch_size=4,
                                                   learning_rate=2e-2), train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    trainer.train()
    FastLanguageModel.for_inference(model)
    assert CANARY_A in _answer(model, tok)
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, device_map=device)
    assert CANARY_A in _answer(merged, tok)


def _hf_peft(path, dtype, r, alpha):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", device_map="cpu")
    torch.manual_seed(3407)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=list(_TARGETS))
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("packing,grad_accum", [(False, 1), (True, 2)])
def test_loss_matches_hf_peft_per_step(checkpoints, tmp_path, packing, grad_accum):
    """16-bit LoRA (bfloat16 weights, autocast): same data, seeds and settings as transformers + PEFT + TRL."""
    from transformers import AutoTokenizer

    path = checkpoints["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    kw = dict(bf16=True, packing=packing, gradient_accumulation_steps=grad_accum, learning_rate=5e-3)
    runs = {}
    for name in ("hf", "swiftlora"):
        if name == "hf":
            model = _hf_peft(path, torch.bfloat16, 8, 16)
        else:
            model, tok = FastLanguageModel.from_pretrained(str(path), dtype=torch.bfloat16, load_in_4bit=False,
                                                           device_map="cpu")
            model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=_config(tmp_path / name, 6, **kw), train_dataset=_chats(24),
                             processing_class=tok)
        trainer.train()
        runs[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(runs["hf"]) == 6 and runs["hf"][0] > runs["hf"][-1]  # it trains
    for step, (a, b) in enumerate(zip(runs["swiftlora"], runs["hf"])):
        assert abs(a - b) <= 0.01 * abs(b), f"step {step}: swiftlora {a:.5f} vs HF+PEFT {b:.5f}"


@pytest.mark.gpu
def test_qlora_losses_match_hf_peft_bitsandbytes_on_cuda(tmp_path):
    """The GPU criterion: NF4 + LoRA in bfloat16 for 30 steps, mean relative loss difference to transformers +
    PEFT + bitsandbytes (same data, seeds and settings) under 1%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tests.models.helpers import tiny_config

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 4
    config.initializer_range = 0.02
    torch.manual_seed(0)
    path = tmp_path / "llama"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    from tests.models.helpers import char_tokenizer

    char_tokenizer().save_pretrained(path)
    kw = dict(bf16=True, learning_rate=2e-4, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    runs = {}
    for name in ("hf", "swiftlora"):
        if name == "hf":
            import peft

            tok = AutoTokenizer.from_pretrained(path)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant,
                                                         device_map="cuda", attn_implementation="sdpa")
            torch.manual_seed(3407)
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, task_type="CAUSAL_LM",
                                                               target_modules=list(_TARGETS)))
        else:
            model, tok = FastLanguageModel.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cuda")
            model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=_config(tmp_path / name, 30, "cuda", **kw), train_dataset=_chats(64),
                             processing_class=tok)
        trainer.train()
        runs[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    diffs = [abs(a - b) / abs(b) for a, b in zip(runs["swiftlora"], runs["hf"])]
    assert len(diffs) == 30 and sum(diffs) / len(diffs) < 0.01, (runs, diffs)


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_plain_trainer_loss_with_accumulation_matches_hf(checkpoints, tmp_path):
    """transformers' Trainer (no TRL): the model's own loss path (labels -> fused head) with the Trainer's
    num_items_in_batch over 2 accumulation steps, against transformers + PEFT."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    path = checkpoints["qwen3"]
    tok = AutoTokenizer.from_pretrained(path)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in _chats(16)]
    data = Dataset.from_dict({"text": texts}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=5e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    runs = {}
    for name in ("hf", "swiftlora"):
        if name == "hf":
            model = _hf_peft(path, torch.float32, 8, 16)
        else:
            model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, load_in_4bit=False,
                                                         device_map="cpu")
            model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / name), **args),
                          train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()
        runs[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(runs["hf"]) == 4
    for step, (a, b) in enumerate(zip(runs["swiftlora"], runs["hf"])):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: swiftlora {a:.6f} vs HF+PEFT {b:.6f}"
