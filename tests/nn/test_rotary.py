"""swiftlora.nn.RotaryEmbedding against transformers' rotary modules: tables for every supported rope type, and
rotated q/k through the kernel vs HF's apply_rotary_pos_emb (fidelity, separate from the op's own tests)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from swiftlora import _compat
from swiftlora.nn import RopeConfig, RotaryEmbedding
from tests.helpers import DEVICES, assert_close, randn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

ROPE_PARAMS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "rope_theta": 1e6},
    "partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},  # Phi
}


def _config(name, max_pos=128, head_dim=64):
    if name == "partial":  # Llama ignores partial_rotary_factor; Phi rotates the first half of each head
        from transformers import PhiConfig

        return PhiConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_pos, rope_parameters=dict(ROPE_PARAMS[name]))
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=dict(ROPE_PARAMS[name]))


def _hf_cos_sin(config, position_ids, device):
    if config.model_type == "phi":
        from transformers.models.phi.modeling_phi import PhiRotaryEmbedding as HF
    else:
        HF = LlamaRotaryEmbedding
    hf = HF(config).to(device)
    x = torch.zeros(1, device=device)  # only its dtype/device are read
    return hf(x, position_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ROPE_PARAMS))
@pytest.mark.parametrize("seq", [40, 300])  # 300 > max_position_embeddings: dynamic NTK rescales
def test_tables_match_hf(device, name, seq):
    config = _config(name)
    pos = torch.arange(seq, device=device)[None].repeat(2, 1)
    pos[1] = torch.randint(0, seq, (seq,), device=device)
    cos_hf, sin_hf = _hf_cos_sin(config, pos, device)
    ours = RotaryEmbedding.from_config(config)
    cos, sin = ours.tables(seq, device)
    half = cos.shape[-1]
    assert 2 * half == ours.cfg.rotary_dim == cos_hf.shape[-1] == (32 if name == "partial" else 64)
    assert torch.equal(cos_hf[..., :half], cos_hf[..., half:])
    for a, b in ((cos[pos], cos_hf[..., :half]), (sin[pos], sin_hf[..., :half])):
        assert (a - b).abs().max().item() <= 2e-6, f"{name}: tables differ from HF by {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["default", "llama3", "yarn", "partial"])
def test_rotated_qk_match_hf(device, dtype, name):
    config = _config(name)
    b, s, d = 2, 50, 64
    pos = torch.randint(0, 120, (b, s), device=device)
    q = randn(b, 4, s, d, dtype=dtype, device=device)
    k = randn(b, 2, s, d, dtype=dtype, device=device)
    cos_hf, sin_hf = _hf_cos_sin(config, pos, device)
    r = cos_hf.shape[-1]

    def hf_apply(qq, kk, c, sn):  # HF applies partial rotary by splitting off the rotated dims itself
        qr, kr = apply_rotary_pos_emb(qq[..., :r], kk[..., :r], c, sn)
        return torch.cat((qr, qq[..., r:]), -1), torch.cat((kr, kk[..., r:]), -1)

    ref64 = hf_apply(q.double(), k.double(), cos_hf.double(), sin_hf.double())
    ref_lowp = hf_apply(q, k, cos_hf.to(dtype), sin_hf.to(dtype))
    out = RotaryEmbedding.from_config(config)(q, k, pos, layout="bhsd", max_position=119)
    for o, r64, rl, what in zip(out, ref64, ref_lowp, ("q", "k")):
        assert_close(o, r64, rl, what=f"{name} {what}")


def test_table_cache_grows_and_is_reused():
    rot = RotaryEmbedding(RopeConfig(head_dim=16, rotary_dim=16))
    cos_a, _ = rot.tables(10, "cpu")
    cos_b, _ = rot.tables(200, "cpu")
    assert cos_b is cos_a and cos_a.shape == (256, 8)
    cos_c, _ = rot.tables(300, "cpu")
    assert cos_c.shape == (512, 8)
    assert torch.equal(cos_c[:256], cos_a)
    assert rot.tables(3, "cpu", torch.bfloat16)[0].dtype == torch.bfloat16


def test_dynamic_tables_follow_the_longest_position():
    rot = RotaryEmbedding.from_config(_config("dynamic", max_pos=64))
    short, _ = rot.tables(50, "cpu")
    long, _ = rot.tables(100, "cpu")
    assert long.shape[0] == 100 and not torch.allclose(long[:50], short[:50])
    cos_hf, _ = _hf_cos_sin(_config("dynamic", max_pos=64), torch.arange(100)[None], "cpu")
    assert (long - cos_hf[0, :, : long.shape[1]]).abs().max() <= 2e-6


def test_config_forms():
    # transformers 4.x style: rope_theta on the config, rope_scaling with the old "type" key
    old = SimpleNamespace(hidden_size=128, num_attention_heads=2, max_position_embeddings=256, rope_theta=1e4,
                          rope_scaling={"type": "linear", "factor": 2.0})
    cfg = RopeConfig.from_config(old)
    assert (cfg.rope_type, cfg.factor, cfg.head_dim, cfg.theta) == ("linear", 2.0, 64, 1e4)
    plain = SimpleNamespace(hidden_size=128, num_attention_heads=2, rope_theta=5e5, rope_scaling=None)
    assert RopeConfig.from_config(plain).rope_type == "default"
    # one setting per layer type (Gemma 3)
    nested = SimpleNamespace(hidden_size=128, num_attention_heads=2, head_dim=32, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert RopeConfig.from_config(nested, "full_attention").factor == 8.0
    assert RopeConfig.from_config(nested, "sliding_attention").theta == 1e4
    with pytest.raises(ValueError, match="pass layer_type"):
        RopeConfig.from_config(nested)
    with pytest.raises(ValueError, match="has no rope_theta"):
        _compat.rope_parameters(SimpleNamespace(rope_parameters=None))
    with pytest.raises(ValueError, match="rope_type must be one of"):
        RopeConfig(head_dim=16, rotary_dim=16, rope_type="longrope")
    with pytest.raises(ValueError, match="needs a scaling factor"):
        RopeConfig(head_dim=16, rotary_dim=16, rope_type="linear")
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        RopeConfig(head_dim=16, rotary_dim=18)


@pytest.mark.parametrize("model", ["gemma3_text", "qwen3"])
def test_real_model_configs(model):
    # Gemma 3 (per-layer-type rope, head_dim != hidden/heads) and Qwen3 (explicit head_dim) through HF's own
    # rotary modules.
    if model == "qwen3":
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as HF

        config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             max_position_embeddings=512)
        layer_types = [None]
    else:
        from transformers import Gemma3TextConfig
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding as HF

        config = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=48,
                                  max_position_embeddings=512)
        layer_types = sorted(set(config.layer_types))
    hf = HF(config)
    pos = torch.randint(0, 400, (2, 30))
    for lt in layer_types:
        cos_hf, sin_hf = hf(torch.zeros(1), pos) if lt is None else hf(torch.zeros(1), pos, lt)
        cos, sin = RotaryEmbedding.from_config(config, lt).tables(400, "cpu")
        half = cos.shape[-1]
        assert (cos[pos] - cos_hf[..., :half]).abs().max() <= 2e-6, lt
        assert (sin[pos] - sin_hf[..., :half]).abs().max() <= 2e-6, lt
