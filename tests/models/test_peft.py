"""get_peft_model with Unsloth's arguments: targets, rsLoRA scaling, modules_to_save, LoftQ rules, seeding,
repeated calls, checkpointing modes and argument errors."""
from __future__ import annotations

import math

import pytest
import torch

from swiftlora import FastLanguageModel
from tests.models.helpers import save_tiny

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny-peft") / "llama", "llama"))


def _load(ckpt, **kw):
    kw.setdefault("dtype", torch.float32)
    return FastLanguageModel.from_pretrained(ckpt, max_seq_length=64, **kw)[0]


def test_default_targets_rslora_and_methods(ckpt):
    model = FastLanguageModel.get_peft_model(_load(ckpt), r=4, lora_alpha=8, use_rslora=True)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") and "lora_A" in dir(m)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert math.isclose(q.scaling["default"], 8 / math.sqrt(4))
    assert q.lora_A["default"].weight.dtype == torch.float32
    for name in ("save_pretrained_merged", "push_to_hub_merged"):
        assert callable(getattr(model, name))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_embed_and_head_in_targets_become_modules_to_save(ckpt):
    model = FastLanguageModel.get_peft_model(_load(ckpt, load_in_4bit=False), target_modules=["q_proj", "lm_head",
                                                                                               "embed_tokens"])
    config = model.peft_config["default"]
    assert set(config.modules_to_save) == {"lm_head", "embed_tokens"}
    assert set(config.target_modules) == {"q_proj"}


def test_random_state_seeds_the_adapters(ckpt):
    a = FastLanguageModel.get_peft_model(_load(ckpt), random_state=7)
    b = FastLanguageModel.get_peft_model(_load(ckpt), random_state=7)
    c = FastLanguageModel.get_peft_model(_load(ckpt), random_state=8)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    pa, pb, pc = (dict(m.named_parameters())[key] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_second_call(ckpt):
    model = FastLanguageModel.get_peft_model(_load(ckpt), r=8)
    assert FastLanguageModel.get_peft_model(model, r=8) is model
    with pytest.raises(TypeError, match="already has LoRA"):
        FastLanguageModel.get_peft_model(model, r=16)


def test_loftq_rules(ckpt):
    with pytest.raises(ValueError, match="load_in_4bit=False"):
        FastLanguageModel.get_peft_model(_load(ckpt), init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    pytest.importorskip("scipy")  # PEFT's LoftQ needs it
    model = FastLanguageModel.get_peft_model(_load(ckpt, load_in_4bit=False), r=4, init_lora_weights="loftq",
                                             loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    b = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"]
    assert b.abs().sum() > 0  # LoftQ starts B from the quantization residual, not zeros


def test_full_finetuning_returns_the_model(ckpt):
    model = _load(ckpt, full_finetuning=True)
    with pytest.warns(UserWarning, match="full_finetuning"):
        assert FastLanguageModel.get_peft_model(model) is model
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode", [True, False, "unsloth"])
def test_checkpointing_modes(ckpt, mode):
    from swiftlora.train.checkpointing import offloaded_checkpoint

    model = FastLanguageModel.get_peft_model(_load(ckpt), use_gradient_checkpointing=mode)
    layer = model.get_base_model().model.layers[0]
    assert layer.gradient_checkpointing is bool(mode)
    if mode == "unsloth":
        assert layer._gradient_checkpointing_func.func is offloaded_checkpoint
        # the Trainer re-enabling checkpointing keeps the offloading one
        model.get_base_model().gradient_checkpointing_enable()
        assert layer._gradient_checkpointing_func.func is offloaded_checkpoint


@pytest.mark.parametrize("bad,match", [({"r": 0}, "r must be"), ({"lora_alpha": -1}, "lora_alpha"),
                                       ({"lora_dropout": 1.5}, "lora_dropout"), ({"bias": "some"}, "bias"),
                                       ({"target_modules": []}, "target_modules"),
                                       ({"use_gradient_checkpointing": "yes"}, "use_gradient_checkpointing")])
def test_bad_arguments(ckpt, bad, match):
    with pytest.raises(ValueError, match=match):
        FastLanguageModel.get_peft_model(_load(ckpt), **bad)
