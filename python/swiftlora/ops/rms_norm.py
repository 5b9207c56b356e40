"""RMSNorm: ``y = x / rms(x) * w`` (Llama) or ``x / rms(x) * (1 + w)`` (Gemma, ``offset=True``).

Kernels: ``torch.ops.swiftlora.rms_norm`` / ``rms_norm_backward`` / ``rms_norm_backward_`` (csrc/*/rms_norm.*).
The statistics are accumulated in float32 whatever the input dtype; the output has the input's dtype.
"""
from __future__ import annotations

import torch

from .._compat import below_autograd
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)

_lib = torch.ops.swiftlora


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: bool = False) -> torch.Tensor:
    """Plain-PyTorch RMSNorm: computes in float32 (float64 for float64 input) and casts back to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(compute) + (1.0 if offset else 0.0)
    return (xf * rstd * w).to(x.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``.

    Args:
        x: ``[..., H]`` float32/float16/bfloat16; any strides with unit stride on the last dim avoid a copy.
        weight: ``[H]``; cast to ``x``'s dtype if it differs (its gradient comes back in its own dtype).
        eps: added to the mean square.
        offset: Gemma style ``(1 + w)``.
        inplace_backward: write ``grad_x`` into the incoming gradient's buffer (saves one ``[..., H]`` buffer).
            Only safe when nothing else reads that gradient, e.g. inside a fused block.
    Returns:
        ``y`` with ``x``'s shape and dtype (contiguous).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"rms_norm: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if weight.dtype != x.dtype and weight.is_floating_point():
        weight = weight.to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, float(eps), bool(offset), bool(inplace_backward))
    with below_autograd():
        return _lib.rms_norm(x, weight, float(eps), bool(offset))[0]


@torch.library.register_fake("swiftlora::rms_norm")
def _(x, weight, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("swiftlora::rms_norm_backward")
def _(grad_y, x, weight, rstd, offset, weight_grad):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if weight_grad else (0,))


@torch.library.register_fake("swiftlora::rms_norm_backward_")
def _(grad_y, x, weight, rstd, offset, weight_grad):
    return weight.new_empty(weight.shape if weight_grad else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_w = ctx.needs_input_grad[1]
    grad_x, grad_w = _lib.rms_norm_backward(grad_y, x, weight, rstd, ctx.offset, need_w)
    return grad_x, (grad_w if need_w else None), None, None


torch.library.register_autograd("swiftlora::rms_norm", _backward, setup_context=_setup_context)


class _RMSNorm(torch.autograd.Function):
    """rms_norm for the Python entry point (see _compat.below_autograd for why not the op's own autograd); with
    inplace, the backward overwrites the incoming gradient with grad_x."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, inplace):
        with below_autograd():
            y, rstd = _lib.rms_norm(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.inplace = offset, inplace
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        with below_autograd():
            if ctx.inplace:
                grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
                grad_w = _lib.rms_norm_backward_(grad_y, x, weight, rstd, ctx.offset, need_w)
                grad_x = grad_y
            else:
                grad_x, grad_w = _lib.rms_norm_backward(grad_y, x, weight, rstd, ctx.offset, need_w)
        return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None
