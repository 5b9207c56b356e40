"""The gated MLP with LoRA on all three projections: ``down(act(gate(x)) · up(x))``, act SiLU (SwiGLU: Llama,
Mistral, Qwen) or GeLU (GeGLU: Gemma), each projection ``x @ Wᵀ + scale · (dropout(x) @ Aᵀ) @ Bᵀ`` over a frozen
NF4 or dense base weight.

Forward: one ``qlora_linear`` op for gate and up together (they share x: one weight panel, one GEMM, output
``gu = [gate | up]``), the activation kernel, one op for down. Saved for the backward: x, gu (the pre-activation
projections) and the LoRA inputs xa (``[M, r]`` each); ``h = act(gate)·up`` is not kept.
Backward, everything written into buffers the block owns: ``dh = grad_y @ W_down + ...``; the in-place activation
backward then turns dh into h (recomputed, for down's grad_A) and gu into ``[d gate | d up]``, which is exactly the
gradient the gate/up op's backward takes. Because gu is overwritten, the backward runs once per forward (no
``retain_graph=True``), as in Unsloth's LoRA MLP.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._compat import below_autograd
from .glu import geglu_reference, swiglu_reference
from .lora_weights import LoRAProjection
from .qlora_linear import (backward_op, current_plan, dropout_masks as draw_masks, factor_lists, forward_op,
                           lora_grads, lora_reference, prepare, rows, scaled_b_block)

_lib = torch.ops.swiftlora
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")  # geglu: exact erf GeLU; geglu_tanh: Gemma's gelu_pytorch_tanh


def lora_mlp(x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
             activation: str = "swiglu", dropout_p: float = 0.0,
             dropout_masks: Sequence[torch.Tensor | None] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``down(act(gate(x)) · up(x))`` with LoRA.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16 (the compute dtype).
        gate, up: projections ``[F, K]``; down: ``[K_out, F]`` (:class:`~swiftlora.ops.LoRAProjection`, NF4 or
            dense base weights).
        activation: ``"swiglu"``, ``"geglu"`` (exact erf GeLU) or ``"geglu_tanh"``.
        dropout_p: LoRA dropout; gate, up and down each draw their own mask unless ``dropout_masks`` is given:
            (gate's and up's bool ``[..., K]``, down's bool ``[..., F]``), None entries for no dropout.
        generator: for drawing the masks.
    Returns:
        ``[..., K_out]`` in x's dtype.
    """
    fn = "lora_mlp"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    masks = None if dropout_masks is None else list(dropout_masks)
    if masks is not None and len(masks) != 3:
        raise ValueError(f"{fn}: dropout_masks must hold three entries (gate, up, down; a bool mask or None), "
                         f"got {len(masks)}")
    if masks is None and dropout_p > 0:
        f = gate.out_features if isinstance(gate, LoRAProjection) else 0
        masks = (draw_masks(x, dropout_p, 2, generator)
                 + draw_masks(x, dropout_p, 1, generator, shape=(*x.shape[:-1], f)))
    gu_projs, gu_masks, dscale = prepare(fn, x, (gate, up), dropout_p, None if masks is None else masks[:2], None)
    if gate.out_features != up.out_features:
        raise ValueError(f"{fn}: gate and up must have the same width, got {gate.out_features} and {up.out_features}")
    h_like = torch.empty((*x.shape[:-1], gate.out_features), device="meta")  # h's shape, for down's checks
    (down_proj,), down_masks, _ = prepare(fn, h_like, (down,), dropout_p, None if masks is None else masks[2:], None)
    projs, all_masks = (*gu_projs, down_proj), (*gu_masks, *down_masks)
    tensors = [t for p in projs for t in (p.lora_a, p.lora_b, p.bias)]
    spec = _Spec(projs, dscale, activation)
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return _LoRAMLP.apply(spec, x, *tensors, *all_masks)
    with below_autograd():
        return _forward(spec, x, all_masks)[0]


