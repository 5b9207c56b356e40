"""swiglu/geglu against their float64 references: values, gradients, in-place backward, strides, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import geglu, geglu_reference, swiglu, swiglu_reference
from tests.helpers import DEVICES, DTYPES, assert_close, randn

# Widths 1 and 3, odd widths, rows 1 and 7, and widths of whole 16-byte vectors. No single-element case: an
# element near a zero of act' has a large relative error in any float32 evaluation.
SHAPES = [(7, 1), (1, 3), (7, 3), (1, 257), (7, 257), (2, 3, 64), (7, 4099), (3, 4, 1024)]
VARIANTS = ["swiglu", "geglu", "geglu_tanh"]
_OPS = torch.ops.swiftlora


def _op(variant, **kw):
    """(our op, its reference) for a variant name."""
    if variant == "swiglu":
        return (lambda g, u: swiglu(g, u, **kw)), swiglu_reference
    approximate = "tanh" if variant == "geglu_tanh" else "none"
    return (lambda g, u: geglu(g, u, approximate, **kw)), (lambda g, u: geglu_reference(g, u, approximate))


def _kernel_ops(variant):
    """(forward, backward, backward_) of the torch.ops, with the approximate flag bound for geglu."""
    if variant == "swiglu":
        return _OPS.swiglu, _OPS.swiglu_backward, _OPS.swiglu_backward_
    tanh = variant == "geglu_tanh"
    return (lambda g, u: _OPS.geglu(g, u, tanh), lambda d, g, u: _OPS.geglu_backward(d, g, u, tanh),
            lambda d, g, u: _OPS.geglu_backward_(d, g, u, tanh))


def _reference_outputs(variant, gate, up, grad):
    """{"64": (h, grad_gate, grad_up) of the float64 reference, "lowp": the same run in gate's dtype}."""
    ref = _op(variant)[1]
    outs = {}
    for name, dt in (("64", torch.float64), ("lowp", gate.dtype)):
        g = gate.detach().to(dt).requires_grad_()
        u = up.detach().to(dt).requires_grad_()
        h = ref(g, u)
        h.backward(grad.to(dt))
        outs[name] = (h.detach(), g.grad, u.grad)
    return outs


def _check_against_reference(variant, gate, up, grad, inplace_backward, what):
    ref = _reference_outputs(variant, gate, up, grad)  # before the in-place backward overwrites gate and up
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    h = _op(variant, inplace_backward=inplace_backward)[0](gate, up)
    h.backward(grad.clone())
    for i, (name, out) in enumerate((("h", h), ("grad_gate", gate.grad), ("grad_up", up.grad))):
        assert_close(out, ref["64"][i], ref["lowp"][i], what=f"{variant} {name} {what}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["autograd", "inplace"])
def test_forward_and_backward_match_reference(device, dtype, shape, variant, inplace_backward):
    gate = randn(*shape, dtype=dtype, device=device, scale=2.0)
    up = randn(*shape, dtype=dtype, device=device)
    grad = randn(*shape, dtype=dtype, device=device)
    _check_against_reference(variant, gate, up, grad, inplace_backward, f"{dtype} {shape}")


def _layouts(device, dtype):
    """name -> (gate, up) views with the strides real models produce, plus one the kernels must copy."""
    fused_aligned = randn(5, 3, 2 * 1024, dtype=dtype, device=device, scale=2.0)
    fused_odd = randn(7, 2 * 257, dtype=dtype, device=device, scale=2.0)
    fused_tall = randn(600_000, 2 * 2, dtype=dtype, device=device, scale=2.0)  # > 65535 row blocks on the GPU
    wide = randn(2, 9, 1024, dtype=dtype, device=device, scale=2.0)
    return {
        "fused_halves": (fused_aligned[..., :1024], fused_aligned[..., 1024:]),
        "fused_halves_odd": (fused_odd[:, :257], fused_odd[:, 257:]),
        "fused_halves_many_rows": (fused_tall[:, :2], fused_tall[:, 2:]),
        "column_slice": (wide[..., :1003], randn(2, 9, 1003, dtype=dtype, device=device)),
        "transposed": (randn(300, 18, dtype=dtype, device=device, scale=2.0).t(), randn(18, 300, dtype=dtype,
                                                                                         device=device)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["autograd", "inplace"])
def test_strided_inputs(device, dtype, variant, inplace_backward):
    for name, (gate, up) in _layouts(device, dtype).items():
        grad = randn(*gate.shape, dtype=dtype, device=device)
        _check_against_reference(variant, gate, up, grad, inplace_backward, f"{dtype} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["contiguous", "fused_halves"])
def test_inplace_backward_op_matches_out_of_place(device, dtype, variant, layout):
    forward, backward, backward_ = _kernel_ops(variant)
    if layout == "fused_halves":
        fused = randn(6, 2 * 520, dtype=dtype, device=device, scale=2.0)
        gate, up = fused[:, :520], fused[:, 520:]
    else:
        gate, up = randn(6, 515, dtype=dtype, device=device, scale=2.0), randn(6, 515, dtype=dtype, device=device)
    grad = randn(*gate.shape, dtype=dtype, device=device)
    h = forward(gate, up)
    grad_gate, grad_up = backward(grad, gate, up)
    gate_buf, up_buf, grad_buf = gate.clone(), up.clone(), grad.clone()
    if layout == "fused_halves":
        fused_buf = fused.clone()
        gate_buf, up_buf = fused_buf[:, :520], fused_buf[:, 520:]
    ptrs = (grad_buf.data_ptr(), gate_buf.data_ptr(), up_buf.data_ptr())
    backward_(grad_buf, gate_buf, up_buf)
    assert (grad_buf.data_ptr(), gate_buf.data_ptr(), up_buf.data_ptr()) == ptrs
    assert torch.equal(grad_buf, h), "grad should now hold the recomputed forward output"
    assert torch.equal(gate_buf, grad_gate), "gate should now hold grad_gate"
    assert torch.equal(up_buf, grad_up), "up should now hold grad_up"
    if layout == "fused_halves":
        assert torch.equal(fused_buf, torch.cat([grad_gate, grad_up], dim=-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_inplace_backward_overwrites_inputs_and_spares_frozen_ones(device, variant):
    gate = randn(4, 96, device=device, scale=2.0, requires_grad=True)
    up_base = randn(4, 96, device=device)
    up = up_base.clone()  # frozen: its values must survive the backward
    grad = randn(4, 96, device=device)
    ref = _reference_outputs(variant, gate, up, grad)
    gate_before = gate.detach().clone()
    _op(variant, inplace_backward=True)[0](gate, up).backward(grad.clone())
    assert_close(gate.grad, ref["64"][1], what="grad_gate")
    assert up.grad is None and torch.equal(up, up_base), "an input that needs no gradient must keep its values"
    assert not torch.equal(gate.detach(), gate_before), "gate's buffer should have been overwritten"
    assert torch.equal(gate.detach(), gate.grad), "gate's buffer should hold grad_gate"
    x = randn(4, 96, device=device, requires_grad=True)  # gate is up: must not trip the kernels' overlap check
    x64 = x.detach().double().requires_grad_()
    _op(variant)[1](x64, x64).backward(grad.double())
    _op(variant, inplace_backward=True)[0](x, x).backward(grad.clone())
    assert_close(x.grad, x64.grad, what="grad of f(x, x)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_large_values_stay_finite(device, variant):
    gate = randn(4, 1024, dtype=torch.bfloat16, device=device, scale=1e4, requires_grad=True)
    up = randn(4, 1024, dtype=torch.bfloat16, device=device, requires_grad=True)
    h = _op(variant)[0](gate, up)
    h.backward(torch.ones_like(h))
    for t in (h, gate.grad, up.grad):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    gate = randn(3, 5, 72, dtype=dtype, device=device, requires_grad=True)
    up = randn(3, 5, 72, dtype=dtype, device=device, requires_grad=True)
    grad = randn(3, 5, 72, dtype=dtype, device=device)
    g, u = gate.detach(), up.detach()
    torch.library.opcheck(_OPS.swiglu, (gate, up))
    torch.library.opcheck(_OPS.swiglu_backward, (grad, g, u))
    torch.library.opcheck(_OPS.swiglu_backward_, (grad.clone(), g.clone(), u.clone()))
    for tanh in (False, True):
        torch.library.opcheck(_OPS.geglu, (gate, up, tanh))
        torch.library.opcheck(_OPS.geglu_backward, (grad, g, u, tanh))
        torch.library.opcheck(_OPS.geglu_backward_, (grad.clone(), g.clone(), u.clone(), tanh))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_input_raises_clear_errors(device, variant):
    op = _op(variant)[0]
    forward, backward, backward_ = _kernel_ops(variant)
    x = randn(4, 64, device=device)
    with pytest.raises(TypeError, match="gate must be float32, float16 or bfloat16"):
        op(x.to(torch.int32), x.to(torch.int32))
    with pytest.raises(TypeError, match="gate must be float32"):
        op(x.double(), x.double())
    with pytest.raises(TypeError, match="up must have the dtype of gate"):
        op(x, x.half())
    with pytest.raises(ValueError, match=r"up must have the shape of gate \[4, 64\]"):
        op(x, randn(4, 63, device=device))
    with pytest.raises(ValueError, match="gate must not be empty"):
        op(x[:0], x[:0])
    with pytest.raises(ValueError, match="gate must have at least one dim"):
        op(x[0, 0], x[0, 0])
    with pytest.raises(TypeError, match="gate and up must be tensors"):
        op([1.0], x)
    with pytest.raises(ValueError, match=r"grad must have the shape of gate"):
        backward(randn(4, 32, device=device), x, x)
    with pytest.raises(TypeError, match="grad must have the dtype of gate"):
        backward(x.half(), x, x)
    with pytest.raises(ValueError, match="gate is written in place, so it must be viewable as rows"):
        backward_(x.clone(), randn(64, 4, device=device).t(), x.clone())
    with pytest.raises(ValueError, match="gate and up share memory"):
        y = x.clone()
        backward_(x.clone(), y, y)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_approximate_raises(device):
    x = randn(2, 8, device=device)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        geglu(x, x, approximate="erf")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_inputs_on_different_devices_are_rejected(variant):
    op = _op(variant)[0]
    with pytest.raises(RuntimeError, match="up must be on the device of gate"):
        op(randn(4, 64, device="cuda"), randn(4, 64))
    with pytest.raises(RuntimeError, match="up must be on the device of gate"):
        op(randn(4, 64), randn(4, 64, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_matches_reference_at_model_size(dtype, variant):
    # Llama-3-8B's intermediate size, in a fused gate/up layout and separate contiguous tensors.
    fused = randn(64, 2 * 14336, dtype=dtype, device="cuda", scale=2.0)
    grad = randn(64, 14336, dtype=dtype, device="cuda")
    for gate, up in ((fused[:, :14336], fused[:, 14336:]), (fused[:, :14336].contiguous(), fused[:, 14336:].clone())):
        _check_against_reference(variant, gate, up, grad, False, f"{dtype} strides {gate.stride()}")
