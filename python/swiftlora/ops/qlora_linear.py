"""LoRA linears over frozen NF4 (QLoRA) or dense (16-bit LoRA) base weights:
``y = x @ Wᵀ (+ bias) + scale · (dropout(x) @ Aᵀ) @ Bᵀ``.

Kernels: ``torch.ops.swiftlora.qlora_linear`` / ``qlora_linear_backward`` (csrc/common/qlora_host.h and
csrc/*/qlora_linear.*): P projections of one input in one call, the NF4 weight dequantized into a scratch buffer
that one GEMM reads (never kept: the backward dequantizes again). The op returns ``xa = dropout(x) @ Aᵀ`` beside y;
the backward saves ``x``, ``xa`` and the dropout masks, and forms ``grad_A``, ``grad_B`` from the op's ``grad_xa``.
All matmuls run in x's dtype (the compute dtype) with float32 accumulation; ``grad_A``/``grad_B``/``grad_bias``
come back in the parameters' own dtypes.

Plan (:func:`qlora_plan`): by default, on sm_90a (H100/H200) the forward over NF4 weights runs
:func:`~swiftlora.ops.qlora_gemm`'s kernel, which dequantizes inside the wgmma GEMM (no 16-bit copy of W) with the
LoRA term as one more k-tile, one launch per projection; elsewhere, and in the backward, the weight is dequantized
into a scratch panel that one cuBLAS GEMM reads. A ``qlora_plan`` block with an explicit chunk count takes the
dequantize + cuBLAS path in the forward too, optionally in chunks overlapped on a side stream
(csrc/common/qlora_pipeline.h; benchmarks, tests).

Dropout: with ``dropout_p > 0`` each projection draws its own keep-mask (``dropout_masks``, optionally from a
``generator``), as PEFT's per-layer ``nn.Dropout`` would; pass masks explicitly to reproduce a run or to check
against :func:`qlora_linear_reference`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Sequence

import torch

from .._compat import below_autograd, mm_fp32
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)
from .lora_weights import BaseWeight, LoRAProjection, check_projection, dense_base, op_lists

_lib = torch.ops.swiftlora


class QLoRAPlan(NamedTuple):
    """How the qlora ops run their NF4 GEMMs. ``chunks``: <= 0 automatic (the forward through the fused sm_90a
    kernel where it applies, else one dequantization and one GEMM, as the backward), 1 one dequantization then one
    GEMM in the forward too, n up to n dequantize/GEMM chunks overlapped on two streams (fewer when the weight is
    small; sequential on the CPU): less scratch memory, two chunk buffers instead of the whole weight.
    ``panel_align``: the folded LoRA columns pad ``K + r`` to a multiple of it (8: 16-byte rows; 64: whole 64-wide
    GEMM k-tiles)."""

    chunks: int = -1
    panel_align: int = 8


_plan = QLoRAPlan()


@contextlib.contextmanager
def qlora_plan(chunks: int = -1, panel_align: int = 8) -> Iterator[QLoRAPlan]:
    """Within the block, LoRA linears built on the qlora ops (:func:`qlora_linear`, ``lora_qkv``, ``lora_mlp``) run
    with this :class:`QLoRAPlan`; their backward keeps the plan of its forward."""
    global _plan
    if not (isinstance(chunks, int) and isinstance(panel_align, int)):
        raise TypeError(f"qlora_plan: chunks and panel_align must be ints, got {chunks!r}, {panel_align!r}")
    if panel_align < 8 or panel_align > 256 or panel_align % 8:
        raise ValueError(f"qlora_plan: panel_align must be a multiple of 8 in [8, 256], got {panel_align}")
    saved, _plan = _plan, QLoRAPlan(chunks, panel_align)
    try:
        yield _plan
    finally:
        _plan = saved


def current_plan() -> QLoRAPlan:
    """The plan a LoRA linear started now runs with."""
    return _plan


def lora_reference(x: torch.Tensor, proj: LoRAProjection, dropout_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Plain-PyTorch LoRA projection in x's dtype (PEFT's formula): the base weight dequantized (or cast) to x's
    dtype, A and B cast to it, ``x @ Wᵀ + bias + ((x·mask/(1-p)) @ Aᵀ) @ Bᵀ · scale``."""
    dt = x.dtype
    y = x @ dense_base(proj.base, dt).t()
    if proj.bias is not None:
        y = y + proj.bias.to(dt)
    xl = x if dropout_mask is None else x * dropout_mask * (1.0 / (1.0 - dropout_p))
    return y + (xl @ proj.lora_a.to(dt).t()) @ proj.lora_b.to(dt).t() * proj.scale


