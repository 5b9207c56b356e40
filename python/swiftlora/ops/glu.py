"""Gated MLP activations: ``swiglu(gate, up) = silu(gate) * up`` (Llama, Mistral, Qwen) and
``geglu(gate, up) = gelu(gate) * up`` (Gemma: ``approximate="tanh"``).

Kernels: ``torch.ops.swiftlora.swiglu`` / ``swiglu_backward`` / ``swiglu_backward_`` and the ``geglu`` three
(csrc/*/glu.*). The math runs in float32 whatever the input dtype; outputs have the input's dtype and shape and
are contiguous. ``gate`` and ``up`` may be the two halves of a fused gate/up projection (``gu[..., :N]``,
``gu[..., N:]``): any strides with unit stride on the last dim are read in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import below_autograd
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)

_lib = torch.ops.swiftlora
_APPROXIMATE = ("none", "tanh")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch SwiGLU: computes in float32 (float64 for float64 input) and casts back to gate's dtype."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Plain-PyTorch GeGLU (``approximate`` as in ``torch.nn.functional.gelu``): computes in float32 (float64 for
    float64 input) and casts back to gate's dtype."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.gelu(gate.to(compute), approximate=approximate) * up.to(compute)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up``.

    Args:
        gate, up: ``[..., N]`` float32/float16/bfloat16, same shape, dtype and device.
        inplace_backward: the backward writes ``grad_gate`` into ``gate``'s buffer, ``grad_up`` into ``up``'s and
            the recomputed output into the incoming gradient's (no new ``[..., N]`` buffers). Only safe when nothing
            else reads ``gate``, ``up`` or that gradient afterwards, e.g. inside a fused MLP.
    Returns:
        ``[..., N]`` with gate's dtype (contiguous).
    """
    _check_tensors("swiglu", gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _GLU.apply(gate, up, None, inplace_backward)
    with below_autograd():
        return _lib.swiglu(gate, up)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", inplace_backward: bool = False
) -> torch.Tensor:
    """``gelu(gate) * up``.

    Args:
        gate, up: ``[..., N]`` float32/float16/bfloat16, same shape, dtype and device.
        approximate: ``"none"`` (exact erf gelu) or ``"tanh"`` (the tanh approximation, Gemma's ``gelu_pytorch_tanh``).
        inplace_backward: as in :func:`swiglu`.
    Returns:
        ``[..., N]`` with gate's dtype (contiguous).
    """
    _check_tensors("geglu", gate, up)
    if approximate not in _APPROXIMATE:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    tanh = approximate == "tanh"
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _GLU.apply(gate, up, tanh, inplace_backward)
    with below_autograd():
        return _lib.geglu(gate, up, tanh)


def _check_tensors(op: str, gate, up) -> None:
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError(f"{op}: gate and up must be tensors, got {type(gate).__name__} and {type(up).__name__}")


@torch.library.register_fake("swiftlora::swiglu")
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("swiftlora::swiglu_backward")
def _(grad, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("swiftlora::swiglu_backward_")
def _(grad, gate, up):
    return None


@torch.library.register_fake("swiftlora::geglu")
def _(gate, up, approximate):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("swiftlora::geglu_backward")
def _(grad, gate, up, approximate):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("swiftlora::geglu_backward_")
def _(grad, gate, up, approximate):
    return None


def _setup_context(ctx, inputs, output):
    gate, up = inputs[:2]
    ctx.save_for_backward(gate, up)
    ctx.approximate = inputs[2] if len(inputs) > 2 else None


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    if ctx.approximate is None:
        grad_gate, grad_up = _lib.swiglu_backward(grad, gate, up)
    else:
        grad_gate, grad_up = _lib.geglu_backward(grad, gate, up, ctx.approximate)
    grads = (grad_gate if ctx.needs_input_grad[0] else None, grad_up if ctx.needs_input_grad[1] else None)
    return grads if ctx.approximate is None else (*grads, None)


torch.library.register_autograd("swiftlora::swiglu", _backward, setup_context=_setup_context)
torch.library.register_autograd("swiftlora::geglu", _backward, setup_context=_setup_context)


def _writable_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` when the kernels can write it in place as rows ``[R, N]`` (unit stride on the last dim, rows that do
    not overlap), else a contiguous copy."""
    n = t.shape[-1]
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        return t.contiguous()
    if (n > 1 and rows.stride(1) != 1) or (rows.shape[0] > 1 and rows.stride(0) < n):
        return t.contiguous()
    return t


class _GLU(torch.autograd.Function):
    """swiglu (approximate None) or geglu (approximate a bool) for the Python entry points (see
    _compat.below_autograd for why not the op's own autograd). With inplace, the backward overwrites gate with
    grad_gate, up with grad_up and the incoming gradient with the recomputed output."""

    @staticmethod
    def forward(ctx, gate, up, approximate, inplace):
        ctx.save_for_backward(gate, up)
        ctx.approximate, ctx.inplace = approximate, inplace
        with below_autograd():
            return _lib.swiglu(gate, up) if approximate is None else _lib.geglu(gate, up, approximate)

    @staticmethod
    def backward(ctx, grad):
        gate, up = (t.detach() for t in ctx.saved_tensors)
        need_gate, need_up = ctx.needs_input_grad[:2]
        if not ctx.inplace:
            with below_autograd():
                if ctx.approximate is None:
                    grad_gate, grad_up = _lib.swiglu_backward(grad, gate, up)
                else:
                    grad_gate, grad_up = _lib.geglu_backward(grad, gate, up, ctx.approximate)
            return (grad_gate if need_gate else None), (grad_up if need_up else None), None, None
        # An input whose gradient nobody wants keeps its values (as does up when it is gate, e.g. swiglu(x, x)):
        # the kernel writes into a copy of it instead.
        keep = (not need_gate, not need_up or up.data_ptr() == gate.data_ptr())
        gate, up = (t.clone(memory_format=torch.contiguous_format) if k else _writable_rows(t)
                    for t, k in zip((gate, up), keep))
        grad = _writable_rows(grad)
        with below_autograd():
            if ctx.approximate is None:
                _lib.swiglu_backward_(grad, gate, up)
            else:
                _lib.geglu_backward_(grad, gate, up, ctx.approximate)
        return (gate if need_gate else None), (up if need_up else None), None, None
