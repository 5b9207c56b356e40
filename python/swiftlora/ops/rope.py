"""Rotary position embedding (rotate-half convention) applied to q and k in one call.

Kernels: ``torch.ops.swiftlora.rope`` / ``rope_`` (csrc/*/rope.*). For every head of q and k, with ``R/2 =
cos.size(-1)`` and ``i < R/2``::

    out[i]       = x[i] * cos[i] - x[i + R/2] * sin[i]
    out[i + R/2] = x[i + R/2] * cos[i] + x[i] * sin[i]

and dims ``[R, head_dim)`` pass through (partial rotary). ``inverse=True`` rotates backwards, which is also the
backward pass. Math in float32; the output has q's dtype.

Tables are half width, ``cos[..., i] = cos(position * inv_freq[i]) * attention_scaling``: either one table
``[T, R/2]`` indexed by ``position_ids`` (or by the token's index when None), or per token
``[B or 1, S, R/2]``. :mod:`swiftlora.nn.rotary` builds and caches them from a model config; HF's full-width
``(cos, sin)`` (halves duplicated) convert with :func:`half_tables`.
"""
from __future__ import annotations

import torch

from .._compat import below_autograd
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)

_lib = torch.ops.swiftlora
_LAYOUTS = ("bshd", "bhsd")


def half_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style ``cos``/``sin`` ``[..., R]`` (``cat(freqs, freqs)``) -> the half-width views rope takes."""
    r = cos.shape[-1]
    if r % 2:
        raise ValueError(f"half_tables: cos's last dim must be even (two copies of R/2 frequencies), got {r}")
    return cos[..., : r // 2], sin[..., : r // 2]


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"rope: layout must be one of {_LAYOUTS}, got {layout!r}")


def _to_bshd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "bhsd" and t.dim() == 4 else t


def _table_dtype(cos: torch.Tensor, q: torch.Tensor) -> torch.dtype:
    return cos.dtype if cos.dtype in (torch.float32, q.dtype) else torch.float32


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    layout: str = "bshd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch rope in float32 (float64 for float64 input), cast back to q's dtype."""
    _check_layout(layout)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qb, kb = _to_bshd(q, layout), _to_bshd(k, layout)
    seq, half = qb.shape[1], cos.shape[-1]
    if cos.dim() == 2:
        idx = position_ids.long() if position_ids is not None else torch.arange(seq, device=q.device)[None]
        c, s = cos[idx], sin[idx]  # [B|1, S, R/2]
    else:
        c, s = cos, sin
    c, s = c.to(compute)[:, :, None, :], s.to(compute)[:, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute)
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1).to(q.dtype)

    return _to_bshd(rotate(qb), layout), _to_bshd(rotate(kb), layout)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    layout: str = "bshd",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the positions' angles.

    Args:
        q: ``[B, S, Hq, D]`` (layout ``"bshd"``) or ``[B, Hq, S, D]`` (``"bhsd"``), float32/float16/bfloat16.
            Any strides with unit stride on D are read in place (e.g. q sliced from a fused qkv projection).
        k: same layout, batch, seq and D as q; its head count may differ (GQA).
        cos, sin: half-width tables ``[T, R/2]`` or ``[B or 1, S, R/2]``, float32 or q's dtype (other float dtypes
            are cast to float32). They get no gradient.
        position_ids: ``[B or 1, S]`` int64/int32 rows of a ``[T, R/2]`` table; None means ``arange(S)``.
            On CPU a position outside ``[0, T)`` raises; on CUDA (no host sync) it makes that token's output NaN.
        layout: ``"bshd"`` or ``"bhsd"``.
        inplace: rotate q and k in their own buffers (they are returned); the backward is out of place.
    Returns:
        ``(q_rotated, k_rotated)`` in the input layout.
    """
    _check_layout(layout)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a tensor, got {type(t).__name__}")
    tdt = _table_dtype(cos, q)
    if cos.dtype != tdt or sin.dtype != tdt:
        cos, sin = cos.to(tdt), sin.to(tdt)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rope.apply(q, k, cos, sin, position_ids, layout, inplace)
    qb, kb = _to_bshd(q, layout), _to_bshd(k, layout)
    with below_autograd():
        if inplace:
            _lib.rope_(qb, kb, cos, sin, position_ids, False)
            return q, k
        qo, ko = _lib.rope(qb, kb, cos, sin, position_ids, False)
    return _to_bshd(qo, layout), _to_bshd(ko, layout)


@torch.library.register_fake("swiftlora::rope")
def _(q, k, cos, sin, position_ids, inverse):
    return torch.empty_like(q if q.stride(-1) == 1 else q.contiguous()), torch.empty_like(
        k if k.stride(-1) == 1 else k.contiguous()
    )


@torch.library.register_fake("swiftlora::rope_")
def _(q, k, cos, sin, position_ids, inverse):
    return None


def _rotate_grads(gq, gk, q_meta, k_meta, cos, sin, position_ids, inverse):
    """The backward of a rotation is the opposite rotation; an unused output's gradient is zero. q_meta/k_meta:
    (shape, dtype, device) of the inputs, in the [B, S, H, D] order the kernel sees."""
    if gq is None and gk is None:
        return None, None
    gq = torch.zeros(q_meta[0], dtype=q_meta[1], device=q_meta[2]) if gq is None else gq
    gk = torch.zeros(k_meta[0], dtype=k_meta[1], device=k_meta[2]) if gk is None else gk
    return _lib.rope(gq, gk, cos, sin, position_ids, inverse)


def _meta(t: torch.Tensor, layout: str = "bshd"):
    b = _to_bshd(t, layout)
    return b.shape, b.dtype, b.device


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, inverse = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.inverse = inverse
    ctx.meta = (_meta(q), _meta(k))


def _backward(ctx, gq, gk):
    cos, sin, position_ids = ctx.saved_tensors
    dq, dk = _rotate_grads(gq, gk, *ctx.meta, cos, sin, position_ids, not ctx.inverse)
    return dq, dk, None, None, None, None


torch.library.register_autograd("swiftlora::rope", _backward, setup_context=_setup_context)


class _Rope(torch.autograd.Function):
    """rope for the Python entry point (see _compat.below_autograd for why not the op's own autograd). In place,
    q and k are rotated in their buffers and marked dirty; the backward always rotates the grads out of place."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, layout, inplace):
        qb, kb = _to_bshd(q, layout), _to_bshd(k, layout)
        with below_autograd():
            if inplace:
                _lib.rope_(qb, kb, cos, sin, position_ids, False)
                ctx.mark_dirty(q, k)
                out = q, k
            else:
                qo, ko = _lib.rope(qb, kb, cos, sin, position_ids, False)
                out = _to_bshd(qo, layout), _to_bshd(ko, layout)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.layout = layout
        ctx.meta = ((qb.shape, q.dtype, q.device), (kb.shape, k.dtype, k.device))  # for an unused output's grad
        return out

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin, position_ids = ctx.saved_tensors
        lay = ctx.layout
        with below_autograd():
            dq, dk = _rotate_grads(
                None if gq is None else _to_bshd(gq, lay), None if gk is None else _to_bshd(gk, lay),
                *ctx.meta, cos, sin, position_ids, True,
            )
        if dq is not None:
            dq, dk = _to_bshd(dq, lay), _to_bshd(dk, lay)
        return dq, dk, None, None, None, None, None