def qlora_linear_reference(x, base: BaseWeight, lora_a, lora_b, scale: float = 1.0, bias=None,
                           dropout_p: float = 0.0, dropout_mask=None) -> torch.Tensor:
    """:func:`qlora_linear` in plain PyTorch (no dropout unless ``dropout_mask`` is given)."""
    return lora_reference(x, LoRAProjection(base, lora_a, lora_b, scale, bias), dropout_mask, dropout_p)


def dropout_masks(x: torch.Tensor, p: float, count: int, generator: torch.Generator | None = None,
                  shape=None) -> list[torch.Tensor]:
    """``count`` independent bool keep-masks (True with probability ``1 - p``) of ``shape`` (default x's)."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    return [torch.empty(shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)
            for _ in range(count)]


def qlora_linear(x: torch.Tensor, base: BaseWeight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0,
                 bias: torch.Tensor | None = None, dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One LoRA linear ``x @ baseᵀ (+ bias) + scale · (dropout(x) @ lora_aᵀ) @ lora_bᵀ``.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16, the compute dtype.
        base: frozen ``[N, K]``: :class:`~swiftlora.ops.NF4Weight`, or a dense tensor of x's dtype.
        lora_a: ``[r, K]``, lora_b: ``[N, r]``: float32/float16/bfloat16 (cast to x's dtype for the matmuls).
        scale: the LoRA scaling (``lora_alpha / r``).
        bias: optional ``[N]``.
        dropout_p: dropout probability on the LoRA branch's input (0 = none; the base branch never sees it).
        dropout_mask: bool ``[..., K]`` keep-mask to use instead of drawing one (kept values are scaled by
            ``1 / (1 - dropout_p)``).
        generator: for drawing the mask.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    masks = None if dropout_mask is None else [dropout_mask]
    return lora_projections(x, [LoRAProjection(base, lora_a, lora_b, scale, bias)], dropout_p, masks, generator)


def lora_projections(x: torch.Tensor, projections: Sequence[LoRAProjection], dropout_p: float = 0.0,
                     dropout_masks_: Sequence[torch.Tensor | None] | None = None,
                     generator: torch.Generator | None = None, fn: str = "qlora_linear") -> torch.Tensor:
    """Several LoRA projections of one input in one call: ``[y_1 | ... | y_P]`` ``[..., Σ N_p]`` (e.g. q, k, v).
    Each projection gets its own dropout mask (``dropout_masks_``: one bool ``[..., K]`` mask or None per
    projection). See :func:`qlora_linear` for the rest."""
    projs, masks, dscale = prepare(fn, x, projections, dropout_p, dropout_masks_, generator)
    spec = _Spec(projs, dscale)
    tensors = [t for p in projs for t in (p.lora_a, p.lora_b, p.bias)]
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return _LoRALinear.apply(spec, x, *tensors, *masks)
    with below_autograd():
        return spec.forward(x, masks)[0]


def prepare(fn: str, x, projections, dropout_p, masks, generator):
    """Checks the Python-side arguments; returns (projections, masks (one per projection, None = no dropout),
    dropout scale)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    projs = list(projections)
    if not projs:
        raise ValueError(f"{fn}: at least one projection is needed")
    for i, p in enumerate(projs):
        check_projection(fn, i, p, x.shape[-1] if x.dim() else -1)
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(projs):
            raise ValueError(f"{fn}: dropout masks must hold one entry (a bool mask or None) per projection "
                             f"({len(projs)}), got {len(masks)}")
    elif dropout_p > 0:
        masks = dropout_masks(x, dropout_p, len(projs), generator)
    else:
        masks = [None] * len(projs)
    return projs, masks, 1.0 / (1.0 - float(dropout_p))


