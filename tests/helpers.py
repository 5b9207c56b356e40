"""Shared test helpers: devices, dtypes, and the tolerance rules of DESIGN.md."""
from __future__ import annotations

import pytest
import torch

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None, what: str = "",
                 path_dtype: torch.dtype | None = None, cap: float = 1e-2):
    """DESIGN.md's rule: fp32 paths < 1e-5 relative error to the float64 reference; fp16/bf16 paths at most twice
    the error of the plain-PyTorch reference run in the same low precision (or of rounding the exact result to
    that precision, whichever is larger), and < 1e-2. NaN never passes. ``path_dtype``: the precision the result
    was computed in when it differs from out's dtype (e.g. a float32 LoRA gradient of a bfloat16 computation).
    ``cap`` replaces 1e-2 only for chains of several low-precision ops whose reference's own error exceeds it."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    err = rel_err(out, ref64)
    path_dtype = path_dtype or out.dtype
    if path_dtype in (torch.float32, torch.float64):
        assert err < 1e-5, f"{what}: relative error {err:.3e} >= 1e-5 (float32 path)"
        return
    assert ref_lowp is not None, f"{what}: a low-precision reference is needed for {path_dtype}"
    ref_err = rel_err(ref_lowp, ref64)
    # No result in path_dtype can beat rounding the exact answer to path_dtype; on small tensors the reference's own
    # error may by chance fall below that, so the bound never goes under twice the rounding error.
    rounding_err = rel_err(ref64.to(path_dtype), ref64)
    bound = 2 * max(ref_err, rounding_err, 1e-7)
    assert err <= bound and err < cap, (
        f"{what}: relative error {err:.3e} vs the {path_dtype} reference's {ref_err:.3e} (bound {bound:.3e}, {cap})"
    )


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False) -> torch.Tensor:
    """Fresh random normal input (never zeros), made in float32 then cast."""
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def cuda_kernels_run(fn) -> list[str]:
    """The names of the CUDA kernels ``fn`` launches, in order (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]
