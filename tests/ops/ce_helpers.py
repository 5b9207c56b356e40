"""Shared by the cross-entropy, fused linear cross-entropy and token log-prob tests."""
from __future__ import annotations

import torch

from tests.helpers import assert_close, rel_err

IGNORE = -100


def labels(n: int, v: int, device, ignored: float = 0.3, dtype=torch.long, ignore_index: int = IGNORE):
    """Random labels in [0, v) with about `ignored` of them set to ignore_index."""
    y = torch.randint(0, v, (n,), device=device)
    y[torch.rand(n, device=device) < ignored] = ignore_index
    return y.to(dtype)


def upstream_grad(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """The gradient fed to the loss: 1 for "mean" (training), 1.7 for "sum", uniform in [-1, 1] per row for "none"
    (so a second rounding at most doubles the error, also among fp16 subnormals: see assert_close_grad)."""
    if loss.dim():
        return torch.rand(loss.shape, device=loss.device) * 2 - 1
    return torch.tensor(1.0 if reduction == "mean" else 1.7, device=loss.device)


def rounded_twice(dtype: torch.dtype, reduction: str, grad: torch.Tensor) -> bool:
    """Whether a gradient formed in the forward is rounded to its dtype a second time in the backward: when scaled
    by an upstream gradient != 1, and always for fp16 "mean" (formed at unit scale, divided by the count later)."""
    return not bool((grad == 1).all()) or (dtype == torch.float16 and reduction == "mean")


def scaled_after_rounding(grads_unit, factor: torch.Tensor):
    """The low-precision reference of what an in-place / fused path does: the gradient formed at unit scale in the
    input dtype (``grads_unit``, from the reference with reduction "none" and upstream ones), then scaled by
    ``factor`` (float32 [] or one per row of a row-indexed gradient) and rounded again."""
    out = []
    for g in grads_unit:
        f = factor if factor.dim() == 0 else factor.reshape(-1, *([1] * (g.dim() - 1)))
        out.append((g.float() * f).to(g.dtype))
    return out


def assert_close_grad(out, ref64, ref_lowp, rounded_twice: bool, what: str = "", ref_twice=None):
    """assert_close, except for a 16-bit gradient formed in the forward (in-place/fused paths) and rounded again when
    scaled in the backward: then against ``ref_twice`` (see scaled_after_rounding), the reference that rounds the
    same way, by the same 2x rule; without it, 3x the single-rounding reference's error."""
    if not rounded_twice or out.dtype in (torch.float32, torch.float64):
        assert_close(out, ref64, ref_lowp, what=what)
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, ref_err = rel_err(out, ref64), rel_err(ref_lowp, ref64)
    if ref_twice is not None:
        ref_err = max(ref_err, rel_err(ref_twice, ref64))
        assert err <= 2 * max(ref_err, 1e-7) and err < 1e-2, f"{what}: relative error {err:.3e} vs {ref_err:.3e}"
        return
    assert err <= 3 * max(ref_err, 1e-7) and err < 1e-2, f"{what}: relative error {err:.3e} vs {ref_err:.3e} (x3)"


def backward_factor(reduction: str, g: torch.Tensor, y: torch.Tensor, num_items=None) -> torch.Tensor:
    """The float32 factor a forward-formed unit-scale gradient gets in the backward: g per row ("none"), g ("sum"),
    g / divisor ("mean", fp16)."""
    if reduction != "mean":
        return g.float().reshape(-1) if g.dim() else g.float()
    n = (y != IGNORE).sum().clamp_min(1) if num_items is None else torch.as_tensor(num_items).clamp_min(1)
    return g.float() / n.to(g.device).float()


def assert_close_values(out, ref64, ref_lowp, input_dtype: torch.dtype, what: str = ""):
    """A float32 output (loss, log-probs) of a 16-bit path: DESIGN's low-precision rule (error against the float64
    reference at most twice the low-precision reference's, and < 1e-2), since the logits the GEMM rounds to the input
    dtype (one ulp apart between GEMM shapes) dominate its error; float32 inputs: the 1e-5 rule."""
    if input_dtype in (torch.float32, torch.float64):
        assert_close(out, ref64, what=what)
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, ref_err = rel_err(out, ref64), rel_err(ref_lowp, ref64)
    # A reduced loss is one number: the low-precision reference's error on it can vanish by chance cancellation of
    # its rows' errors, so it is not a yardstick below a sixteenth of one rounding of the input dtype.
    floor = torch.finfo(input_dtype).eps / 16 if out.dim() == 0 else 1e-7
    assert err <= 2 * max(ref_err, floor) and err < 1e-2, f"{what}: relative error {err:.3e} vs {ref_err:.3e} (x2)"