def forward_op(x, projs, masks, dscale, plan: QLoRAPlan):
    """(y, xa) from torch.ops.swiftlora.qlora_linear."""
    return _lib.qlora_linear(x, *op_lists(projs), [p.bias for p in projs], _op_masks(masks), dscale, *plan)


def backward_op(grad_y, projs, masks, dscale, plan: QLoRAPlan):
    """(grad_x, grad_xa) from torch.ops.swiftlora.qlora_linear_backward."""
    return _lib.qlora_linear_backward(grad_y, *op_lists(projs), _op_masks(masks), dscale, *plan)


def factor_lists(projs) -> tuple:
    """(lora_a, lora_b, scale, bias) lists, as lora_grads takes them."""
    return ([p.lora_a for p in projs], [p.lora_b for p in projs], [float(p.scale) for p in projs],
            [p.bias for p in projs])


def _op_masks(masks):
    return [] if all(m is None for m in masks) else list(masks)


def lora_grads(factors, masks, dscale, x, xa, grad_y, grad_xa, needs):
    """(grad_A, grad_B, grad_bias) lists for the projections (``factors`` = (lora_a, lora_b, scale, bias) lists),
    each None where ``needs[kind][i]`` is False.

    grad_A_p = grad_xa_pᵀ @ dropout_p(x);  grad_B_p = scale_p · grad_y_pᵀ @ xa_p;  grad_bias_p = Σ_rows grad_y_p.
    x, xa, grad_y, grad_xa are 2-D [M, ·]; grad_xa may be None when no grad_A is needed."""
    lora_a, lora_b, scale, bias = factors
    need_a, need_b, need_bias = needs
    ga, gb, gbias = [None] * len(lora_a), [None] * len(lora_a), [None] * len(lora_a)
    r_off = n_off = 0
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        r, n = a.shape[0], b.shape[0]
        if need_a[i]:
            xl = x if masks[i] is None else x * masks[i].reshape(x.shape) * dscale
            ga[i] = _mm_as(grad_xa[:, r_off:r_off + r].t(), xl, a.dtype)
        if need_b[i]:
            gb[i] = _mm_as(grad_y[:, n_off:n_off + n].t(), xa[:, r_off:r_off + r], b.dtype, scale[i])
        if need_bias[i]:
            gbias[i] = grad_y[:, n_off:n_off + n].sum(0, dtype=torch.float32).to(bias[i].dtype)
        r_off, n_off = r_off + r, n_off + n
    return ga, gb, gbias


def _mm_as(a, b, dtype, scale: float = 1.0):
    """scale · (a @ b) in dtype: float32 results accumulate and stay in float32 (no 16-bit rounding); the scale is
    applied in float32 before the one rounding to dtype."""
    if dtype == torch.float32 and a.dtype != torch.float32:
        return mm_fp32(a, b).mul_(scale)
    out = a @ b
    if scale == 1.0:
        return out.to(dtype)
    return out.float().mul_(scale).to(dtype)


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _Spec:
    """The non-tensor half of a call: projections (their base weights and scales), the dropout scale and the plan
    (taken when the call starts, kept for its backward)."""

    __slots__ = ("projs", "dscale", "plan")

    def __init__(self, projs, dscale):
        self.projs, self.dscale, self.plan = projs, dscale, current_plan()

    def forward(self, x, masks):
        """(y, xa)."""
        return forward_op(x, self.projs, masks, self.dscale, self.plan)


