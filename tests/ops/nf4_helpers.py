"""Shared by the NF4 tests and the golden-file script: adversarial inputs, and comparing two quantizations.

A quantization is the NF4Tensors tuple (packed, absmax, absmax2, code2, offset). On the CPU our op must equal the
plain-PyTorch reference bit for bit. A CUDA result may differ from the CPU rules in one way only: the GPU divides by
absmax with the approximate MUFU.RCP (as bitsandbytes' fast-math kernels do), so a scaled value within an ulp or
two of a decision threshold may fall on the other side. `assert_same_quantization(..., near_ties_ok=True)`
accepts exactly those differences.
"""
from __future__ import annotations

import torch

from swiftlora.ops._nf4_tables import dynamic_code, nf4_thresholds

# The decimal literals of bitsandbytes' dQuantizeNF4 (csrc/kernels.cu), ascending.
BNB_THRESHOLD_LITERALS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)


def expected_codes(xn: torch.Tensor) -> torch.Tensor:
    """Codes by the rule itself, independent of the reference's bucketize: #thresholds strictly below; NaN -> 0."""
    t = nf4_thresholds(xn.device)
    return (xn.reshape(-1, 1) > t).sum(1).reshape(xn.shape)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes (high nibble first), int64 on the CPU."""
    b = packed.reshape(-1).long().cpu()
    return torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]


def adversarial_input(blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Blocks that hit every special case of the encoder, one case per block (flattened, as quantize sees them):
    exact thresholds and their neighbours with absmax 1, thresholds times 8 with absmax 8, an all-zero block, an
    all -0.0 block, -0.0 among values, subnormals only, huge values (1/absmax flushes to 0 past 2^126), inf, NaN."""
    f32 = torch.float32
    t = nf4_thresholds()
    up, down = torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))
    if dtype == f32:
        ties = torch.cat([t, up, down, -t])
    else:  # the 16-bit values nearest each threshold from both sides
        lo = t.to(dtype).float()
        ties = torch.cat([lo, torch.nextafter(lo.to(dtype), torch.tensor(2.0, dtype=dtype)).float(),
                          torch.nextafter(lo.to(dtype), torch.tensor(-2.0, dtype=dtype)).float()])
    cases = []
    for chunk in ties.split(blocksize - 1):
        cases.append(torch.cat([torch.ones(1), chunk]))              # absmax exactly 1: xn == x
    cases.append(torch.cat([torch.full((1,), 8.0), t * 8]))          # absmax 8: exact scaling
    cases.append(torch.zeros(blocksize))
    cases.append(torch.full((blocksize,), -0.0))
    cases.append(torch.cat([torch.tensor([-0.0, 0.5, -0.0, -0.25]), torch.randn(blocksize - 4)]))
    tiny = torch.finfo(f32).tiny
    cases.append(torch.full((blocksize,), tiny / 4) * torch.randn(blocksize).sign())  # subnormal (fp32/bf16)
    big = torch.finfo(dtype).max
    cases.append(torch.cat([torch.tensor([big, -big / 3, big / 7]), torch.randn(blocksize - 3)]))
    cases.append(torch.cat([torch.tensor([1e38, -3e37]), torch.randn(blocksize - 2) * 1e37]))
    cases.append(torch.cat([torch.tensor([float("inf"), 1.0, -2.0]), torch.randn(blocksize - 3)]))
    cases.append(torch.cat([torch.tensor([float("nan"), 1.0, -2.0]), torch.randn(blocksize - 3)]))
    blocks = [torch.nn.functional.pad(c, (0, blocksize - c.numel())) for c in cases]
    return torch.cat(blocks).to(dtype)


def _near(values: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Whether each value is within 2 ulps (of its magnitude, at least of FLT_MIN) of one of `points`."""
    gap = (values.reshape(-1, 1).double() - points.reshape(1, -1).double()).abs().min(1).values
    ulp = torch.finfo(torch.float32).eps * values.reshape(-1).double().abs().clamp(min=torch.finfo(torch.float32).tiny)
    return gap <= 2 * ulp


def assert_same_quantization(out, ref, x: torch.Tensor, blocksize: int, near_ties_ok: bool, what: str = ""):
    """out, ref: NF4Tensors. Bitwise equal; with near_ties_ok (a CUDA result against the CPU rules) a code may be
    one step off where the scaled value lies within 2 ulps of the decision point it was compared with."""
    from swiftlora.ops.nf4 import nf4_quantize_reference

    out = [t.cpu() if t is not None else None for t in out]
    ref = [t.cpu() if t is not None else None for t in ref]
    assert out[0].shape == ref[0].shape and out[0].dtype == torch.uint8, f"{what}: packed {out[0].shape}"
    assert out[1].shape == ref[1].shape and out[1].dtype == ref[1].dtype, f"{what}: absmax {out[1].dtype}"
    for name, a, b in (("absmax", out[1], ref[1]), ("absmax2", out[2], ref[2]), ("offset", out[4], ref[4])):
        assert (a is None) == (b is None), f"{what}: {name} present in one result only"
        if a is not None and a.dtype == torch.float32:
            assert a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{what}: {name}"
    n = x.numel()
    co, cr = unpack(out[0], n + (n & 1)), unpack(ref[0], n + (n & 1))
    bad = co != cr
    plain = nf4_quantize_reference(x.detach().cpu(), blocksize) if near_ties_ok else None
    if bad.any() and near_ties_ok:  # NF4 codes use the exact fp32 absmax, nested or not
        flat = torch.nn.functional.pad(x.detach().reshape(-1).float().cpu(), (0, n & 1))
        xn = flat / plain.absmax.repeat_interleave(blocksize)[: flat.numel()]
        bad &= ~(_near(xn, nf4_thresholds()) & ((co - cr).abs() == 1))
    assert not bad.any(), f"{what}: {int(bad.sum())} codes differ, first at {bad.nonzero()[:5].flatten().tolist()}"
    if out[2] is None:
        return
    qbad = out[1] != ref[1]
    if qbad.any() and near_ties_ok:  # the 8-bit code of absmax - offset, scaled by 1/absmax2
        code2 = dynamic_code()
        xn = (plain.absmax - ref[4]) / ref[2].repeat_interleave(256)[: plain.absmax.numel()]
        qo, qr = out[1].long(), ref[1].long()
        midpoints = (code2[qo] + code2[qr]) / 2
        qbad &= ~(((qo - qr).abs() == 1) & ((xn.double() - midpoints.double()).abs()
                                             <= 2 * torch.finfo(torch.float32).eps * xn.double().abs()))
    assert not qbad.any(), f"{what}: {int(qbad.sum())} double-quantized absmax codes differ"
