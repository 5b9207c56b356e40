"""gguf_quantize: byte equality with llama.cpp's own quantizer (all types) and gguf-py's numpy quantizers (the
32-blocks), on random and adversarial rows; CUDA bytes equal CPU bytes; the PyTorch decoder; opcheck; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from swiftlora.ops.gguf_quant import GGUF_QUANT_TYPES, gguf_dequantize_reference, gguf_quantize
from tests.helpers import DEVICES, DTYPES
from tests.llama_cpp_oracle import ggml_quantize

TYPES = list(GGUF_QUANT_TYPES)
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# Round-trip relative error on N(0, 1) rows of 8192 elements: measured ranges (20 draws) times ~1.1, so a wrong
# scale or a mispacked code fails even where no byte oracle exists.
MAX_ROUNDTRIP_ERR = {"Q8_0": 0.006, "Q6_K": 0.020, "Q5_K": 0.040, "Q5_1": 0.043, "Q5_0": 0.048, "Q4_K": 0.080,
                     "Q4_1": 0.088, "Q4_0": 0.096, "Q3_K": 0.167, "Q2_K": 0.330}


def adversarial_rows(n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 rows of n (a multiple of 256) elements, one pattern per row: the edge cases of the reference's
    searches (zero and constant groups, ties, outliers, fp16 scale overflow/underflow, subnormals)."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    grid = torch.arange(n, dtype=torch.float32)
    rows = [
        torch.zeros(n),
        torch.full((n,), 0.37), torch.full((n,), -2.5),                              # constant blocks
        torch.where(grid % 97 == 5, 1000.0, 0.01 * r(n)),                            # one outlier per block
        r(n) * 1e-30, r(n) * 1e-40, r(n) * 1e-16, r(n) * 1e12,                       # tiny, subnormal, huge
        ((grid * 7) % 16 - 8) * 0.25,                                                # exact grid: rounding ties
        torch.where(grid % 2 == 0, 1.0, -1.0),                                       # |max| ties of both signs
        torch.where(grid % 32 < 16, 0.0, r(n)),                                      # every other 16-group zero
        torch.where(grid % 256 < 128, 0.0, r(n)),                                    # half super-block zero
        r(n) * 10.0 ** (grid // 16 % 9 - 4),                                         # sub-block scales 1e-4..1e4
        torch.where(grid % 64 == 0, -3.0, torch.where(grid % 64 == 1, 3.0, r(n))),   # ±max in one group
        r(n).abs() + 5.0, -r(n).abs() - 5.0,                                         # one-signed, far from 0
        (r(n) * 100).round() / 64,                                                   # many exact halves
        torch.where(grid % 16 == 3, 65504.0, r(n)),                                  # fp16 max
        r(n).to(torch.bfloat16).float(),
    ]
    return torch.stack(rows)


def _check_bytes(ours: torch.Tensor, ref: np.ndarray, what: str):
    ours = ours.cpu().numpy()
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    bad = np.argwhere(ours != ref)
    assert bad.size == 0, f"{what}: {len(bad)} bytes differ, first at row/byte {bad[0].tolist()}"


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_legacy_types_equal_gguf_py(name, dtype):
    gguf = pytest.importorskip("gguf")
    x = (torch.randn(7, 96 * 4) * 3).to(dtype)
    tid = GGUF_QUANT_TYPES[name][0]
    _check_bytes(gguf_quantize(x, name), gguf.quants.quantize(x.float().numpy(), tid), f"{name} {dtype}")


@pytest.mark.parametrize("name", TYPES)
def test_all_types_equal_llama_cpp_random(name):
    tid, _, _ = GGUF_QUANT_TYPES[name]
    x = torch.randn(48, 1024) * torch.rand(48, 1) * 4
    q = gguf_quantize(x, name)
    _check_bytes(q, ggml_quantize(x.numpy(), tid, q.shape[1]), f"{name} random")


@pytest.mark.parametrize("name", TYPES)
def test_all_types_equal_llama_cpp_adversarial(name):
    tid, _, _ = GGUF_QUANT_TYPES[name]
    x = adversarial_rows(512, torch.Generator().manual_seed(int(torch.randint(1 << 30, ()))))
    q = gguf_quantize(x, name)
    _check_bytes(q, ggml_quantize(x.numpy(), tid, q.shape[1]), f"{name} adversarial")


@pytest.mark.parametrize("name", TYPES)
def test_decoder_matches_gguf_py_and_error_is_calibrated(name):
    gguf = pytest.importorskip("gguf")
    tid, _, _ = GGUF_QUANT_TYPES[name]
    x = torch.randn(16, 512)
    q = gguf_quantize(x, name)
    ours = gguf_dequantize_reference(q, name)
    np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(q.numpy(), tid))
    err = ((ours - x).norm() / x.norm()).item()
    assert err < MAX_ROUNDTRIP_ERR[name], f"{name}: round-trip error {err:.4f} >= {MAX_ROUNDTRIP_ERR[name]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K"])
def test_strided_and_batched_inputs(device, name):
    base = torch.randn(3, 5, 600, device=device)
    view = base[..., 40:552]  # row stride 600, offset 40: not 16-byte aligned on the device (scalar loads)
    out = gguf_quantize(view, name)
    assert out.shape[:2] == (3, 5)
    assert torch.equal(out, gguf_quantize(view.contiguous(), name))
    t = torch.randn(512, 4, device=device).t()  # no unit stride: copied
    assert torch.equal(gguf_quantize(t, name), gguf_quantize(t.contiguous(), name))


@pytest.mark.gpu
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_bytes_equal_cpu(name, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    x = torch.cat([torch.randn(37, 1024, generator=gen) * 3, adversarial_rows(1024, gen)])
    if dtype == torch.float16:  # the adversarial rows' huge values would become inf, which GGUF rejects
        x = x.clamp(-65504, 65504)
    x = x.to(dtype)
    cpu = gguf_quantize(x, name)
    for view in (x.cuda(), torch.nn.functional.pad(x, (8, 0)).cuda()[:, 8:]):  # aligned and unaligned rows
        gpu = gguf_quantize(view, name)
        torch.cuda.synchronize()
        _check_bytes(gpu, cpu.numpy(), f"{name} {dtype} cuda vs cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Q5_0", "Q3_K"])
def test_opcheck(device, name):
    x = torch.randn(4, 512, device=device)
    torch.library.opcheck(torch.ops.swiftlora.gguf_quantize, (x, GGUF_QUANT_TYPES[name][0]))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    x = torch.randn(4, 512, device=device)
    with pytest.raises(ValueError, match="unknown qtype 'q7_k'"):
        gguf_quantize(x, "q7_k")
    with pytest.raises(ValueError, match="qtype must be a ggml type id"):
        torch.ops.swiftlora.gguf_quantize(x, 9)
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_quantize(x[:, :480], "Q4_K")
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_quantize(x[:, :33], "Q8_0")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        gguf_quantize(x.to(torch.int32), "Q8_0")
    y = x.clone()
    y[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        gguf_quantize(y, "Q8_0")
