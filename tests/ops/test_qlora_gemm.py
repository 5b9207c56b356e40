"""qlora_gemm (one NF4 projection's forward with its LoRA term; the sm_90a kernel with in-GEMM dequantization on
H100/H200) against its float64 reference, and the qlora ops' default plan, which runs the same kernel from C++ in
their forward (one launch per projection into its columns of the output)."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import lora_mlp, lora_mlp_reference, lora_qkv, lora_reference, qlora_gemm, qlora_gemm_reference, qlora_linear, qlora_plan
from tests.helpers import DEVICES, DTYPES, assert_close, cuda_kernels_run, randn
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
def test_qlora_linear_default_plan_matches_reference(device, dtype):
    proj = random_projection(200, 128, 16, "nf4", dtype, torch.float32, device, bias=True)
    x = randn(2, 37, 128, dtype=dtype, device=device, requires_grad=True)
    grad = randn(2, 37, 200, dtype=dtype, device=device)
    runs = reference_runs(lambda x_, ps, m: lora_reference(x_, ps[0]), x, [proj], [grad])
    y = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale, proj.bias)
    y.backward(grad)
    check_against_reference([y], x, [proj], runs, f"default plan {dtype}")


def _fused_kernel_launches(fn) -> int:
    return sum("qlora_gemm_ws_kernel" in name for name in cuda_kernels_run(fn))


def _sm90a() -> bool:
    import swiftlora

    return torch.cuda.get_device_capability() == (9, 0) and "90a" in swiftlora.compiled_arches()


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [(16, 16, 16), (8, 16, 32), (16, 12, 16)], ids=str)
def test_cuda_default_plan_projections(ranks):
    # q, k, v of different widths and ranks, a bias on one, dropout on one: on sm_90a one fused launch per
    # projection (rank 12 is not a multiple of 8: the whole call takes the dequantize + cuBLAS panel), each
    # output and gradient against the float64 reference; qlora_plan(chunks=1) never launches the fused kernel.
    dt = torch.bfloat16
    widths = (512, 128, 136)
    projs = [random_projection(n, 256, r, "nf4", dt, dt, "cuda", bias=i == 1) for i, (n, r) in
             enumerate(zip(widths, ranks))]
    x = randn(3, 90, 256, dtype=dt, device="cuda", requires_grad=True)
    masks = [None, torch.rand(3, 90, 256, device="cuda") > 0.1, None]
    grads = [randn(3, 90, n, dtype=dt, device="cuda") for n in widths]

    def ref(x_, ps, m):
        return tuple(lora_reference(x_, p, mk, 0.1) for p, mk in zip(ps, m))

    runs = reference_runs(ref, x, projs, grads, masks)
    outs = lora_qkv(x, *projs, dropout_p=0.1, dropout_masks=masks)
    torch.autograd.backward(outs, grads)
    check_against_reference(outs, x, projs, runs, f"lora_qkv ranks {ranks}")
    if not _sm90a():
        return
    expect = 0 if 12 in ranks else 3
    with torch.no_grad():
        assert _fused_kernel_launches(lambda: lora_qkv(x, *projs, dropout_masks=masks, dropout_p=0.1)) == expect
        with qlora_plan(chunks=1):
            assert _fused_kernel_launches(lambda: lora_qkv(x, *projs, dropout_masks=masks, dropout_p=0.1)) == 0


@pytest.mark.gpu
def test_cuda_default_plan_lora_mlp_matches_v1():
    # The block's forward through the fused kernel (gate and up into the two halves of one buffer, down) against
    # the version-1 plan and the float64 reference; the backward is the same path in both.
    dt = torch.bfloat16
    gate, up = (random_projection(384, 256, 16, "nf4", dt, dt, "cuda") for _ in range(2))
    down = random_projection(256, 384, 16, "nf4", dt, dt, "cuda", bias=True)
    x = randn(300, 256, dtype=dt, device="cuda", requires_grad=True)
    grad = randn(300, 256, dtype=dt, device="cuda")
    runs = reference_runs(lambda x_, ps, m: lora_mlp_reference(x_, *ps), x, [gate, up, down], [grad])
    y = lora_mlp(x, gate, up, down)
    y.backward(grad)
    check_against_reference([y], x, [gate, up, down], runs, "lora_mlp default plan")
    with torch.no_grad(), qlora_plan(chunks=1):
        y1 = lora_mlp(x, gate, up, down)
    assert_close(y.detach(), runs["64"][0], y1, what="lora_mlp default plan vs version 1")
    if _sm90a():
        with torch.no_grad():
            assert _fused_kernel_launches(lambda: lora_mlp(x, gate, up, down)) == 3


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


# The sm_90a kernel's variants (SWIFTLORA_QLORA_GEMM_VARIANT): the block scale in fp32 or in 16 bits (held to the
# same error bound as the exact ones; M = 1 has a tensor map whose row pitch is not x's stride), on the 256 x 128
# tile (tma, tma16) and the 128-feature x 256-token tile (tmaw, tma16w). Shapes cross
# the tiles' edges, more tiles than SMs (the persistent loop and the stage ring's phases wrapping across tiles),
# R = 0 / 8 / 16 / 48 / 64, plain and double-quantized absmax.
VARIANT_SHAPES = [(3, 64, 40, 16), (130, 256, 200, 8), (64, 128, 129, 64), (9, 192, 72, 0), (1000, 1024, 1100, 16),
                  (2048, 512, 4352, 16), (1024, 256, 8200, 0), (257, 4096, 4096, 48), (129, 320, 264, 24),
                  (1, 128, 300, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["tma", "tma16", "tmaw", "tma16w"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=str)
def test_cuda_kernel_variants(monkeypatch, variant, dtype, shape):
    monkeypatch.setenv("SWIFTLORA_QLORA_GEMM_VARIANT", variant)
    x, w, xa, lb, b = _inputs(shape, dtype, "cuda", bias=shape[1] % 128 == 0)
    _check(x, w, xa, lb, b, f"{variant} {dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["tma", "tma16w"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_blocksizes(monkeypatch, variant, blocksize, nested):
    monkeypatch.setenv("SWIFTLORA_QLORA_GEMM_VARIANT", variant)
    w = random_nf4(264, 4096, blocksize, nested=nested, device="cuda")
    x = randn(200, 4096, dtype=torch.bfloat16, device="cuda")
    xa = randn(200, 16, dtype=torch.bfloat16, device="cuda")
    lb = randn(264, 16, dtype=torch.bfloat16, device="cuda", scale=0.5)
    _check(x, w, xa, lb, None, f"{variant} blocksize {blocksize} nested {nested}")


@pytest.mark.gpu
def test_cuda_variant_knob_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SWIFTLORA_QLORA_GEMM_VARIANT", "fastest")
    x, w, xa, lb, b = _inputs((8, 64, 40, 16), torch.bfloat16, "cuda", bias=False)
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the knob is read only where the sm_90a kernels run")
    with pytest.raises(RuntimeError, match="SWIFTLORA_QLORA_GEMM_VARIANT must be tma, tma16, tmaw or tma16w"):
        qlora_gemm(x, w, xa, lb, b)