class _LoRALinear(torch.autograd.Function):
    """lora_projections with autograd. Inputs: spec, x, then (A_p, B_p, bias_p) per projection, then the masks."""

    @staticmethod
    def forward(ctx, spec, x, *tensors):
        projs, np_ = spec.projs, len(spec.projs)
        masks = list(tensors[3 * np_:])
        with below_autograd():
            y, xa = spec.forward(x, masks)
        ctx.spec = spec
        ctx.save_for_backward(x, xa, *masks)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        spec = ctx.spec
        projs, np_ = spec.projs, len(spec.projs)
        x, xa, *masks = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x = need[1]
        need_a = [need[2 + 3 * i] for i in range(np_)]
        need_b = [need[3 + 3 * i] for i in range(np_)]
        need_bias = [need[4 + 3 * i] for i in range(np_)]
        grad_x = grad_xa = None
        with below_autograd():
            if need_x:
                grad_x, grad_xa = backward_op(grad_y, projs, masks, spec.dscale, spec.plan)
            elif any(need_a):
                grad_xa = rows(grad_y) @ scaled_b_block(projs, grad_y.dtype)
            ga, gb, gbias = lora_grads(factor_lists(projs), masks, spec.dscale, rows(x), rows(xa), rows(grad_y),
                                       None if grad_xa is None else rows(grad_xa), (need_a, need_b, need_bias))
        grads = [g for i in range(np_) for g in (ga[i], gb[i], gbias[i])]
        return None, grad_x, *grads, *([None] * np_)


def scaled_b_block(projs, dtype) -> torch.Tensor:
    """[N, R] with scale_p·B_p on the block diagonal (grad_xa = grad_y @ this)."""
    if len(projs) == 1:
        return (projs[0].lora_b.float() * projs[0].scale).to(dtype)
    return torch.block_diag(*[(p.lora_b.float() * p.scale).to(dtype) for p in projs])


@torch.library.register_fake("swiftlora::qlora_linear")
def _(x, weight, absmax, absmax2, code2, offset, blocksize, lora_a, lora_b, scale, bias, dropout_mask, dropout_scale,
      chunks=-1, panel_align=8):
    n = sum(b.shape[0] for b in lora_b)
    r = sum(a.shape[0] for a in lora_a)
    return x.new_empty((*x.shape[:-1], n)), x.new_empty((*x.shape[:-1], r))


@torch.library.register_fake("swiftlora::qlora_linear_backward")
def _(grad_y, weight, absmax, absmax2, code2, offset, blocksize, lora_a, lora_b, scale, dropout_mask, dropout_scale,
      chunks=-1, panel_align=8):
    k = lora_a[0].shape[1]
    r = sum(a.shape[0] for a in lora_a)
    return grad_y.new_empty((*grad_y.shape[:-1], k)), grad_y.new_empty((*grad_y.shape[:-1], r))



# Autograd of the op itself (torch.ops.swiftlora.qlora_linear called directly, e.g. under torch.compile); the Python
# entry points use _LoRALinear instead (see _compat.below_autograd).
def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1], *inputs[11])
    ctx.args = inputs
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_xa):
    x, xa, *masks = ctx.saved_tensors
    args = ctx.args
    lora_a, lora_b, scale, bias, dscale = args[7], args[8], args[9], args[10], args[12]
    masks = masks or [None] * len(lora_a)
    grad_x, grad_xa = _lib.qlora_linear_backward(grad_y, *args[1:10], args[11], dscale, *args[13:15])
    bias = list(bias) or [None] * len(lora_a)
    needs = ([a.requires_grad for a in lora_a], [b.requires_grad for b in lora_b],
             [b is not None and b.requires_grad for b in bias])
    ga, gb, gbias = lora_grads((lora_a, lora_b, scale, bias), masks, dscale, rows(x), rows(xa), rows(grad_y),
                               rows(grad_xa), needs)
    # One entry per input, lists for list inputs (the structure torch.library checks).
    grads = [[None] * len(a) if _tensor_list(a) else None for a in args]
    grads[0], grads[7], grads[8] = grad_x, ga, gb
    if args[10] and _tensor_list(args[10]):
        grads[10] = gbias
    # args has the defaulted plan arguments filled in; the gradients follow the arguments as passed (the dispatcher
    # drops trailing ones equal to their defaults), whose structure needs_input_grad has.
    return tuple(grads[:len(ctx.needs_input_grad)])


def _tensor_list(a) -> bool:
    """Lists of tensors get a list of gradients; any other argument (lists with a None included, which
    torch.library treats as one non-differentiable leaf, so a bias list with a None gets no gradients) gets None."""
    return isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a)


torch.library.register_autograd("swiftlora::qlora_linear", _backward, setup_context=_setup_context)
