"""Cross-entropy over a vocabulary, and the softmax-over-vocab primitives it (and the fused and log-prob ops) use.

Kernels (csrc/*/cross_entropy.*), on logits rows ``x [N, V]`` with ``z = softcap·tanh(logit_scale·x/softcap)``
(``softcap > 0``) or ``logit_scale·x``, ``p = softmax(z)``, ``lse = log Σ exp z``:

- ``softmax_stats(x, labels, ignore_index, softcap, logit_scale, with_entropy)`` -> float32 ``[N]`` each:
  ``(lse, z[label] (0 without one), Σ_j z_j, Σ_j p_j z_j (or an empty tensor))``;
- ``softmax_grad(x, labels, ignore_index, lse, coef, softcap, logit_scale)`` -> ``[N, V]`` in x's dtype,
  ``(a·p_j + b·[j = label] + c + d·p_j·z_j)·dz_j/dx_j`` with ``coef [N, 4] = (a, b, c, d)``; ``softmax_grad_``
  writes it into x;
- ``cross_entropy_fused_(x, labels, ignore_index, label_smoothing, z_loss, softcap, logit_scale, grad_scale)``
  -> ``(loss, lse)``: per-row loss ``lse − (1−ε)·z[label] − (ε/V)·Σ z + z_loss·lse²`` (0 for rows without a label)
  and the gradient of ``Σ grad_scale_i·loss_i`` written into x (the lse of a row without a label is not used);
- ``scale_rows_(t, scale)``: ``t *= scale`` per row, rows whose scale is exactly 1 untouched.

A row has no label when labels is None or its label equals ignore_index; any other label outside ``[0, V)``
raises IndexError on CPU (CUDA, without a host sync, makes that row's values NaN). Math is float32 throughout.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._compat import below_autograd, bump_version
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)

_lib = torch.ops.swiftlora
_REDUCTIONS = ("none", "sum", "mean")


class CEOptions(NamedTuple):
    """Validated cross-entropy options (softcap 0 = off)."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float
    logit_scale: float
    z_loss: float


def ce_options(fn, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None, logit_scale=1.0,
               z_loss=0.0, num_items_in_batch=None) -> CEOptions:
    """The options of cross_entropy / fused_linear_cross_entropy, checked; ValueError naming the bad one."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    cap = 0.0 if softcap is None else float(softcap)
    if not (cap >= 0.0 and math.isfinite(cap)):
        raise ValueError(f"{fn}: softcap must be None (off) or finite and > 0, got {softcap}")
    scale = float(logit_scale)
    if not (math.isfinite(scale) and scale != 0.0):
        raise ValueError(f"{fn}: logit_scale must be finite and nonzero, got {logit_scale}")
    if not (float(z_loss) >= 0.0 and math.isfinite(float(z_loss))):
        raise ValueError(f"{fn}: z_loss must be finite and >= 0, got {z_loss}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"{fn}: num_items_in_batch replaces the divisor of reduction='mean' (the loss is "
                         f"sum / num_items_in_batch); it cannot be combined with reduction={reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    return CEOptions(ignore_index, reduction, float(label_smoothing), cap, scale, float(z_loss))


def rows_of(fn, logits: torch.Tensor, labels: torch.Tensor | None, last: str = "vocab", label_name: str = "labels"):
    """``logits [..., V]`` as rows ``[N, V]`` with unit stride on V (a view when possible), labels as ``[N]``
    (labels of shape ``[...]`` or ``[N]``), and the batch shape ``[...]``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: expected a tensor [..., {last}], got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError(f"{fn}: expected a tensor [..., {last}], got a scalar")
    batch = logits.shape[:-1]
    x2 = logits.reshape(-1, logits.shape[-1])
    if x2.stride(-1) != 1 and x2.shape[-1] > 1:
        x2 = x2.contiguous()
    if labels is None:
        return x2, None, batch
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: {label_name} must be a tensor, got {type(labels).__name__}")
    if labels.shape != batch and not (labels.dim() == 1 and labels.numel() == x2.shape[0]):
        raise ValueError(f"{fn}: {label_name} must have shape {tuple(batch)} (or [{x2.shape[0]}]), got "
                         f"{tuple(labels.shape)}")
    return x2, labels.reshape(-1), batch


