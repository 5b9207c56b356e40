"""rms_norm against its float64 reference: values, gradients, in-place backward, strides, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops import rms_norm, rms_norm_reference
from tests.helpers import DEVICES, DTYPES, assert_close, randn

# Odd widths, widths that are not 16-byte multiples, one over the vectorised kernels' 1024x8 limit (loop path).
SHAPES = [(1, 3), (3, 37), (4, 128), (2, 5, 576), (6, 4096), (5, 4097), (3, 12000), (2, 70001)]


def _reference_outputs(x, w, eps, offset, grad):
    """float64 reference and the same-dtype reference, with their gradients for `grad`."""
    outs = {}
    for name, dt in (("64", torch.float64), ("lowp", x.dtype)):
        xr = x.detach().to(dt).requires_grad_()
        wr = w.detach().to(dt).requires_grad_()
        y = rms_norm_reference(xr, wr, eps, offset)
        y.backward(grad.to(dt))
        outs[name] = (y.detach(), xr.grad, wr.grad)
    return outs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [False, True], ids=["llama", "gemma"])
def test_forward_and_backward_match_reference(device, dtype, shape, offset):
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    w = randn(shape[-1], dtype=dtype, device=device, scale=0.5, requires_grad=True)
    grad = randn(*shape, dtype=dtype, device=device)
    y = rms_norm(x, w, 1e-6, offset)
    y.backward(grad)
    ref = _reference_outputs(x, w, 1e-6, offset, grad)
    for i, (name, out) in enumerate((("y", y), ("grad_x", x.grad), ("grad_w", w.grad))):
        assert_close(out, ref["64"][i], ref["lowp"][i], what=f"{name} {dtype} {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_writes_grad_x_into_incoming_gradient(device, dtype):
    x = randn(8, 640, dtype=dtype, device=device, requires_grad=True)
    w = randn(640, dtype=dtype, device=device, requires_grad=True)
    grad = randn(8, 640, dtype=dtype, device=device)
    seen = {}

    def keep(g):  # the buffer autograd hands to the backward
        seen["grad"] = g
        return g

    y = rms_norm(x, w, 1e-5, offset=True, inplace_backward=True)
    y.register_hook(keep)
    y.backward(grad.clone())
    ref = _reference_outputs(x, w, 1e-5, True, grad)
    assert_close(x.grad, ref["64"][1], ref["lowp"][1], what="grad_x (in place)")
    assert_close(w.grad, ref["64"][2], ref["lowp"][2], what="grad_w (in place)")
    # The buffer autograd handed in now holds grad_x (AccumulateGrad copies it since the hook keeps a reference).
    assert torch.equal(seen["grad"], x.grad), "grad_x should be written into the incoming gradient's buffer"


@pytest.mark.parametrize("device", DEVICES)
def test_no_weight_grad_when_weight_is_frozen(device):
    x = randn(4, 96, device=device, requires_grad=True)
    w = randn(96, device=device)
    rms_norm(x, w).sum().backward()
    assert x.grad is not None and w.grad is None
    _, grad_w = torch.ops.swiftlora.rms_norm_backward(torch.ones_like(x), x.detach(), w,
                                                      torch.ones(4, device=device), False, False)
    assert grad_w.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(device, dtype):
    # A column slice (row stride > H: read in place) and a transposed view (no unit stride: copied).
    base = randn(6, 3, 300, dtype=dtype, device=device)
    w = randn(256, dtype=dtype, device=device)
    for view in (base[..., 20:276], randn(256, 18, dtype=dtype, device=device).t()):
        x = view.detach().requires_grad_()
        grad = randn(*x.shape, dtype=dtype, device=device)
        y = rms_norm(x, w)
        y.backward(grad)
        ref = _reference_outputs(x, w, 1e-6, False, grad)
        assert_close(y, ref["64"][0], ref["lowp"][0], what=f"y, strides {tuple(x.stride())}")
        assert_close(x.grad, ref["64"][1], ref["lowp"][1], what=f"grad_x, strides {tuple(x.stride())}")


@pytest.mark.parametrize("device", DEVICES)
def test_large_values_stay_finite(device):
    x = randn(4, 1024, dtype=torch.bfloat16, device=device, scale=1e4)
    y = rms_norm(x, randn(1024, dtype=torch.bfloat16, device=device))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    x = randn(3, 5, 72, dtype=dtype, device=device, requires_grad=True)
    w = randn(72, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.swiftlora.rms_norm, (x, w, 1e-6, True))
    y, rstd = torch.ops.swiftlora.rms_norm(x.detach(), w.detach(), 1e-6, False)
    g = randn(3, 5, 72, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.swiftlora.rms_norm_backward, (g, x.detach(), w.detach(), rstd, False, True))
    torch.library.opcheck(torch.ops.swiftlora.rms_norm_backward_, (g.clone(), x.detach(), w.detach(), rstd, False, True))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    x = randn(4, 64, device=device)
    w = randn(64, device=device)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        rms_norm(x.double(), w)
    with pytest.raises(TypeError, match="x must be float32"):
        torch.ops.swiftlora.rms_norm(x.to(torch.int32), w.to(torch.int32), 1e-6, False)
    with pytest.raises(ValueError, match=r"weight must have shape \[64\]"):
        rms_norm(x, randn(63, device=device))
    with pytest.raises(ValueError, match="x must not be empty"):
        rms_norm(x[:0], w)
    with pytest.raises(ValueError, match="eps must be finite"):
        rms_norm(x, w, eps=-1.0)
    with pytest.raises(TypeError, match="must be tensors"):
        rms_norm([1.0, 2.0], w)
    with pytest.raises(ValueError, match="rstd must hold one value per row"):
        torch.ops.swiftlora.rms_norm_backward(x, x, w, torch.ones(3, device=device), False, True)


@pytest.mark.gpu
def test_weight_on_another_device_is_rejected():
    with pytest.raises(RuntimeError, match="weight must be on the device of x"):
        rms_norm(randn(4, 64, device="cuda"), randn(64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_kernel(dtype):
    x = randn(33, 2048, dtype=dtype)
    w = randn(2048, dtype=dtype)
    y_cpu = rms_norm(x, w)
    y_gpu = rms_norm(x.cuda(), w.cuda()).cpu()
    assert_close(y_gpu, rms_norm_reference(x.double(), w.double()), rms_norm_reference(x, w), what="cuda vs ref")
    assert_close(y_cpu, rms_norm_reference(x.double(), w.double()), rms_norm_reference(x, w), what="cpu vs ref")
