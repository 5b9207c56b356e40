"""Each architecture's swap table against the HF modules it replaces, on tiny random configs: every table entry
fires, state-dict keys stay the same, and the patched model's logits and gradients match the HF model's (float32:
< 1e-5 relative; bfloat16: within twice the HF bfloat16 model's own error against float64). Plus the cases the
swaps must keep: sliding windows longer sequences, packed sequences (position ids restarting), left padding."""
from __future__ import annotations

import copy

import pytest
import torch

from swiftlora.models.causal_lm import patch_causal_lm
from swiftlora.models.patching import FAMILIES, apply_swaps, architecture
from swiftlora.nn import Attention, GatedMLP, RMSNorm, RotaryPositions
from tests.helpers import assert_close, rel_err
from tests.models.helpers import ARCHS, tiny_config

transformers = pytest.importorskip("transformers")


def _pair(arch: str, dtype=torch.float32, seed=0, attn=None):
    """(HF model, patched deep copy) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    spec = architecture(config.model_type)
    config._attn_implementation = attn or spec.attn_implementation(config)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).to(dtype)
    ours = copy.deepcopy(hf)
    counts = apply_swaps(ours, spec, ours.config)
    patch_causal_lm(ours)
    return hf, ours, counts


def _tokens(b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 100, (b, s), generator=g)


def test_every_family_has_a_table():
    assert sorted(FAMILIES) == sorted(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"])


@pytest.mark.parametrize("arch", ARCHS)
def test_all_swaps_fire_and_keys_stay(arch):
    hf, ours, counts = _pair(arch)
    layers = hf.config.num_hidden_layers
    norms_per_layer = {"gemma2": 4, "gemma3": 4}.get(arch, 2) + (2 if arch in ("qwen3", "gemma3") else 0)
    assert counts == {"RMSNorm": layers * norms_per_layer + 1, "Attention": layers, "GatedMLP": layers,
                      "RotaryPositions": 1}
    assert set(ours.state_dict()) == set(hf.state_dict())
    for layer in ours.model.layers:
        assert isinstance(layer.self_attn, Attention) and isinstance(layer.mlp, GatedMLP)
        assert isinstance(layer.input_layernorm, RMSNorm)
    assert isinstance(ours.model.rotary_emb, RotaryPositions)
    # the swaps reuse the HF modules' children and parameters (nothing copied)
    fresh = copy.deepcopy(hf)
    q, norm_weight = fresh.model.layers[0].self_attn.q_proj, fresh.model.layers[0].input_layernorm.weight
    apply_swaps(fresh, architecture(fresh.config.model_type), fresh.config)
    assert fresh.model.layers[0].self_attn.q_proj is q
    assert fresh.model.layers[0].input_layernorm.weight is norm_weight


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)  # ours: the fused head (no logits)
    out.loss.backward()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), logits.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_logits_loss_and_grads_match_hf(arch):
    hf, ours, _ = _pair(arch)
    ids = _tokens(2, 37)
    labels = ids.clone()
    labels[0, :5] = -100
    loss_hf, logits_hf, g_hf = _loss_and_grads(hf, ids, labels)
    loss, logits, g = _loss_and_grads(ours, ids, labels)
    assert_close(logits, logits_hf.double(), what=f"{arch} logits")
    assert abs(loss.item() - loss_hf.item()) <= 1e-5 * abs(loss_hf.item()), (loss.item(), loss_hf.item())
    assert set(g) == set(g_hf)
    for name in g_hf:
        assert rel_err(g[name], g_hf[name]) < 1e-4, f"{arch} grad {name}: {rel_err(g[name], g_hf[name]):.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_logits_within_twice_hf_error(arch):
    hf, ours, _ = _pair(arch)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ref64 = copy.deepcopy(hf).double()  # the same (bf16-rounded) weights, computed in float64
    ids = _tokens(2, 29, seed=3)
    with torch.no_grad():
        ref = ref64(input_ids=ids).logits
        assert_close(ours(input_ids=ids).logits, ref, hf(input_ids=ids).logits, what=f"{arch} bf16 logits")


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_beyond_the_window(arch):
    hf, ours, _ = _pair(arch)
    assert hf.config.sliding_window == 8
    ids = _tokens(1, 40, seed=5)  # 5x the window: the mask must cut old tokens off
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits.double(), what=f"{arch} window")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_packed_sequences_with_restarting_positions(arch):
    """Padding-free packing: one row, position ids restarting per document (transformers builds the
    block-diagonal mask from them); rope must use the restarted positions."""
    hf, ours, _ = _pair(arch)
    ids = _tokens(1, 30, seed=7)
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    with torch.no_grad():  # no KV cache, as in training: transformers reads the packing off the position ids
        a = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = hf(input_ids=ids, position_ids=pos, use_cache=False).logits
        second = ours(input_ids=ids[:, 12:], use_cache=False).logits  # the second document alone
    assert_close(a, b.double(), what=f"{arch} packed")
    assert_close(a[:, 12:], second.double(), what=f"{arch} packed == separate")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_left_padded_batch_matches_hf(arch):
    hf, ours, _ = _pair(arch)
    ids = _tokens(2, 16, seed=9)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = hf(input_ids=ids, attention_mask=mask).logits
    assert_close(a[0, 5:], b[0, 5:].double(), what=f"{arch} left padded row")
    assert_close(a[1], b[1].double(), what=f"{arch} full row")


def test_unsupported_rope_type_keeps_hf_rotary_and_still_matches():
    """A rope type without swiftlora tables (longrope here) keeps HF's rotary module; the attention then rotates
    HF's cos/sin through the kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                              "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**config.to_dict()))
    ours = copy.deepcopy(hf)
    counts = apply_swaps(ours, architecture("llama"), ours.config)
    assert "RotaryPositions" not in counts and counts["Attention"] == 2
    ids = _tokens(1, 20)
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits.double(), what="longrope")