def mean_divisor(labels: torch.Tensor, ignore_index: int, num_items_in_batch, with_inverse: bool = False):
    """float32 [] on labels' device: num_items_in_batch, or the number of labelled rows (labels != ignore_index); at
    least 1 (an all-ignored batch gives loss 0 and zero gradient), computed on the device (no host sync).
    with_inverse: returns (divisor, 1/divisor or None); counting labels gives both from one kernel (mean_divisor op:
    the torch expression, ne + sum + clamp + reciprocal, was four launches ahead of every in-place cross-entropy)."""
    inverse = None
    if num_items_in_batch is None:
        pair = _lib.mean_divisor(labels, ignore_index)
        divisor, inverse = pair[0], pair[1]
    elif isinstance(num_items_in_batch, torch.Tensor):
        n = num_items_in_batch.to(device=labels.device, dtype=torch.float32, non_blocking=True).reshape(())
        divisor = n.clamp_min(1)
    else:
        divisor = torch.tensor(max(float(num_items_in_batch), 1.0), dtype=torch.float32, device=labels.device)
    return (divisor, inverse) if with_inverse else divisor


def mean_divisor_reference(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The mean_divisor op in plain PyTorch: float32 [2] = (max(#labelled rows, 1), its reciprocal)."""
    d = (labels != ignore_index).sum(dtype=torch.float32).clamp_min(1)
    return torch.stack((d, d.reciprocal()))


def row_loss(stats, valid: torch.Tensor, o: CEOptions, vocab: int) -> torch.Tensor:
    """Per-row loss from softmax_stats' (lse, z_label, z_sum): 0 for rows without a label."""
    lse, z_label, z_sum = stats[0], stats[1], stats[2]
    loss = lse - (1.0 - o.label_smoothing) * z_label
    if o.label_smoothing:
        loss = loss - (o.label_smoothing / vocab) * z_sum
    if o.z_loss:
        loss = loss + o.z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def ce_coef(g: torch.Tensor, lse: torch.Tensor, o: CEOptions, vocab: int) -> torch.Tensor:
    """softmax_grad's coef [N, 4] for d(Σ g_i·loss_i)/dz: a = g(1 + 2·z_loss·lse), b = −g(1−ε), c = −g·ε/V, d = 0."""
    a = g * (1.0 + 2.0 * o.z_loss * lse) if o.z_loss else g
    return torch.stack((a, g * -(1.0 - o.label_smoothing), g * -(o.label_smoothing / vocab), torch.zeros_like(g)), 1)


def reduce_rows(rows: torch.Tensor, o: CEOptions, batch, divisor: torch.Tensor | None) -> torch.Tensor:
    if o.reduction == "none":
        return rows.view(batch)
    total = rows.sum()
    return total if o.reduction == "sum" else total / divisor


def grad_rows(grad: torch.Tensor, o: CEOptions, divisor: torch.Tensor | None) -> torch.Tensor:
    """The loss's incoming gradient as one float32 weight per row (or [] for sum/mean, which broadcasts)."""
    if o.reduction == "none":
        return grad.reshape(-1).to(torch.float32)
    g = grad.to(torch.float32).reshape(())
    return g / divisor if o.reduction == "mean" else g


def forward_grad_scale(dtype: torch.dtype, divisor: torch.Tensor | None, device, inverse: torch.Tensor | None = None):
    """For a gradient formed in the forward, before the upstream gradient is known: (grad_scale for the kernel,
    divisor left for the backward). bf16/fp32 take 1/divisor at once (``inverse`` when the caller has it);
    float16 (normal range from 6e-5) stays at unit scale and the backward applies upstream/divisor as one float32
    factor, so the probabilities of a large batch are not pushed into fp16's subnormals before a GradScaler's large
    upstream gradient can lift them."""
    if divisor is None or dtype == torch.float16:
        return torch.ones((), dtype=torch.float32, device=device), divisor
    return (divisor.reciprocal() if inverse is None else inverse), None  # IEEE 1/x either way


def backward_scale(grad: torch.Tensor, o: CEOptions, divisor: torch.Tensor | None) -> torch.Tensor:
    """The float32 factor (per row for reduction "none") that turns a forward-formed gradient into the final one."""
    s = grad.reshape(-1 if o.reduction == "none" else ()).to(torch.float32)
    return s if divisor is None else s / divisor


# ----------------------------------------------------------------------------------------------- references


def _z_reference(logits: torch.Tensor, softcap: float, logit_scale: float) -> torch.Tensor:
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute) * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def _label_mask(labels, n, ignore_index, device):
    if labels is None:
        return torch.zeros(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.long, device=device)
    labels = labels.reshape(-1).long()
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, 0)


def softmax_stats_reference(logits, labels=None, ignore_index=-100, softcap=0.0, logit_scale=1.0,
                            with_entropy=False):
    """softmax_stats in plain PyTorch (float32, float64 for float64 input)."""
    z = _z_reference(logits, softcap, logit_scale)
    valid, safe = _label_mask(labels, z.shape[0], ignore_index, z.device)
    lse = torch.logsumexp(z, -1)
    z_label = torch.where(valid, z.gather(1, safe[:, None])[:, 0], 0.0)
    ent = (torch.softmax(z, -1) * z).sum(-1) if with_entropy else z.new_empty(0)
    return lse, z_label, z.sum(-1), ent


def softmax_grad_reference(logits, labels, ignore_index, lse, coef, softcap=0.0, logit_scale=1.0):
    """softmax_grad in plain PyTorch, returned in logits' dtype."""
    xf = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32).detach().requires_grad_()
    z = _z_reference(xf, softcap, logit_scale)
    (dz,) = torch.autograd.grad(z.sum(), xf) if xf.requires_grad else (None,)
    valid, safe = _label_mask(labels, z.shape[0], ignore_index, z.device)
    z = z.detach()
    p = torch.exp(z - lse.to(z.dtype)[:, None])
    c = coef.to(z.dtype)
    onehot = torch.nn.functional.one_hot(safe, z.shape[1]).to(z.dtype) * valid[:, None]
    g = c[:, :1] * p + c[:, 1:2] * onehot + c[:, 2:3] + c[:, 3:4] * p * z
    return (g * dz).to(logits.dtype)


