"""QuantState and quantize_nf4/dequantize_nf4 without bitsandbytes: fields, the serialized form (keys, JSON blob,
prefixes), round trips, quant_storage, and errors for malformed states."""
from __future__ import annotations

import json

import pytest
import torch

from swiftlora.ops.nf4 import nf4_dequantize, nf4_quantize
from swiftlora.quant import QuantState, dequantize_nf4, quantize_nf4
from tests.helpers import DEVICES, DTYPES, randn

PACKED_KEYS = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_quantize_nf4_fields_and_round_trip(device, dtype, compress):
    w = randn(96, 256, dtype=dtype, device=device)
    packed, state = quantize_nf4(w, 64, compress)
    assert packed.shape == (96 * 256 // 2, 1) and packed.dtype == torch.uint8
    assert state.shape == (96, 256) and state.dtype == dtype and state.blocksize == 64 and state.nested == compress
    assert state.quant_type == "nf4" and state.absmax.numel() == 384
    if compress:
        assert state.absmax.dtype == torch.uint8 and state.state2.absmax.shape == (2,)
        assert state.offset.shape == () and state.state2.blocksize == 256 and state.state2.dtype == torch.float32
    q = nf4_quantize(w, 64, compress)
    y = dequantize_nf4(packed, state)
    assert y.dtype == dtype and y.shape == w.shape
    assert torch.equal(y, nf4_dequantize(*q, blocksize=64, shape=w.shape, dtype=dtype))


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_as_dict_packed_form(compress):
    _, state = quantize_nf4(randn(96, 256, dtype=torch.bfloat16), 64, compress)
    d = state.as_dict(packed=True)
    assert list(d) == (PACKED_KEYS if compress else [PACKED_KEYS[0], PACKED_KEYS[1], PACKED_KEYS[4]])
    blob = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].numpy()).decode())
    want = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 256]}
    if compress:
        want.update(nested_blocksize=256, nested_dtype="float32", nested_offset=state.offset.item())
    assert blob == want and list(blob) == list(want)  # bitsandbytes' key order
    assert d["quant_state.bitsandbytes__nf4"].dtype == torch.uint8
    if compress:  # a copy: safetensors refuses tensors that share storage
        assert d["nested_quant_map"].data_ptr() != state.state2.code.data_ptr()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("packed_form", [True, False], ids=["packed", "unpacked"])
def test_from_dict_round_trip_with_checkpoint_prefix(compress, packed_form):
    w = randn(40, 96, dtype=torch.float16)
    packed, state = quantize_nf4(w, 32, compress)
    prefix = "model.layers.0.mlp.up_proj.weight."
    d = {prefix + k: v for k, v in state.as_dict(packed=packed_form).items()}
    back = QuantState.from_dict(d)
    assert back.as_dict(packed=True).keys() == state.as_dict(packed=True).keys()
    for k, v in state.as_dict(packed=True).items():
        assert torch.equal(v, back.as_dict(packed=True)[k]), k
    assert torch.equal(dequantize_nf4(packed, back), dequantize_nf4(packed, state))
    assert back.offset is None or (back.offset.dtype == torch.float32 and torch.equal(back.offset, state.offset))


def test_quant_storage_views_the_same_bytes():
    w = randn(64, 96, dtype=torch.bfloat16)
    packed_u8, state = quantize_nf4(w, 64)
    packed_bf16, state_bf16 = quantize_nf4(w, 64, quant_storage=torch.bfloat16)
    assert packed_bf16.dtype == torch.bfloat16 and packed_bf16.shape == (64 * 96 // 4, 1)
    assert torch.equal(packed_bf16.reshape(-1).view(torch.uint8), packed_u8.reshape(-1))
    assert torch.equal(dequantize_nf4(packed_bf16, state_bf16), dequantize_nf4(packed_u8, state))
    with pytest.raises(ValueError, match="do not fill whole torch.float32 elements"):
        quantize_nf4(randn(3, 2), 64, quant_storage=torch.float32)
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        quantize_nf4(w, 64, quant_storage=torch.int64)


def test_malformed_states_raise_clear_errors():
    _, state = quantize_nf4(randn(40, 96), 32, True)
    d = state.as_dict(packed=True)
    with pytest.raises(ValueError, match="expected a packed 'quant_state.bitsandbytes__nf4' tensor"):
        QuantState.from_dict({"absmax": d["absmax"]})
    fp4 = dict(d)
    blob = json.loads(bytes(fp4.pop("quant_state.bitsandbytes__nf4").numpy()).decode())
    blob["quant_type"] = "fp4"
    fp4["quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        QuantState.from_dict(fp4)
    bad_json = dict(d)
    bad_json["quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0x7B], dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not hold UTF-8 JSON"):
        QuantState.from_dict(bad_json)
    missing = dict(d)
    del missing["nested_quant_map"]
    with pytest.raises(ValueError, match="nested state without key 'nested_quant_map'"):
        QuantState.from_dict(missing)
    short = dict(d)
    short["absmax"] = d["absmax"][:-1]
    with pytest.raises(ValueError, match="absmax must be torch.uint8 with 120 elements"):
        QuantState.from_dict(short)
    unknown = dict(d)
    unknown["absmax_extra"] = d["absmax"]
    with pytest.raises(ValueError, match=r"unknown keys \['absmax_extra'\]"):
        QuantState.from_dict(unknown)
    state.blocksize = 48
    with pytest.raises(ValueError, match="blocksize must be a power of two in 32..4096, got 48"):
        state.validate()
