"""rope against its float64 reference: values, gradients, layouts, GQA, partial rotary, position ids, tables,
in place, strided inputs, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import half_tables, rope, rope_reference
from tests.helpers import DEVICES, DTYPES, assert_close, randn


def _tables(length, half, device, dtype=torch.float32, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) / half)
    freqs = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return freqs.cos().to(device=device, dtype=dtype), freqs.sin().to(device=device, dtype=dtype)


def _qk(b, s, hq, hk, d, dtype, device, layout="bshd"):
    shape_q, shape_k = ((b, s, hq, d), (b, s, hk, d)) if layout == "bshd" else ((b, hq, s, d), (b, hk, s, d))
    return (randn(*shape_q, dtype=dtype, device=device, requires_grad=True),
            randn(*shape_k, dtype=dtype, device=device, requires_grad=True))


def _check_against_reference(q, k, cos, sin, pos, layout, what, inplace=False):
    gq, gk = randn(*q.shape, dtype=q.dtype, device=q.device), randn(*k.shape, dtype=k.dtype, device=k.device)
    if inplace:  # rotate copies in place (a leaf that requires grad cannot be modified in place)
        qo, ko = rope(q * 1, k * 1, cos, sin, pos, layout=layout, inplace=True)
    else:
        qo, ko = rope(q, k, cos, sin, pos, layout=layout)
    torch.autograd.backward((qo, ko), (gq, gk))
    refs = {}
    for name, dt in (("64", torch.float64), ("lowp", q.dtype)):
        qr, kr = (t.detach().to(dt).requires_grad_() for t in (q, k))
        tables = (cos, sin) if dt != torch.float64 else (cos.double(), sin.double())
        qro, kro = rope_reference(qr, kr, *tables, pos, layout=layout)
        torch.autograd.backward((qro, kro), (gq.to(dt), gk.to(dt)))
        refs[name] = (qro.detach(), kro.detach(), qr.grad, kr.grad)
    for i, (name, out) in enumerate((("q", qo), ("k", ko), ("grad_q", q.grad), ("grad_k", k.grad))):
        assert_close(out, refs["64"][i], refs["lowp"][i], what=f"{what} {name}")


# (batch, seq, q heads, k heads, head_dim, rotary_dim): GQA, MQA, odd sizes, partial rotary, dims not multiples of 8.
SHAPES = [(2, 7, 4, 2, 16, 16), (1, 33, 3, 1, 64, 64), (3, 5, 6, 6, 128, 64), (2, 9, 5, 1, 80, 80),
          (1, 4, 2, 2, 10, 6), (2, 3, 1, 1, 6, 2), (1, 130, 8, 2, 96, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_matches_reference(device, dtype, shape, layout):
    b, s, hq, hk, d, r = shape
    q, k = _qk(b, s, hq, hk, d, dtype, device, layout)
    cos, sin = _tables(s + 11, r // 2, device)
    pos = torch.randint(0, s + 11, (b, s), device=device)
    _check_against_reference(q, k, cos, sin, pos, layout, f"{shape} {layout} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_position_id_forms_and_tables(device, dtype):
    b, s, d = 3, 12, 32
    q, k = _qk(b, s, 4, 2, d, dtype, device)
    cos, sin = _tables(40, d // 2, device)
    _check_against_reference(q, k, cos, sin, None, "bshd", "no position_ids")
    for pos in (torch.randint(0, 40, (1, s), device=device),                 # one row for the whole batch
                torch.randint(0, 40, (b, s), device=device, dtype=torch.int32),
                torch.randint(0, 40, (b, 2 * s), device=device)[:, ::2]):    # strided position ids
        q.grad = k.grad = None
        _check_against_reference(q, k, cos, sin, pos, "bshd", f"position_ids {pos.dtype} {tuple(pos.stride())}")
    # per-token tables [B|1, S, R/2], tables in q's dtype, and HF's full-width tables cut to half width
    q.grad = k.grad = None
    pos = torch.randint(0, 40, (b, s), device=device)
    _check_against_reference(q, k, cos[pos], sin[pos], None, "bshd", "per-token tables")
    q.grad = k.grad = None
    _check_against_reference(q, k, cos[:s][None], sin[:s][None], None, "bshd", "per-token tables, batch 1")
    q.grad = k.grad = None
    _check_against_reference(q, k, cos.to(dtype), sin.to(dtype), pos, "bshd", "tables in q's dtype")
    q.grad = k.grad = None
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    _check_against_reference(q, k, *half_tables(full_cos, full_sin), pos, "bshd", "HF tables")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_inplace(device, dtype, layout):
    q, k = _qk(2, 9, 4, 2, 64, dtype, device, layout)
    cos, sin = _tables(9, 32, device)
    _check_against_reference(q, k, cos, sin, None, layout, "in place", inplace=True)
    qb, kb = q.detach().clone(), k.detach().clone()
    ptrs = (qb.data_ptr(), kb.data_ptr())
    with torch.no_grad():
        qo, ko = rope(qb, kb, cos, sin, layout=layout, inplace=True)
    assert (qo.data_ptr(), ko.data_ptr()) == ptrs and qo is qb
    expect = rope(q.detach(), k.detach(), cos, sin, layout=layout)
    assert torch.equal(qb, expect[0]) and torch.equal(kb, expect[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_qkv_slices_are_read_in_place(device, dtype):
    # q and k sliced from a fused qkv projection [B, S, (Hq + 2 Hk) * D]: head strides are regular, row gaps.
    b, s, hq, hk, d = 2, 6, 4, 2, 32
    qkv = randn(b, s, (hq + 2 * hk) * d, dtype=dtype, device=device)
    q = qkv[..., : hq * d].view(b, s, hq, d).detach().requires_grad_()
    k = qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d).detach().requires_grad_()
    cos, sin = _tables(s, d // 2, device)
    _check_against_reference(q, k, cos, sin, None, "bshd", "qkv slices")
    # in place on the slices rotates inside the fused buffer and leaves v alone
    v_before = qkv[..., (hq + hk) * d :].clone()
    qs, ks = qkv[..., : hq * d].view(b, s, hq, d), qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d)
    expect = rope(qs.clone(), ks.clone(), cos, sin)
    rope(qs, ks, cos, sin, inplace=True)
    assert torch.equal(qs, expect[0]) and torch.equal(ks, expect[1])
    assert torch.equal(qkv[..., (hq + hk) * d :], v_before)
    # no unit stride on head_dim: copied, still right
    qt = randn(b, s, hq, d, dtype=dtype, device=device).transpose(-1, -2).contiguous().transpose(-1, -2)
    kt = randn(b, s, hk, d, dtype=dtype, device=device)
    _check_against_reference(qt.requires_grad_(), kt.requires_grad_(), cos, sin, None, "bshd", "no unit stride")


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_undoes_rotation(device):
    q, k = (randn(2, 8, 3, 64, device=device) for _ in range(2))
    cos, sin = _tables(8, 32, device)
    qo, ko = torch.ops.swiftlora.rope(q, k, cos, sin, None, False)
    qb, kb = torch.ops.swiftlora.rope(qo, ko, cos, sin, None, True)
    assert_close(qb, q.double(), what="q round trip")
    assert_close(kb, k.double(), what="k round trip")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    q, k = (randn(2, 5, h, 24, dtype=dtype, device=device, requires_grad=True) for h in (4, 2))
    cos, sin = _tables(7, 8, device)
    pos = torch.randint(0, 7, (2, 5), device=device)
    torch.library.opcheck(torch.ops.swiftlora.rope, (q, k, cos, sin, pos, False))
    torch.library.opcheck(torch.ops.swiftlora.rope, (q, k, cos[:5][None], sin[:5][None], None, True))
    torch.library.opcheck(torch.ops.swiftlora.rope_, (q.detach().clone(), k.detach().clone(), cos, sin, pos, False))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    q, k = randn(2, 5, 4, 16, device=device), randn(2, 5, 2, 16, device=device)
    cos, sin = _tables(8, 8, device)
    op = torch.ops.swiftlora.rope
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        rope(q.double(), k.double(), cos, sin)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        rope(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="q must be 4-D"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k must match q in batch, seq and head_dim"):
        rope(q, k[:, :4], cos, sin)
    with pytest.raises(ValueError, match="q must not be empty"):
        rope(q[:0], k[:0], cos, sin)
    with pytest.raises(ValueError, match=r"rotary_dim/2 = 9\) must be in \[1, head_dim/2 = 8\]"):
        rope(q, k, *_tables(8, 9, device))
    with pytest.raises(ValueError, match="the table must cover seq = 5"):
        rope(q, k, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="sin must have the shape of cos"):
        rope(q, k, cos, sin[:, :4])
    with pytest.raises(TypeError, match="cos must be float32 or q's dtype"):
        op(q, k, cos.half(), sin.half(), None, False)
    with pytest.raises(TypeError, match="position_ids must be int64 or int32"):
        rope(q, k, cos, sin, torch.zeros(2, 5, device=device))
    with pytest.raises(ValueError, match=r"position_ids must have shape \[2 or 1, 5\]"):
        rope(q, k, cos, sin, torch.zeros(2, 4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="position_ids must be None when cos/sin are per token"):
        rope(q, k, cos[:5][None], sin[:5][None], torch.zeros(1, 5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="layout must be one of"):
        rope(q, k, cos, sin, layout="sbhd")
    with pytest.raises(TypeError, match="q must be a tensor"):
        rope(None, k, cos, sin)
    with pytest.raises(ValueError, match="unit stride on head_dim"):
        torch.ops.swiftlora.rope_(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, cos, sin, None, False)


def test_out_of_range_position_raises_on_cpu():
    q, k = randn(1, 3, 2, 8), randn(1, 3, 1, 8)
    cos, sin = _tables(4, 4, "cpu")
    with pytest.raises(IndexError, match=r"position_ids\[0, 2\] = 4 is outside the cos/sin table \[0, 4\)"):
        rope(q, k, cos, sin, torch.tensor([[0, 1, 4]]))
    with pytest.raises(IndexError, match="is outside the cos/sin table"):
        rope(q, k, cos, sin, torch.tensor([[0, -1, 2]]))


@pytest.mark.gpu
def test_out_of_range_position_poisons_with_nan_on_cuda():
    q, k = randn(1, 3, 2, 8, device="cuda"), randn(1, 3, 1, 8, device="cuda")
    cos, sin = _tables(4, 4, "cuda")
    qo, ko = rope(q, k, cos, sin, torch.tensor([[0, 9, 2]], device="cuda"))
    assert torch.isnan(qo[:, 1]).all() and torch.isnan(ko[:, 1]).all()
    assert torch.isfinite(qo[:, [0, 2]]).all() and torch.isfinite(ko[:, [0, 2]]).all()


@pytest.mark.gpu
def test_tables_on_another_device_are_rejected():
    q, k = randn(1, 3, 2, 8, device="cuda"), randn(1, 3, 1, 8, device="cuda")
    with pytest.raises(RuntimeError, match="cos must be on the device of q"):
        rope(q, k, *_tables(4, 4, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_kernel(dtype):
    q, k = randn(2, 64, 8, 128, dtype=dtype), randn(2, 64, 2, 128, dtype=dtype)
    cos, sin = _tables(100, 64, "cpu")
    pos = torch.randint(0, 100, (2, 64))
    cpu = rope(q, k, cos, sin, pos)
    gpu = rope(q.cuda(), k.cuda(), cos.cuda(), sin.cuda(), pos.cuda())
    for a, b in zip(cpu, gpu):
        assert (a.float() - b.cpu().float()).abs().max().item() <= (2e-2 if dtype != torch.float32 else 1e-5)
