"""QuantState and Linear4bit interop against bitsandbytes itself (skipped where it is not installed): serialized
form byte for byte, states both ways, Linear4bit built from our kernels (checkpoint keys, forward, PEFT), and
bitsandbytes weights dequantized by our kernel."""
from __future__ import annotations

import pytest
import torch

from swiftlora.quant import (QuantState, dequantize_bnb_weight, dequantize_nf4, from_bnb_quant_state,
                             linear_from_bnb, quantize_linear_to_bnb, quantize_nf4, to_bnb_quant_state)
from tests.helpers import DTYPES, randn

bnb = pytest.importorskip("bitsandbytes")
bnb_f = bnb.functional


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_serialized_form_is_bitsandbytes_byte_for_byte(dtype, compress):
    w = randn(96, 256, dtype=dtype)
    _, bnb_state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=compress, quant_type="nf4")
    theirs = bnb_state.as_dict(packed=True)
    ours = from_bnb_quant_state(bnb_state).as_dict(packed=True)
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    # Each side reads the other's dict.
    assert bnb_f.QuantState.from_dict(dict(ours), device="cpu") == bnb_state
    back = QuantState.from_dict(dict(theirs))
    assert torch.equal(back.absmax, bnb_state.absmax) and back.shape == bnb_state.shape
    # Our own quantization serializes to the same keys, dtypes and shapes (values: tests/ops/test_nf4_bnb.py).
    _, state = quantize_nf4(w, 64, compress)
    mine = state.as_dict(packed=True)
    assert [(k, v.dtype, v.shape) for k, v in mine.items() if k != "quant_state.bitsandbytes__nf4"] == \
        [(k, v.dtype, v.shape) for k, v in theirs.items() if k != "quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_quant_state_conversions(compress):
    packed, state = quantize_nf4(randn(40, 96, dtype=torch.bfloat16), 32, compress)
    theirs = to_bnb_quant_state(state)
    assert isinstance(theirs, bnb_f.QuantState) and theirs.nested == compress
    assert torch.equal(_bits(bnb_f.dequantize_4bit(packed, theirs)), _bits(dequantize_nf4(packed, state)))
    assert from_bnb_quant_state(theirs).as_dict(packed=True).keys() == state.as_dict(packed=True).keys()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
def test_quantize_linear_to_bnb(dtype, compress, quant_storage, monkeypatch):
    linear = torch.nn.Linear(96, 40).to(dtype)

    def forbidden(*args, **kwargs):
        raise AssertionError("quantize_linear_to_bnb must not call bitsandbytes' quantizer")

    monkeypatch.setattr(bnb_f, "quantize_4bit", forbidden)
    monkeypatch.setattr(bnb_f, "quantize_blockwise", forbidden)
    module = quantize_linear_to_bnb(linear, 64, compress, quant_storage)
    assert isinstance(module, bnb.nn.Linear4bit) and isinstance(module.weight, bnb.nn.Params4bit)
    wp = module.weight
    assert wp.bnb_quantized and wp.quant_type == "nf4" and wp.blocksize == 64 and not wp.requires_grad
    assert wp.compress_statistics == compress and wp.dtype == quant_storage and module.quant_state is wp.quant_state
    sd = module.state_dict()
    want = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    want += ["weight.nested_absmax", "weight.nested_quant_map"] if compress else []
    assert list(sd) == want + ["weight.quant_state.bitsandbytes__nf4"]
    assert sd["weight.absmax"].dtype == (torch.uint8 if compress else torch.float32)
    # bitsandbytes reads back exactly our weight, and runs it.
    dense = bnb_f.dequantize_4bit(wp, wp.quant_state)
    assert torch.equal(_bits(dense), _bits(dequantize_bnb_weight(wp)))
    assert ((dense.float() - linear.weight.float()).norm() / linear.weight.float().norm()).item() < 0.12
    x = randn(5, 96, dtype=dtype)
    with torch.no_grad():
        y = module(x)
        ref = torch.nn.functional.linear(x.float(), dense.float(), linear.bias.float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_checkpoint_reloads_through_from_prequantized(compress):
    """What transformers does with a prequantized checkpoint: Params4bit.from_prequantized on the saved keys."""
    module = quantize_linear_to_bnb(torch.nn.Linear(64, 48).to(torch.bfloat16), 32, compress)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    reloaded = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(_bits(dequantize_bnb_weight(reloaded)), _bits(dequantize_bnb_weight(module.weight)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_dequantize_bnb_quantized_weight(dtype, compress):
    """A Linear4bit that bitsandbytes itself quantized (on .to(device)), dequantized by our kernel."""
    linear = torch.nn.Linear(128, 24).to(dtype)
    module = bnb.nn.Linear4bit(128, 24, compress_statistics=compress, quant_type="nf4")
    module.load_state_dict(linear.state_dict())
    module = module.to("cpu")
    assert module.weight.bnb_quantized
    ours = dequantize_bnb_weight(module.weight)
    assert torch.equal(_bits(ours), _bits(bnb_f.dequantize_4bit(module.weight, module.weight.quant_state)))
    dense = linear_from_bnb(module)
    assert isinstance(dense, torch.nn.Linear) and torch.equal(dense.weight, ours) and dense.bias is not None
    with pytest.raises(ValueError, match="has no quant_state"):
        dequantize_bnb_weight(torch.nn.Parameter(torch.zeros(3)))


def test_peft_sees_a_standard_linear4bit():
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = quantize_linear_to_bnb(torch.nn.Linear(96, 40).to(torch.bfloat16))
            self.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes-quantized model

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["proj"]))
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    assert isinstance(model.base_model.model.proj, LoraLinear4bit)
    y = model(randn(3, 96, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert model.base_model.model.proj.lora_B["default"].weight.grad is not None
