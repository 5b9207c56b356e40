"""qlora_gemm (one NF4 projection's forward with its LoRA term; the sm_90a kernel with in-GEMM dequantization on
H100/H200) against its float64 reference, and qlora_linear(fused=True) end to end."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import lora_reference, qlora_gemm, qlora_gemm_reference, qlora_linear
from tests.helpers import DEVICES, DTYPES, assert_close, randn
from tests.ops.lora_helpers import check_against_reference, random_nf4, random_projection, reference_runs

# (rows, K, N, R): K % 64 == 0 with M and N not multiples of the 128 x 128 tile (the sm_90a kernel's edges), R = 16
# and 64 (its limit), R = 0 (no LoRA term); K = 200 and R = 12 take the unfused path everywhere.
SHAPES = [(3, 64, 40, 16), (130, 256, 200, 8), (64, 128, 129, 64), (5, 200, 48, 12), (9, 192, 72, 0)]


def _inputs(shape, dtype, device, bias):
    m, k, n, r = shape
    w = random_nf4(n, k, 64, nested=True, device=device)
    x = randn(m, k, dtype=dtype, device=device)
    xa = randn(m, r, dtype=dtype, device=device) if r else None
    lb = randn(n, r, dtype=dtype, device=device, scale=0.5) if r else None
    b = randn(n, dtype=dtype, device=device) if bias else None
    return x, w, xa, lb, b


def _check(x, w, xa, lb, b, what):
    y = qlora_gemm(x, w, xa, lb, b)
    ref64 = qlora_gemm_reference(x.double(), w, None if xa is None else xa.double(),
                                 None if lb is None else lb.double(), None if b is None else b.double())
    assert_close(y, ref64, qlora_gemm_reference(x, w, xa, lb, b), what=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, shape):
    _check(*_inputs(shape, dtype, device, bias=shape[0] % 2 == 1), f"{dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1000, 1024, 1100, 16), (4096, 4096, 640, 16), (257, 4096, 4096, 48)], ids=str)
def test_cuda_model_sized(dtype, shape):
    # Many k-tiles and CTAs through the sm_90a kernel (on other GPUs the unfused path): against the reference.
    _check(*_inputs(shape, dtype, "cuda", bias=True), f"cuda {dtype} {shape}")


@pytest.mark.gpu
def test_cuda_strided_and_plain_absmax():
    w = random_nf4(300, 512, 128, nested=False, device="cuda")
    x = randn(70, 1024, dtype=torch.bfloat16, device="cuda")[:, :512]  # row stride 1024
    xa = randn(70, 32, dtype=torch.bfloat16, device="cuda")
    lb = randn(300, 32, dtype=torch.bfloat16, device="cuda")
    _check(x, w, xa, lb, None, "strided x, fp32 absmax")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qlora_linear_fused_matches_reference(device, dtype):
    proj = random_projection(200, 128, 16, "nf4", dtype, torch.float32, device, bias=True)
    x = randn(2, 37, 128, dtype=dtype, device=device, requires_grad=True)
    grad = randn(2, 37, 200, dtype=dtype, device=device)
    runs = reference_runs(lambda x_, ps, m: lora_reference(x_, ps[0]), x, [proj], [grad])
    y = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale, proj.bias, fused=True)
    y.backward(grad)
    check_against_reference([y], x, [proj], runs, f"fused {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    x, w, xa, lb, b = _inputs((5, 128, 72, 16), dtype, device, bias=True)
    torch.library.opcheck(torch.ops.swiftlora.qlora_gemm, (x, *w.tensors(), 64, 72, xa, lb, b))
    torch.library.opcheck(torch.ops.swiftlora.qlora_gemm, (x, *w.tensors(), 64, 72, None, None, None))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    x, w, xa, lb, _ = _inputs((5, 128, 72, 16), torch.bfloat16, device, bias=False)
    op = torch.ops.swiftlora.qlora_gemm
    with pytest.raises(ValueError, match="xa and lora_b go together"):
        op(x, *w.tensors(), 64, 72, xa, None, None)
    with pytest.raises(ValueError, match=r"lora_b must be \[72, R\]"):
        op(x, *w.tensors(), 64, 72, xa, lb[:71], None)
    with pytest.raises(ValueError, match=r"xa must be \[..., 16\] with x's 5 rows"):
        op(x, *w.tensors(), 64, 72, xa[:4], lb, None)
    with pytest.raises(TypeError, match="xa must have the dtype of x"):
        op(x, *w.tensors(), 64, 72, xa.float(), lb, None)
    with pytest.raises(ValueError, match=r"packed must hold \(n \+ 1\) / 2"):
        op(x, *w.tensors(), 64, 73, None, None, None)
    with pytest.raises(ValueError, match=r"bias must be \[72\]"):
        op(x, *w.tensors(), 64, 72, None, None, torch.zeros(7, device=device))
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        qlora_gemm(x, x, None, None)


# The sm_90a kernel's variants (SWIFTLORA_QLORA_GEMM_VARIANT): two / one k16 steps per commit group, the 16-bit
# scale multiply (held to the same error bound as the exact ones), both fed by TMA boxes (tma, tma16; M = 1 has a
# tensor map whose row pitch is not x's stride), and the 128-feature x 256-token tile (tmaw, tma16w). Shapes cross
# the tiles' edges, more tiles than SMs (the persistent loop and the stage ring's phases wrapping across tiles),
# R = 0 / 8 / 16 / 48 / 64, plain and double-quantized absmax.
VARIANT_SHAPES = [(3, 64, 40, 16), (130, 256, 200, 8), (64, 128, 129, 64), (9, 192, 72, 0), (1000, 1024, 1100, 16),
                  (2048, 512, 4352, 16), (1024, 256, 8200, 0), (257, 4096, 4096, 48), (129, 320, 264, 24),
                  (1, 128, 300, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["ws", "ws1", "ws16", "tma", "tma16", "tmaw", "tma16w"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=str)
def test_cuda_kernel_variants(monkeypatch, variant, dtype, shape):
    monkeypatch.setenv("SWIFTLORA_QLORA_GEMM_VARIANT", variant)
    x, w, xa, lb, b = _inputs(shape, dtype, "cuda", bias=shape[1] % 128 == 0)
    _check(x, w, xa, lb, b, f"{variant} {dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_ws_blocksizes(monkeypatch, blocksize, nested):
    monkeypatch.setenv("SWIFTLORA_QLORA_GEMM_VARIANT", "ws")
    w = random_nf4(264, 4096, blocksize, nested=nested, device="cuda")
    x = randn(200, 4096, dtype=torch.bfloat16, device="cuda")
    xa = randn(200, 16, dtype=torch.bfloat16, device="cuda")
    lb = randn(264, 16, dtype=torch.bfloat16, device="cuda", scale=0.5)
    _check(x, w, xa, lb, None, f"ws blocksize {blocksize} nested {nested}")


@pytest.mark.gpu
def test_cuda_variant_knob_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SWIFTLORA_QLORA_GEMM_VARIANT", "fastest")
    x, w, xa, lb, b = _inputs((8, 64, 40, 16), torch.bfloat16, "cuda", bias=False)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the knob is read only where the sm_90a kernels run")
    with pytest.raises(RuntimeError, match="SWIFTLORA_QLORA_GEMM_VARIANT must be ws, ws1, ws16, tma, tma16, tmaw or"):
        qlora_gemm(x, w, xa, lb, b)