def lora_mlp_reference(x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection,
                       activation: str = "swiglu", dropout_p: float = 0.0,
                       dropout_masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """:func:`lora_mlp` in plain PyTorch, in x's dtype (no dropout unless masks are given)."""
    m = dropout_masks or (None, None, None)
    g = lora_reference(x, gate, m[0], dropout_p)
    u = lora_reference(x, up, m[1], dropout_p)
    h = swiglu_reference(g, u) if activation == "swiglu" else geglu_reference(
        g, u, "tanh" if activation == "geglu_tanh" else "none")
    return lora_reference(h, down, m[2], dropout_p)


class _Spec:
    __slots__ = ("projs", "dscale", "activation", "plan")

    def __init__(self, projs, dscale, activation):
        self.projs, self.dscale, self.activation, self.plan = projs, dscale, activation, current_plan()


def _activation(spec, g, u):
    if spec.activation == "swiglu":
        return _lib.swiglu(g, u)
    return _lib.geglu(g, u, spec.activation == "geglu_tanh")


def _activation_backward_(spec, dh, g, u):
    """dh <- h (recomputed), g <- grad_gate, u <- grad_up."""
    if spec.activation == "swiglu":
        _lib.swiglu_backward_(dh, g, u)
    else:
        _lib.geglu_backward_(dh, g, u, spec.activation == "geglu_tanh")


def _forward(spec, x, masks):
    """(y, gu, xa_gu, xa_down)."""
    gate, up, down = spec.projs
    gu, xa_gu = forward_op(x, (gate, up), masks[:2], spec.dscale, spec.plan)
    f = gate.out_features
    h = _activation(spec, gu[..., :f], gu[..., f:])
    y, xa_down = forward_op(h, (down,), masks[2:], spec.dscale, spec.plan)
    return y, gu, xa_gu, xa_down


class _LoRAMLP(torch.autograd.Function):
    """Inputs: spec, x, (A, B, bias) of gate, up, down, then their three dropout masks (or None)."""

    @staticmethod
    def forward(ctx, spec, x, *tensors):
        masks = tensors[9:]
        with below_autograd():
            y, gu, xa_gu, xa_down = _forward(spec, x, masks)
        ctx.spec, ctx.done = spec, False
        ctx.save_for_backward(x, gu, xa_gu, xa_down, *masks)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.done:
            raise RuntimeError("lora_mlp: the backward overwrites the saved activations with their gradients, so it "
                               "runs once per forward (retain_graph=True is not supported)")
        ctx.done = True
        spec = ctx.spec
        gate, up, down = spec.projs
        x, gu, xa_gu, xa_down, *masks = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = [[need[2 + 3 * i + j] for i in range(3)] for j in range(3)]  # [kind][projection]: A, B, bias
        need_x = need[1]
        need_upstream = need_x or any(needs[j][i] for j in range(3) for i in range(2))
        f = gate.out_features
        g, u = gu[..., :f], gu[..., f:]
        with below_autograd():
            if need_upstream:
                dh, gxa_down = backward_op(grad_y, (down,), masks[2:], spec.dscale, spec.plan)
                _activation_backward_(spec, dh, g, u)  # dh <- h; gu <- [d gate | d up]
                h = dh
            else:
                h = _activation(spec, g, u) if needs[0][2] else None
                gxa_down = rows(grad_y) @ scaled_b_block((down,), grad_y.dtype) if needs[0][2] else None
            down_grads = lora_grads(factor_lists((down,)), masks[2:], spec.dscale, None if h is None else rows(h),
                                    rows(xa_down), rows(grad_y), None if gxa_down is None else rows(gxa_down),
                                    [n[2:] for n in needs])
            grad_x, gu_grads = None, ([None] * 2,) * 3
            if need_upstream:
                grad_x, gu_grads = _gate_up_backward(spec, x, gu, xa_gu, masks[:2], need_x, [n[:2] for n in needs])
        grads = [gu_grads[j][i] for i in range(2) for j in range(3)] + [down_grads[j][0] for j in range(3)]
        return None, grad_x, *grads, None, None, None


def _gate_up_backward(spec, x, dgu, xa_gu, masks, need_x, needs):
    """(grad_x, (grad_A, grad_B, grad_bias) lists of gate and up) from dgu = [d gate | d up]."""
    projs = spec.projs[:2]
    grad_x = grad_xa = None
    if need_x:
        grad_x, grad_xa = backward_op(dgu, projs, masks, spec.dscale, spec.plan)
    elif any(needs[0]):
        grad_xa = rows(dgu) @ scaled_b_block(projs, dgu.dtype)
    return grad_x, lora_grads(factor_lists(projs), masks, spec.dscale, rows(x), rows(xa_gu), rows(dgu),
                              None if grad_xa is None else rows(grad_xa), needs)
