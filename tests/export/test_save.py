"""Saving: atomic directory replacement, sharded safetensors, save_method variants (lora, merged_16bit re-reading
the original 16-bit weights, merged_4bit in bitsandbytes' layout) and push_to_hub_merged."""
from __future__ import annotations

import json

import pytest
import torch

from swiftlora import FastLanguageModel
from swiftlora.export.atomic import atomic_dir
from swiftlora.export.writer import parse_size, write_safetensors
from tests.helpers import rel_err
from tests.models.helpers import save_tiny

pytest.importorskip("peft")


def test_atomic_dir_keeps_the_old_output_when_a_save_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "model.safetensors").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_text("v2")
    names = sorted(p.name for p in target.iterdir())
    assert names == ["adapter_model.safetensors", "notes.txt"]  # old weights replaced, other files kept


def test_writer_shards_and_index(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    names = write_safetensors(tmp_path, tensors.items(), max_shard_size=40_000)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-bit tiny Llama with random (non-zero) LoRA B, so merges change the weights."""
    path = save_tiny(tmp_path_factory.mktemp("tiny-save") / "llama", "llama")
    model, tok = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return path, model, tok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_16bit_uses_the_original_weights(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    path, model, tok = trained
    model.save_pretrained_merged(tmp_path / "m16", tok, save_method="merged_16bit", max_shard_size="30KB")
    config = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (tmp_path / "m16" / "model.safetensors.index.json").exists()
    assert (tmp_path / "m16" / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (tmp_path / "m16" / "tokenizer_config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # an untargeted weight is the original bit for bit (not its NF4 round trip)
    assert torch.equal(merged.model.layers[0].input_layernorm.weight, original.model.layers[0].input_layernorm.weight)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = q.get_delta_weight("default").float()
    expected = (original.model.layers[0].self_attn.q_proj.weight.float() + delta).to(torch.bfloat16).float()
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expected)


def test_merged_4bit_loads_as_a_bitsandbytes_model(trained, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    path, model, tok = trained
    with pytest.warns(UserWarning, match="NF4"):
        model.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit_forced")
    model.save_pretrained_merged(tmp_path / "m16", tok, save_method="merged_16bit")
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", dtype=torch.float32)
    assert isinstance(q4.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(5, 100, (2, 12))
    err, moved = rel_err(_logits(q4, ids), _logits(m16, ids)), rel_err(_logits(base, ids), _logits(m16, ids))
    assert err < moved / 3, f"NF4 merge error {err:.3f} vs the fine-tune's own change {moved:.3f}"


def test_lora_method_and_bad_method(trained, tmp_path):
    _, model, tok = trained
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    names = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    with pytest.raises(ValueError, match="save_method"):
        model.save_pretrained_merged(tmp_path / "x", tok, save_method="merged_8bit")


def test_push_to_hub_merged_uploads_the_saved_folder(trained, monkeypatch):
    import huggingface_hub

    _, model, tok = trained
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, commit_message, create_pr, revision):
            from pathlib import Path

            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["message"] = commit_message
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = model.push_to_hub_merged("me/tiny", tok, save_method="merged_16bit", token="t0k", private=True)
    assert url == "commit-url" and calls["repo"] == ("me/tiny", True, True) and calls["token"] == "t0k"
    assert "model.safetensors" in calls["files"] and "config.json" in calls["files"]
