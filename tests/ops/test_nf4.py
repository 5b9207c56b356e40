"""nf4_quantize / nf4_dequantize: bit-exact against the CUDA-rule reference (and bitsandbytes where installed),
adversarial inputs, every blocksize and dtype, golden files, opcheck, bad input."""
from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from swiftlora.ops._nf4_tables import dynamic_code, nf4_code, nf4_thresholds
from swiftlora.ops.nf4 import (nf4_dequantize, nf4_dequantize_reference, nf4_quantize, nf4_quantize_reference)
from tests.helpers import DEVICES, DTYPES, randn
from tests.ops.nf4_helpers import (BNB_THRESHOLD_LITERALS, adversarial_input, assert_same_quantization,
                                   expected_codes, unpack)

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# n below one block, odd n (a padded nibble), a short last block, many blocks, 3-d.
SHAPES = [(7,), (33, 7), (96, 256), (3, 5, 70)]
GOLDEN = Path(__file__).parents[1] / "quant" / "golden" / "nf4_golden.pt"
_OPS = torch.ops.swiftlora


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, with every NaN made one canonical NaN (their payloads are not part of any contract)."""
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _quantize_both(x, blocksize, compress):
    """(our op, the reference), both on x's device: the offset is torch's mean there, as bitsandbytes takes it."""
    return nf4_quantize(x, blocksize, compress), nf4_quantize_reference(x, blocksize, compress)


def test_tables_are_bitsandbytes_tables():
    sha = lambda t: hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()  # noqa: E731
    assert sha(nf4_code()) == "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
    assert sha(dynamic_code()) == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    # Each CUDA threshold is bnb's decimal literal rounded once to fp32 (as nvcc does), which is the fp32 midpoint
    # of two codes except at indices 0, 8, 12, 14 (one ulp away).
    t, code = nf4_thresholds(), nf4_code()
    for i, lit in enumerate(BNB_THRESHOLD_LITERALS):
        lo = torch.nextafter(t[i], torch.tensor(-2.0))
        hi = torch.nextafter(t[i], torch.tensor(2.0))
        d = Fraction(lit)
        assert all(abs(d - Fraction(t[i].item())) < abs(d - Fraction(v.item())) for v in (lo, hi)), lit
    mid = (code[:-1] + code[1:]) / 2
    assert (t != mid).nonzero().flatten().tolist() == [0, 8, 12, 14]
    assert ((t.view(torch.int32) - mid.view(torch.int32)).abs() <= 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_quantize_matches_reference(device, dtype, blocksize, shape, compress):
    x = randn(*shape, dtype=dtype, device=device, scale=3.0)
    out, ref = _quantize_both(x, blocksize, compress)
    assert out.packed.shape == ((x.numel() + 1) // 2, 1) and out.packed.device == x.device
    assert out.absmax.dtype == (torch.uint8 if compress else torch.float32)
    assert_same_quantization(out, ref, x, blocksize, near_ties_ok=device == "cuda", what=f"{dtype} {blocksize}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_dequantize_matches_reference(device, dtype, blocksize, compress):
    shape = (37, 96)
    q = nf4_quantize_reference(randn(*shape, scale=0.02), blocksize, compress)
    q_dev = [t.to(device) if t is not None else None for t in q]
    out = nf4_dequantize(*q_dev, blocksize=blocksize, shape=shape, dtype=dtype)
    ref = nf4_dequantize_reference(*q, blocksize=blocksize, shape=shape, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype and out.device.type == device
    assert torch.equal(_bits(out.cpu()), _bits(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_round_trip_error_is_nf4_sized(device, dtype, blocksize):
    """Calibrated on Gaussian weights: relative L2 error 0.087 (blocksize 32) .. 0.112 (4096)."""
    x = randn(64, 1024, dtype=dtype, device=device)
    q = nf4_quantize(x, blocksize, compress_statistics=True)
    y = nf4_dequantize(*q, blocksize=blocksize, shape=x.shape, dtype=torch.float32)
    err = ((y - x.float()).norm() / x.float().norm()).item()
    assert 0.05 < err < 0.12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_adversarial_inputs(device, dtype, blocksize, compress):
    x = adversarial_input(blocksize, dtype).to(device)
    out, ref = _quantize_both(x, blocksize, compress)
    assert_same_quantization(out, ref, x, blocksize, near_ties_ok=device == "cuda", what="adversarial")
    # The rules themselves, on our codes (independent of the reference's implementation; these cases involve no
    # inexact reciprocal, so they hold on the GPU too).
    n = x.numel()
    flat = x.cpu().float().reshape(-1, blocksize)
    ref_plain = nf4_quantize_reference(x.cpu(), blocksize)
    codes = unpack(out.packed, n).reshape(-1, blocksize)
    for b in range(flat.shape[0]):
        row, m = flat[b], ref_plain.absmax[b].item()
        if m == 1.0 or m == 8.0:  # exact scaling: ties go to the lower code
            assert torch.equal(codes[b], expected_codes(row / m)), f"block {b}"
        if (row.abs() < torch.finfo(torch.float32).tiny).all():  # zeros, -0.0, subnormals: absmax 0, codes 0
            assert m == 0.0 and (codes[b] == 0).all(), f"block {b}"
        if m > 2.0 ** 126:  # 1/absmax flushes to zero: every code is 7 (or 0 for a non-finite product)
            assert ((codes[b] == 7) | ~torch.isfinite(row)).all(), f"block {b}"
    deq = nf4_dequantize(*out, blocksize=blocksize, shape=x.shape, dtype=dtype).cpu()
    out_cpu = [t.cpu() if t is not None else None for t in out]
    assert torch.equal(_bits(deq), _bits(nf4_dequantize_reference(*out_cpu, blocksize=blocksize, shape=x.shape,
                                                                   dtype=dtype)))
    if not compress:  # (double quantization gives a zero block a small nonzero scale, in bnb too)
        zero_block = deq.reshape(-1, blocksize)[(flat == 0).all(1)]
        assert (zero_block == 0).all() and torch.signbit(zero_block).all()  # -1 * 0 = -0.0, as bnb's CUDA kernel


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_input_and_quant_storage(device):
    x = randn(256, 96, dtype=torch.bfloat16, device=device).t()
    out = nf4_quantize(x, 64, True)
    ref = nf4_quantize(x.contiguous(), 64, True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    as_bf16 = out.packed.reshape(-1).view(torch.bfloat16).reshape(-1, 1)  # quant_storage=torch.bfloat16
    y = nf4_dequantize(as_bf16, *out[1:], blocksize=64, shape=x.shape)
    assert torch.equal(y, nf4_dequantize(*out, blocksize=64, shape=x.shape))


def test_golden_files():
    """Outputs of bitsandbytes frozen by tests/quant/golden/make_nf4_golden.py (runs without bitsandbytes)."""
    cases = torch.load(GOLDEN)
    assert len(cases) >= 12
    for c in cases:
        x, bs, compress = c["x"], c["blocksize"], c["compress_statistics"]
        q = nf4_quantize(x, bs, compress)
        assert torch.equal(q.packed, c["packed"]) and torch.equal(q.absmax, c["absmax"]), c["name"]
        if compress:
            assert torch.equal(q.absmax2, c["absmax2"]) and torch.equal(q.offset, c["offset"]), c["name"]
        y = nf4_dequantize(*q, blocksize=bs, shape=x.shape, dtype=x.dtype)
        assert torch.equal(_bits(y), _bits(c["dequantized"])), c["name"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    x = randn(33, 70, dtype=dtype, device=device)
    code2 = dynamic_code(device)
    torch.library.opcheck(_OPS.nf4_quantize, (x, 64, None))
    torch.library.opcheck(_OPS.nf4_quantize, (x, 32, code2))
    for compress in (False, True):
        q = nf4_quantize(x, 64, compress)
        torch.library.opcheck(_OPS.nf4_dequantize, (*q, 64, [33, 70], dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    x = randn(4, 64, device=device)
    q = nf4_quantize(x, 64, True)
    p = nf4_quantize(x, 64, False)
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\].*got 48"):
        nf4_quantize(x, 48)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        nf4_quantize(x, 8192)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got Int"):
        nf4_quantize(x.int())
    with pytest.raises(ValueError, match="x must not be empty"):
        nf4_quantize(x[:0])
    with pytest.raises(TypeError, match="x must be a tensor"):
        nf4_quantize([1.0, 2.0])
    with pytest.raises(ValueError, match=r"code2 \(the 8-bit dynamic map\) must have shape \[256\]"):
        _OPS.nf4_quantize(x, 64, torch.zeros(255, device=device))
    with pytest.raises(ValueError, match=r"packed must hold \(n \+ 1\) / 2 = 128 bytes"):
        nf4_dequantize(p.packed[:-1], p.absmax, blocksize=64, shape=(4, 64))
    with pytest.raises(TypeError, match="packed must be uint8"):
        _OPS.nf4_dequantize(p.packed.float(), p.absmax, None, None, None, 64, [4, 64], torch.float32)
    with pytest.raises(ValueError, match=r"absmax must have shape \[8\] .*got \[4\]"):
        nf4_dequantize(p.packed, p.absmax, blocksize=32, shape=(4, 64))
    with pytest.raises(TypeError, match="absmax must be float32 \\(or uint8 when double-quantized\\)"):
        nf4_dequantize(p.packed, p.absmax.half(), blocksize=64, shape=(4, 64))
    with pytest.raises(ValueError, match="absmax2, code2 and offset are all required"):
        nf4_dequantize(q.packed, q.absmax, q.absmax2, blocksize=64, shape=(4, 64))
    with pytest.raises(ValueError, match="pass None for all three"):
        nf4_dequantize(p.packed, p.absmax, q.absmax2, q.code2, q.offset, blocksize=64, shape=(4, 64))
    with pytest.raises(ValueError, match=r"absmax2 must have shape \[1\]"):
        nf4_dequantize(q.packed, q.absmax, q.absmax2.repeat(2), q.code2, q.offset, blocksize=64, shape=(4, 64))
    with pytest.raises(ValueError, match="offset must hold one value"):
        nf4_dequantize(q.packed, q.absmax, q.absmax2, q.code2, q.offset.repeat(2), blocksize=64, shape=(4, 64))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        nf4_dequantize(*p, blocksize=64, shape=(4, 64), dtype=torch.int32)
    with pytest.raises(ValueError, match="shape must not have negative sizes"):
        _OPS.nf4_dequantize(p.packed, p.absmax, None, None, None, 64, [-4, -64], torch.float32)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="absmax must be on the device of packed"):
            nf4_dequantize(p.packed, p.absmax.cpu(), blocksize=64, shape=(4, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_cuda_large_and_unaligned(dtype, blocksize):
    """Many CTAs and a tail (n % 8 != 0), and a packed tensor starting one byte into its storage (loop kernel)."""
    x = randn(1_000_003, dtype=dtype, device="cuda")
    out, ref = _quantize_both(x, blocksize, True)
    assert_same_quantization(out, ref, x, blocksize, near_ties_ok=True, what="large")
    n = x.numel()
    y = nf4_dequantize(*out, blocksize=blocksize, shape=(n,), dtype=dtype)
    y_ref = nf4_dequantize_reference(*[t.cpu() for t in out], blocksize=blocksize, shape=(n,), dtype=dtype)
    assert torch.equal(_bits(y.cpu()), _bits(y_ref))
    shifted = torch.empty(out.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted[1:] = out.packed.reshape(-1)
    y2 = nf4_dequantize(shifted[1:], *out[1:], blocksize=blocksize, shape=(n,), dtype=dtype)
    assert torch.equal(_bits(y2), _bits(y))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_cuda_dequant_many_tiles_and_adversarial_blocks(dtype, compress):
    """Bit for bit: a tensor of many CTA tiles, the adversarial blocks (NaN, inf, subnormal scales), a count not a
    multiple of 8 (the element kernel)."""
    for x in (randn(1000, 4104, dtype=dtype, device="cuda"), adversarial_input(64, dtype).cuda(),
              randn(333, 7, dtype=dtype, device="cuda")):
        q = nf4_quantize(x, 64, compress)
        y = nf4_dequantize(*q, blocksize=64, shape=x.shape, dtype=dtype)
        q_cpu = [t.cpu() if t is not None else None for t in q]
        y_ref = nf4_dequantize_reference(*q_cpu, blocksize=64, shape=x.shape, dtype=dtype)
        assert torch.equal(_bits(y.cpu()), _bits(y_ref)), f"{tuple(x.shape)}"