def cross_entropy_reference(logits, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                            softcap=None, logit_scale=1.0, z_loss=0.0, num_items_in_batch=None):
    """cross_entropy in plain PyTorch (log_softmax in float32, float64 for float64 input); differentiable."""
    o = ce_options("cross_entropy_reference", ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss,
                   num_items_in_batch)
    batch = logits.shape[:-1]
    z = _z_reference(logits.reshape(-1, logits.shape[-1]), o.softcap, o.logit_scale)
    valid, safe = _label_mask(labels, z.shape[0], o.ignore_index, z.device)
    logp = torch.log_softmax(z, -1)
    loss = -(1.0 - o.label_smoothing) * logp.gather(1, safe[:, None])[:, 0] - o.label_smoothing * logp.mean(-1)
    loss = loss + o.z_loss * torch.logsumexp(z, -1) ** 2
    loss = torch.where(valid, loss, 0.0)
    if o.reduction == "none":
        return loss.view(batch)
    if o.reduction == "sum":
        return loss.sum()
    n = valid.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    n = n.to(loss.device, loss.dtype).reshape(()) if isinstance(n, torch.Tensor) else float(n)
    return loss.sum() / (n.clamp_min(1) if isinstance(n, torch.Tensor) else max(n, 1.0))


# --------------------------------------------------------------------------------------------------- the op


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
                  z_loss: float = 0.0, num_items_in_batch: int | torch.Tensor | None = None,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Cross-entropy of ``logits [..., V]`` against ``labels [...]``, as ``torch.nn.functional.cross_entropy``.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16, unit stride on V to avoid a copy; never upcast.
        labels: ``[...]`` (or flat ``[N]``) int64/int32 on logits' device, in ``[0, V)`` or ``ignore_index``.
        ignore_index: label of rows that count neither in the loss nor in the mean's divisor.
        reduction: ``"none"`` (float32 ``[...]``, 0 for ignored rows), ``"sum"``, or ``"mean"`` over the labelled
            rows (an all-ignored batch gives loss 0 and zero gradient, never NaN).
        label_smoothing: ε: the target is ``(1−ε)·onehot + ε/V`` (torch's definition).
        softcap: Gemma 2/3 final logit soft-capping ``cap·tanh(z/cap)`` (None or 0: off), after logit_scale.
        logit_scale: multiplies the logits first (Cohere ``logit_scale``, Granite ``1/logits_scaling``).
        z_loss: adds ``z_loss·lse²`` per labelled row (PaLM's z-loss).
        num_items_in_batch: with reduction "mean", the divisor instead of the local label count, as transformers
            passes it under gradient accumulation (loss = sum / num_items_in_batch); int or tensor, no host sync.
        inplace_backward: compute the gradient in the forward, **overwriting logits with it** (no second ``[N, V]``
            buffer: the backward only scales it by the incoming gradient). Logits must not be used afterwards.
            Autograd's version counter of logits is bumped, so an earlier op that saved them fails loudly. The
            backward runs once (no retain_graph). float16 logits get their gradient at unit scale and the mean's
            division in the backward (one more pass) so a GradScaler's factor is not applied to underflowed values.
    Returns:
        float32 loss: a scalar, or ``[...]`` for reduction "none".
    """
    o = ce_options("cross_entropy", ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss,
                   num_items_in_batch)
    x2, y, batch = rows_of("cross_entropy", logits, labels)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropy.apply(logits, x2.detach(), y, o, num_items_in_batch, bool(inplace_backward))
    with below_autograd():
        stats = _lib.softmax_stats(x2, y, o.ignore_index, o.softcap, o.logit_scale, False)
    divisor = mean_divisor(y, o.ignore_index, num_items_in_batch) if o.reduction == "mean" else None
    return reduce_rows(row_loss(stats, y != o.ignore_index, o, x2.shape[1]), o, batch, divisor)


class _CrossEntropy(torch.autograd.Function):
    """cross_entropy's autograd (see _compat.below_autograd for why not the ops' own). Default: forward =
    softmax_stats, backward = softmax_grad (only lse [N] kept besides the logits). inplace: forward =
    cross_entropy_fused_ into the logits' buffer; backward = scale_rows_ of it by the incoming gradient."""

    @staticmethod
    def forward(ctx, logits, x2, y, o, num_items, inplace):
        divisor, inverse = mean_divisor(y, o.ignore_index, num_items, True) if o.reduction == "mean" else (None, None)
        ctx.o, ctx.inplace, ctx.shape, ctx.used = o, inplace, logits.shape, False
        with below_autograd():
            if inplace:
                scale, ctx.divisor = forward_grad_scale(x2.dtype, divisor, x2.device, inverse)
                rows, _ = _lib.cross_entropy_fused_(x2, y, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap,
                                                    o.logit_scale, scale)
                if x2.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
                    bump_version(logits)  # (not when rows_of had to copy: then the copy holds the gradient)
                ctx.save_for_backward(x2)
            else:
                stats = _lib.softmax_stats(x2, y, o.ignore_index, o.softcap, o.logit_scale, False)
                rows = row_loss(stats, y != o.ignore_index, o, x2.shape[1])
                ctx.save_for_backward(x2, y, stats[0], divisor)
        return reduce_rows(rows, o, ctx.shape[:-1], divisor)

    @staticmethod
    def backward(ctx, grad):
        o = ctx.o
        with below_autograd():
            if ctx.inplace:
                if ctx.used:
                    raise RuntimeError("cross_entropy(inplace_backward=True): the backward can run only once (the "
                                       "gradient lives in the logits' buffer); drop retain_graph or inplace_backward")
                ctx.used = True
                (x2,) = ctx.saved_tensors
                _lib.scale_rows_(x2, backward_scale(grad, o, ctx.divisor))
                dx = x2
            else:
                x2, y, lse, divisor = ctx.saved_tensors
                g = grad_rows(grad, o, divisor).expand(x2.shape[0])
                g = torch.where(y != o.ignore_index, g, 0.0)
                dx = _lib.softmax_grad(x2, y, o.ignore_index, lse, ce_coef(g, lse, o, x2.shape[1]), o.softcap,
                                       o.logit_scale)
        return dx.view(ctx.shape), None, None, None, None, None


# ------------------------------------------------------------------------------------------ fake kernels, autograd


@torch.library.register_fake("swiftlora::softmax_stats")
def _(logits, labels, ignore_index, softcap, logit_scale, with_entropy):
    n = logits.shape[0]
    f = [logits.new_empty(n, dtype=torch.float32) for _ in range(3)]
    return (*f, logits.new_empty(n if with_entropy else 0, dtype=torch.float32))


@torch.library.register_fake("swiftlora::softmax_grad")
def _(logits, labels, ignore_index, lse, coef, softcap, logit_scale):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("swiftlora::softmax_grad_")
def _(logits, labels, ignore_index, lse, coef, softcap, logit_scale):
    return None


@torch.library.register_fake("swiftlora::mean_divisor")
def _(labels, ignore_index):
    return labels.new_empty(2, dtype=torch.float32)


@torch.library.register_fake("swiftlora::cross_entropy_fused_")
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap, logit_scale, grad_scale):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.register_fake("swiftlora::scale_rows_")
def _(t, scale):
    return None


def _stats_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, softcap, logit_scale, with_entropy = inputs
    ctx.save_for_backward(logits, labels, output[0], output[3])
    ctx.args = (ignore_index, softcap, logit_scale, with_entropy)


def _stats_backward(ctx, g_lse, g_label, g_sum, g_pz):
    """d/dz of lse = p; of z_label = onehot; of Σz = 1; of E = Σ p z: p·(1 + z − E). So coef = (g_lse + g_E·(1 − E),
    g_label, g_sum, g_E)."""
    logits, labels, lse, pz = ctx.saved_tensors
    ignore_index, softcap, logit_scale, with_entropy = ctx.args
    zero = torch.zeros_like(lse)
    g_lse = zero if g_lse is None else g_lse
    a, d = g_lse, zero
    if with_entropy and g_pz is not None:
        a, d = g_lse + g_pz * (1.0 - pz), g_pz
    coef = torch.stack((a, zero if g_label is None else g_label, zero if g_sum is None else g_sum, d), 1)
    dx = _lib.softmax_grad(logits, labels, ignore_index, lse, coef.float(), softcap, logit_scale)
    return dx, None, None, None, None, None


torch.library.register_autograd("swiftlora::softmax_stats", _stats_backward, setup_context=_stats_setup_context)
