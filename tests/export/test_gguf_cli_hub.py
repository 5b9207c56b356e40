"""``swiftlora export`` (a saved model directory and a LoRA adapter directory) and push_to_hub_gguf offline."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")  # the export writes through gguf-py

from swiftlora.cli import main  # noqa: E402
from swiftlora.export.hub import push_to_hub_gguf  # noqa: E402
from tests.export.tiny_models import tiny_model, tokenizer_for  # noqa: E402


def _saved(tmp_path, arch="qwen2"):
    tok = tokenizer_for(arch)
    model = tiny_model(arch, len(tok))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def test_cli_exports_a_saved_model(tmp_path, capsys):
    model, _, folder = _saved(tmp_path)
    out = tmp_path / "gguf"
    assert main(["export", str(folder), "--out", str(out), "-q", "q8_0", "-q", "not_quantized", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == ["model.Q8_0.gguf", "model.F16.gguf"]
    reader = gguf.GGUFReader(out / "model.F16.gguf")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    torch.testing.assert_close(torch.from_numpy(emb.data.astype("float32")),
                               model.model.embed_tokens.weight.detach().half().float(), rtol=0, atol=0)
    assert (out / "Modelfile").is_file()


def test_cli_merges_a_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok, folder = _saved(tmp_path, "llama")
    base = tiny_model("llama", len(tok))
    base.load_state_dict(model.state_dict())
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero delta
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text()
                                                 .replace('"base_model_name_or_path": null',
                                                          f'"base_model_name_or_path": "{folder}"'))
    out = tmp_path / "gguf"
    assert main(["export", str(adapter), "--out", str(out), "-q", "f32", "--device", "cpu", "--no-modelfile"]) == 0
    reader = gguf.GGUFReader(out / "model.F32.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    merged = lora.merge_and_unload().model.layers[0].mlp.down_proj.weight.detach()
    torch.testing.assert_close(torch.from_numpy(down.data.copy()), merged, rtol=1e-6, atol=1e-6)
    assert not (out / "Modelfile").exists()


def test_push_to_hub_offline_keeps_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tokenizer_for("qwen3")
    model = tiny_model("qwen3", len(tok))
    with pytest.raises(RuntimeError, match=r"could not upload .*'someone/tiny'.*kept in .*model.Q8_0.gguf"):
        push_to_hub_gguf(model, "someone/tiny", tok, "q8_0", save_directory=tmp_path / "tiny", progress=False)
    assert (tmp_path / "tiny" / "model.Q8_0.gguf").is_file()
