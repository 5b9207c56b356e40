"""swiftlora.nn.RMSNorm against the real HF norm modules (fidelity, separate from fidelity to our reference)."""
from __future__ import annotations

import copy

import pytest
import torch

from swiftlora.nn import RMSNorm
from tests.helpers import DEVICES, assert_close, randn

transformers = pytest.importorskip("transformers")

# (module path, class name, offset): Gemma's norms are (1 + w) and compute wholly in float32.
HF_NORMS = [
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", False),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", False),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", False),
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", True),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm", True),
]


def _hf_norm(module_path, cls_name, hidden, eps):
    import importlib

    cls = getattr(importlib.import_module(module_path), cls_name)
    norm = cls(hidden, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden) * 0.3 + (0.0 if "Gemma" in cls_name else 1.0))
    return norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", HF_NORMS, ids=lambda s: s[1])
def test_matches_hf_module(device, dtype, spec):
    hidden = 576
    hf = _hf_norm(spec[0], spec[1], hidden, 1e-5).to(device)
    ours = RMSNorm.from_module(copy.deepcopy(hf).to(dtype), offset=spec[2])
    x = randn(3, 7, hidden, dtype=dtype, device=device, requires_grad=True)
    grad = randn(3, 7, hidden, dtype=dtype, device=device)

    y = ours(x)
    y.backward(grad)
    hf64, hf_lowp = copy.deepcopy(hf).double(), copy.deepcopy(hf).to(dtype)
    x64 = x.detach().double().requires_grad_()
    y64 = hf64(x64)
    y64.backward(grad.double())
    x_lowp = x.detach().clone().requires_grad_()
    y_lowp = hf_lowp(x_lowp)
    y_lowp.backward(grad)
    assert_close(y, y64, y_lowp, what=f"{spec[1]} output")
    assert_close(x.grad, x64.grad, x_lowp.grad, what=f"{spec[1]} grad_x")
    assert_close(ours.weight.grad, hf64.weight.grad, hf_lowp.weight.grad, what=f"{spec[1]} grad_w")


def test_from_module_shares_the_weight_parameter():
    hf = _hf_norm("transformers.models.llama.modeling_llama", "LlamaRMSNorm", 64, 1e-6)
    ours = RMSNorm.from_module(hf, offset=False)
    assert ours.weight is hf.weight and ours.eps == 1e-6


def test_from_module_rejects_modules_without_norm_attributes():
    with pytest.raises(TypeError, match="has no weight"):
        RMSNorm.from_module(torch.nn.ReLU(), offset=False)
