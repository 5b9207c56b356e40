"""qlora_linear against its float64 reference built from the dequantized weight: values, grad_x, grad_A, grad_B
(grad_bias), NF4 (plain and double-quantized absmax) and dense bases, both GEMM plans, dropout, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import LoRAProjection, NF4Weight, dropout_masks, lora_reference, qlora_linear
from tests.helpers import DEVICES, DTYPES, assert_close, randn
from tests.ops.lora_helpers import (check_against_reference, random_base, random_nf4, random_projection,
                                    reference_runs)

# (rows of x, K, N, r, blocksize). K < N takes the one-GEMM panel plan, K >= N the lora-first plan. K = 200 and 37
# are not multiples of the blocksize (blocks straddle rows), 37 is odd (rows start mid-byte); M = 1 (decode).
# rows·r >= 64: see tests/ops/test_lora_blocks.py (the 2x rule on grad_A/grad_B needs that many samples).
SHAPES = [(1, 64, 96, 64, 64), (7, 200, 96, 10, 64), (5, 37, 70, 13, 32), (9, 128, 300, 16, 128), (16, 96, 40, 5, 64),
          (16, 256, 64, 4, 4096)]
LORA_DTYPES = [torch.float32, torch.bfloat16]


def _single(p_drop=0.0):
    return lambda x, ps, m: lora_reference(x, ps[0], None if m is None else m[0], p_drop)


def _run(x, proj, grad, **kw):
    y = qlora_linear(x, proj.base, proj.lora_a, proj.lora_b, proj.scale, proj.bias, **kw)
    y.backward(grad)
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora_dtype", LORA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("base", ["nf4", "nf4_plain", "dense"])
def test_matches_reference(device, dtype, lora_dtype, shape, base):
    m, k, n, r, bs = shape
    proj = random_projection(n, k, r, base, dtype, lora_dtype, device, bias=m % 2 == 1, blocksize=bs)
    x = randn(m, k, dtype=dtype, device=device, requires_grad=True)
    grad = randn(m, n, dtype=dtype, device=device)
    runs = reference_runs(_single(), x, [proj], [grad])
    y = _run(x, proj, grad)
    check_against_reference([y], x, [proj], runs, f"{base} {dtype} lora {lora_dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_and_strided_input(device, dtype):
    proj = random_projection(48, 80, 12, "nf4", dtype, torch.float32, device)
    for x in (randn(2, 3, 80, dtype=dtype, device=device), randn(80, 6, dtype=dtype, device=device).t()):
        x = x.requires_grad_()
        grad = randn(*x.shape[:-1], 48, dtype=dtype, device=device)
        runs = reference_runs(_single(), x, [proj], [grad])
        for t in (proj.lora_a, proj.lora_b):
            t.grad = None
        y = _run(x, proj, grad)
        check_against_reference([y], x, [proj], runs, f"x strides {x.stride()}")


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_input_and_partial_grads(device):
    proj = random_projection(64, 32, 16, "nf4", torch.bfloat16, torch.float32, device)
    proj.lora_a.requires_grad_(False)
    x = randn(5, 32, dtype=torch.bfloat16, device=device)  # e.g. the embeddings: no grad_x
    grad = randn(5, 64, dtype=torch.bfloat16, device=device)
    runs = reference_runs(_single(), x, [proj], [grad])
    y = _run(x, proj, grad)
    check_against_reference([y], x, [proj], runs, "frozen x and A")
    assert proj.lora_a.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(6, 40, 72), (6, 72, 40)], ids=["panel", "lora_first"])
def test_dropout_with_given_mask(device, dtype, shape):
    m, k, n = shape
    proj = random_projection(n, k, 12, "nf4", dtype, torch.float32, device)
    x = randn(m, k, dtype=dtype, device=device, requires_grad=True)
    grad = randn(m, n, dtype=dtype, device=device)
    mask = dropout_masks(x, 0.3, 1)[0]
    assert 0 < mask.sum() < mask.numel()
    runs = reference_runs(_single(0.3), x, [proj], [grad], masks=[mask])
    y = _run(x, proj, grad, dropout_p=0.3, dropout_mask=mask)
    check_against_reference([y], x, [proj], runs, f"dropout {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_zero_is_exact_and_generator_reproduces(device):
    proj = random_projection(40, 24, 4, "nf4", torch.bfloat16, torch.bfloat16, device)
    x = randn(8, 24, dtype=torch.bfloat16, device=device)
    args = (x, proj.base, proj.lora_a, proj.lora_b, proj.scale)
    with torch.no_grad():
        plain = qlora_linear(*args)
        assert torch.equal(qlora_linear(*args, dropout_p=0.0), plain)
        assert torch.equal(qlora_linear(*args, dropout_p=0.0, dropout_mask=torch.ones_like(x, dtype=torch.bool)),
                           plain)
        gen = torch.Generator(device=device)
        y1 = qlora_linear(*args, dropout_p=0.5, generator=gen.manual_seed(7))
        mask = dropout_masks(x, 0.5, 1, gen.manual_seed(7))[0]
        assert torch.equal(qlora_linear(*args, dropout_p=0.5, dropout_mask=mask), y1)
        assert not torch.equal(y1, plain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantized_base_only(device, blocksize, dtype):
    # LoRA factors of ~0 leave x @ Wᵀ: the kernel's dequantization against the plain-PyTorch one, bit for bit
    # through an identity input.
    w = random_nf4(33, 70, blocksize, nested=blocksize != 64, device=device)
    eye = torch.eye(70, dtype=dtype, device=device)
    a = torch.zeros(1, 70, device=device)
    b = torch.zeros(33, 1, device=device)
    with torch.no_grad():
        y = qlora_linear(eye, w, a, b)
    assert torch.equal(y, w.dequantize(dtype).t())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_rows_take_nf4_gemv(device, dtype):
    # <= 16 rows of 16-bit x: the base term is nf4_gemv's (W not rounded to x's dtype), the LoRA term added after.
    from swiftlora.ops.nf4 import nf4_gemv

    w = random_nf4(96, 64, 64, nested=True, device=device)
    x = randn(2, 5, 64, dtype=dtype, device=device)
    a, b = torch.zeros(1, 64, device=device), torch.zeros(96, 1, device=device)
    with torch.no_grad():
        y = qlora_linear(x, w, a, b)
    assert torch.equal(y, nf4_gemv(x, *w.tensors(), blocksize=64, out_features=96))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (3, 40, 72)), (torch.float16, (3, 40, 72)),
                                              (torch.bfloat16, (3, 40, 72)), (torch.bfloat16, (3, 72, 40))],
                         ids=["fp32-panel", "fp16-panel", "bf16-panel", "bf16-lora_first"])
def test_opcheck(device, dtype, shape):
    m, k, n = shape
    projs = [random_projection(n, k, 3, kind, dtype, torch.float32, device, bias=True)
             for kind in ("nf4", "nf4_plain")]
    x = randn(m, k, dtype=dtype, device=device, requires_grad=True)
    masks = [dropout_masks(x, 0.25, 1)[0], None]
    args = _op_args(projs)
    torch.library.opcheck(torch.ops.swiftlora.qlora_linear, (x, *args, [p.bias for p in projs], masks, 1 / 0.75))
    torch.library.opcheck(torch.ops.swiftlora.qlora_linear, (x, *args, [], [], 1.0))
    g = randn(m, 2 * n, dtype=dtype, device=device)
    frozen = [[t.detach() for t in a] if i in (7, 8) else a for i, a in enumerate(args, start=1)]
    torch.library.opcheck(torch.ops.swiftlora.qlora_linear_backward, (g, *frozen, masks, 1 / 0.75))


def _op_args(projs):
    from swiftlora.ops.lora_weights import op_lists

    return op_lists(projs)


@pytest.mark.parametrize("device", DEVICES)
def test_op_autograd_called_directly(device):
    # torch.ops.swiftlora.qlora_linear's own autograd registration (what torch.compile sees).
    proj = random_projection(50, 30, 4, "nf4", torch.float32, torch.float32, device, bias=True)
    x = randn(6, 30, device=device, requires_grad=True)
    grad = randn(6, 50, device=device)
    runs = reference_runs(_single(), x, [proj], [grad])
    y, _ = torch.ops.swiftlora.qlora_linear(x, *_op_args([proj]), [proj.bias], [], 1.0)
    y.backward(grad)
    check_against_reference([y], x, [proj], runs, "op autograd")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    p = random_projection(40, 24, 4, "nf4", torch.bfloat16, torch.float32, device)
    x = randn(3, 24, dtype=torch.bfloat16, device=device)
    w, a, b = p.base, p.lora_a.detach(), p.lora_b.detach()
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        qlora_linear(x.to(torch.int32), w, a, b)
    with pytest.raises(TypeError, match="x must be a tensor"):
        qlora_linear([1.0], w, a, b)
    with pytest.raises(ValueError, match=r"base weight of projection 0 must be \[40, 25\]"):
        qlora_linear(randn(3, 25, dtype=torch.bfloat16, device=device), w, a, b)
    with pytest.raises(ValueError, match=r"lora_a\[0\] must be \[r, 24\]"):
        qlora_linear(x, w, a[:, :20], b)
    with pytest.raises(ValueError, match=r"lora_b\[0\] must be \[N, 4\]"):
        qlora_linear(x, w, a, b[:, :3])
    with pytest.raises(ValueError, match="requires grad; LoRA keeps it frozen"):
        qlora_linear(x, random_base("dense", 40, 24, torch.bfloat16, device).requires_grad_(), a, b)
    with pytest.raises(TypeError, match=r"weight\[0\] is dense .* must have the compute dtype"):
        qlora_linear(x, random_base("dense", 40, 24, torch.float32, device), a, b)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        qlora_linear(x, w, a, b, dropout_p=1.0)
    with pytest.raises(TypeError, match=r"dropout_mask\[0\] must be bool"):
        qlora_linear(x, w, a, b, dropout_p=0.1, dropout_mask=torch.ones_like(x))
    with pytest.raises(ValueError, match=r"dropout_mask\[0\] must have x's shape"):
        qlora_linear(x, w, a, b, dropout_p=0.1, dropout_mask=torch.ones(3, 23, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"scale\[0\] must be finite"):
        qlora_linear(x, w, a, b, scale=float("nan"))
    with pytest.raises(ValueError, match=r"bias\[0\] must be \[40\]"):
        qlora_linear(x, w, a, b, bias=torch.zeros(39, device=device))
    bad = [
        (NF4Weight(w.packed, w.absmax[:-1], w.shape, w.blocksize, w.absmax2, w.code2, w.offset),
         ValueError, r"qlora_linear \(projection 0\): absmax must have shape \[15\]"),
        (NF4Weight(w.packed, w.absmax, w.shape, 48, w.absmax2, w.code2, w.offset),
         ValueError, r"blocksize must be a power of two in \[32, 4096\]"),
        (NF4Weight(w.packed, w.absmax, w.shape, w.blocksize), ValueError, "absmax2, code2 and offset are all required"),
        (NF4Weight(w.packed, w.absmax.float(), w.shape, w.blocksize, w.absmax2, w.code2, w.offset),
         ValueError, "are for a double-quantized absmax"),
        (NF4Weight(w.packed, w.absmax, w.shape, w.blocksize, w.absmax2, w.code2[:100], w.offset),
         ValueError, r"code2 \(the 8-bit dynamic map\) must have shape \[256\]"),
    ]
    for weight, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            qlora_linear(x, weight, a, b)
    with pytest.raises(ValueError, match=r"packed must hold \(n \+ 1\) / 2 = 480 bytes"):
        qlora_linear(x, NF4Weight(w.packed[:-1], w.absmax, w.shape, w.blocksize, w.absmax2, w.code2, w.offset), a, b)
    with pytest.raises(TypeError, match="packed must be a tensor"):
        NF4Weight([1], w.absmax, w.shape)
    with pytest.raises(ValueError, match="absmax2, code2 and offset go together"):
        NF4Weight(w.packed, w.absmax, w.shape, 64, w.absmax2)
    args = _op_args([p])
    with pytest.raises(ValueError, match="weight must hold one entry per projection"):
        torch.ops.swiftlora.qlora_linear(x, [], *args[1:], [], [], 1.0)
    with pytest.raises(ValueError, match=r"grad_y must be \[..., 40\]"):
        torch.ops.swiftlora.qlora_linear_backward(randn(3, 41, dtype=torch.bfloat16, device=device), *args, [], 1.0)


@pytest.mark.gpu
def test_device_mismatch_is_rejected():
    p = random_projection(40, 24, 4, "nf4", torch.bfloat16, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"lora_a\[0\] must be on the device of x"):
        qlora_linear(randn(3, 24, dtype=torch.bfloat16, device="cuda"), p.base, p.lora_a.cpu(), p.lora_b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 4096, 1024), (33, 1024, 4096), (1, 4096, 4096)], ids=str)
def test_cuda_large_shapes(dtype, shape):
    # Model-sized rows (the vectorised dequantization, cuBLAS paths) against the reference on the GPU.
    m, k, n = shape
    proj = random_projection(n, k, 64 if m == 1 else 16, "nf4", dtype, torch.float32, "cuda")
    x = randn(m, k, dtype=dtype, device="cuda", requires_grad=True)
    grad = randn(m, n, dtype=dtype, device="cuda")
    runs = reference_runs(_single(), x, [proj], [grad])
    y = _run(x, proj, grad)
    check_against_reference([y], x, [proj], runs, f"cuda {dtype} {shape}")


def test_bitsandbytes_weights_load_and_match():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    for nested in (False, True):
        for bs in (64, 128):
            w = torch.randn(48, 200)
            packed, state = bnb_f.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type="nf4")
            weight = NF4Weight.from_quant_state(packed, state)
            assert weight.nested == nested and weight.shape == (48, 200)
            expected = bnb_f.dequantize_4bit(packed, state)
            assert torch.equal(weight.dequantize(torch.float32), expected)
            x = randn(4, 200)
            a, b = torch.zeros(2, 200), torch.zeros(48, 2)
            with torch.no_grad():
                assert_close(qlora_linear(x, weight, a, b), x.double() @ expected.double().t(), what="bnb weight")
    _, state = bnb_f.quantize_4bit(torch.randn(8, 8), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        NF4Weight.from_quant_state(packed, state)


def test_projection_type_checks():
    with pytest.raises(TypeError, match="projection 0 must be a LoRAProjection"):
        from swiftlora.ops import lora_projections

        lora_projections(randn(2, 4), [(1, 2)])
    assert LoRAProjection(randn(3, 4), randn(2, 4), randn(3, 2)).out_features == 3
