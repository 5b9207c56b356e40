"""for_inference / for_training, and batched greedy generation with left padding: the same tokens as transformers'
generate on the unpatched model (16-bit and NF4), and each row the same as when generated alone."""
from __future__ import annotations

import pytest
import torch

from swiftlora import FastLanguageModel
from swiftlora._compat import keep_bnb_standard_layout
from tests.helpers import DEVICES
from tests.models.helpers import save_tiny

PROMPTS = ["Hi!", "Tell me a story about a cat.", "2+2?"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gen")
    return {arch: save_tiny(root / arch, arch, dtype=torch.float32) for arch in ("llama", "qwen3", "gemma2",
                                                                               "gemma3")}


def _batch(tok):
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    return tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                   padding=True)


def _generate(model, enc, tok):
    enc = enc.to(model.device)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


def test_for_inference_and_for_training_switch_modes(checkpoints):
    model, tok = FastLanguageModel.from_pretrained(str(checkpoints["llama"]), dtype=torch.float32, device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4)
    FastLanguageModel.for_inference(model)
    assert not model.training and tok.padding_side == "left" and model.get_base_model().config.use_cache
    FastLanguageModel.for_training(model, use_gradient_checkpointing=False)
    assert model.training and tok.padding_side == "right" and not model.get_base_model().config.use_cache
    assert not model.get_base_model().model.layers[0].gradient_checkpointing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3"])
@pytest.mark.parametrize("bits", [16, 4])
def test_batched_left_padded_greedy_equals_hf(checkpoints, arch, bits, device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = checkpoints[arch]
    ours, tok = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, load_in_4bit=bits == 4,
                                                  device_map=device)
    FastLanguageModel.for_inference(ours)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if bits == 4 else None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant, device_map=device,
                                              attn_implementation=ours.config._attn_implementation).eval()
    for m in hf.modules():  # bitsandbytes' standard float32 path, as ours (no AVX512-BF16 repacking on some CPUs)
        keep_bnb_standard_layout(m)
    enc = _batch(tok)
    assert (enc["attention_mask"][:, 0] == 0).any(), "the batch must be left padded"
    with torch.no_grad():
        a, b = _generate(ours, enc, tok), _generate(hf, enc, tok)
    assert torch.equal(a, b)
    # each row as if generated alone (no padding)
    for i, prompt in enumerate(PROMPTS):
        one = tok.apply_chat_template([[{"role": "user", "content": prompt}]], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            alone = _generate(ours, one, tok)[0]
        assert torch.equal(alone, a[i, : alone.shape[0]])
