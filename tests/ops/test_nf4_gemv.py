"""nf4_gemv against the float64 product with the dequantized weight: M = 1, odd M, 16; K not a multiple of the
blocksize or of 32 (blocks straddle rows); plain and double-quantized scales; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

from swiftlora.ops.nf4 import nf4_dequantize_reference, nf4_gemv, nf4_gemv_reference, nf4_quantize
from tests.helpers import DEVICES, assert_close, cuda_kernels_run, randn

HALF_DTYPES = [torch.float16, torch.bfloat16]
_OPS = torch.ops.swiftlora


def _check(x, n, k, blocksize, compress, what):
    w = randn(n, k, scale=0.05)
    q = [t.to(x.device) if t is not None else None for t in nf4_quantize(w, blocksize, compress)]
    y = nf4_gemv(x, *q, blocksize=blocksize, out_features=n)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype and y.device == x.device
    ref64 = nf4_gemv_reference(x.cpu(), *[t.cpu() if t is not None else None for t in q], blocksize=blocksize,
                               out_features=n)
    ref_lowp = nf4_gemv_reference(x.cpu(), *[t.cpu() if t is not None else None for t in q], blocksize=blocksize,
                                  out_features=n, compute_dtype=x.dtype)
    if y.numel() < 16:  # a handful of outputs: the norm-ratio rule is noise; weights rounded once to x's dtype,
        # fp32 products and sums: |error| <= 2·eps·Σ|x_k·w_k| per output (+ the output's own rounding)
        wd = nf4_dequantize_reference(*[t.cpu() if t is not None else None for t in q], blocksize=blocksize,
                                      shape=(n, k), dtype=torch.float32)
        w_abs = x.cpu().double().abs() @ wd.double().abs().t()
        eps = torch.finfo(x.dtype).eps
        bound = 2 * eps * w_abs + eps * ref64.abs()
        assert ((y.cpu().double() - ref64).abs() <= bound).all(), f"{what}: {y.cpu()} vs {ref64}"
        return
    assert_close(y.cpu(), ref64, ref_lowp, what=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("n,k,blocksize", [(64, 256, 64), (33, 96, 32), (17, 40, 32), (5, 33, 64), (9, 2080, 256)],
                         ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_gemv_matches_reference(device, dtype, m, n, k, blocksize, compress):
    x = randn(m, k, dtype=dtype, device=device)
    _check(x, n, k, blocksize, compress, f"m={m} n={n} k={k} bs={blocksize}")


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_strided_x(device):
    x = randn(2, 3, 128, dtype=torch.bfloat16, device=device)
    _check(x, 24, 128, 64, True, "x [2, 3, K]")
    xt = randn(128, 4, dtype=torch.bfloat16, device=device).t()  # non-contiguous [4, K]
    _check(xt, 24, 128, 64, True, "x transposed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 4, 5, 16])
def test_cuda_decode_shapes(dtype, m):
    """The tiled kernel at decode sizes (many rows, K a multiple of 1024 and not), and the loop kernel for x too
    large for shared memory (16 × 8192); a misaligned x (copied to an aligned buffer)."""
    for n, k in ((4099, 4096), (1000, 1056), (64, 8192)):
        _check(randn(m, k, dtype=dtype, device="cuda"), n, k, 64, True, f"m={m} n={n} k={k}")
    buf = randn(m * 1024 + 1, dtype=dtype, device="cuda")
    _check(buf[1:].view(m, 1024), 257, 1024, 64, True, "x at an odd address")


STREAM_VARIANTS = ["stream", "stream-w8", "stream-d4", "stream-d8"]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [*STREAM_VARIANTS, "mma", "simt"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_cuda_kernel_variants(monkeypatch, variant, dtype, compress):
    """Every value of the SWIFTLORA_NF4_GEMV_VARIANT benchmarking knob on shapes the tensor-core kernel takes
    (M = 1..4, K % 128 == 0, blocksize 64): N not a multiple of 16, fewer tiles than warps, K = 128 (one chunk: a
    split warp with no work), more tiles than one round of CTAs (30000 rows); M = 5 and blocksize 128 fall back."""
    monkeypatch.setenv("SWIFTLORA_NF4_GEMV_VARIANT", variant)
    for m, n, k, bs in ((1, 1043, 2048, 64), (2, 40, 256, 64), (3, 300, 1152, 64), (4, 1043, 1024, 64),
                        (1, 33, 128, 64), (1, 30000, 128, 64), (5, 300, 512, 64), (1, 300, 512, 128)):
        _check(randn(m, k, dtype=dtype, device="cuda"), n, k, bs, compress, f"{variant} m={m} n={n} k={k} bs={bs}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", STREAM_VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "nested"])
def test_cuda_stream_kernel_shapes(monkeypatch, variant, dtype, compress):
    """The TMA-streamed kernel's row split and ring: more rows than 132 SMs x 16 (every CTA a partial last tile),
    fewer rows than one tile per SM (N = 17: two CTAs of 9 and 8 rows), K = 4096 (a row in 2-4 stages), K = 11008
    (86 chunks: a last stage of 6 chunks, scale rows not 16-byte multiples), K = 128 (one chunk: one busy warp per
    stage), M = 1..4."""
    monkeypatch.setenv("SWIFTLORA_NF4_GEMV_VARIANT", variant)
    for m, n, k in ((1, 2200, 4096), (3, 700, 11008)):  # these must not fall back to the mma kernel
        q = nf4_quantize(randn(n, k, device="cuda"), 64, compress)
        x = randn(m, k, dtype=dtype, device="cuda")
        launched = " ".join(cuda_kernels_run(lambda: nf4_gemv(x, *q, blocksize=64, out_features=n)))
        assert "nf4_gemv_stream_kernel" in launched
    for m, n, k in ((1, 2200, 4096), (4, 2200, 4096), (2, 17, 4096), (3, 700, 11008), (1, 1, 11008),
                    (4, 5000, 128), (2, 131, 1024)):
        _check(randn(m, k, dtype=dtype, device="cuda"), n, k, 64, compress, f"{variant} m={m} n={n} k={k}")
    # The ring depth changes no arithmetic (same chunks per warp, same order): the 8-warp shapes give the bits of
    # "stream-w8"; the default dispatch (knob unset) runs "stream" (16 warps split K differently: checked above only).
    x = randn(2, 4096, dtype=dtype, device="cuda")
    q = nf4_quantize(randn(300, 4096, scale=0.05, device="cuda"), 64, compress)
    y = nf4_gemv(x, *q, blocksize=64, out_features=300)
    for name in ("stream", "stream-w8"):
        monkeypatch.setenv("SWIFTLORA_NF4_GEMV_VARIANT", name)
        ref = nf4_gemv(x, *q, blocksize=64, out_features=300)
        if name == "stream":
            monkeypatch.delenv("SWIFTLORA_NF4_GEMV_VARIANT")
            assert torch.equal(nf4_gemv(x, *q, blocksize=64, out_features=300), ref)
        elif variant != "stream":
            assert torch.equal(y, ref)


@pytest.mark.gpu
def test_cuda_variant_knob_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("SWIFTLORA_NF4_GEMV_VARIANT", "mma-s3-d9")
    q = nf4_quantize(randn(40, 128, device="cuda"), 64, True)
    with pytest.raises(RuntimeError, match="SWIFTLORA_NF4_GEMV_VARIANT must be stream, stream-w8, .* mma or simt"):
        nf4_gemv(randn(1, 128, dtype=torch.bfloat16, device="cuda"), *q, blocksize=64, out_features=40)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = randn(3, 96, dtype=torch.bfloat16, device=device)
    for compress in (False, True):
        q = nf4_quantize(randn(40, 96, device=device), 32, compress)
        torch.library.opcheck(_OPS.nf4_gemv, (x, *q, 32, 40))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    q = nf4_quantize(randn(40, 96, device=device), 32, True)
    x = randn(2, 96, dtype=torch.bfloat16, device=device)
    with pytest.raises(TypeError, match="x must be float16 or bfloat16, got Float"):
        nf4_gemv(x.float(), *q, blocksize=32, out_features=40)
    with pytest.raises(ValueError, match="x must have 1..16 rows .* got 17"):
        nf4_gemv(randn(17, 96, dtype=torch.bfloat16, device=device), *q, blocksize=32, out_features=40)
    with pytest.raises(ValueError, match=r"packed must hold \(n \+ 1\) / 2 = 1968 bytes"):
        nf4_gemv(x, *q, blocksize=32, out_features=41)
    with pytest.raises(ValueError, match=r"absmax must have shape \[15\]"):
        nf4_gemv(x, *q, blocksize=256, out_features=40)
    with pytest.raises(ValueError, match="out_features must be positive"):
        nf4_gemv(x, *q, blocksize=32, out_features=0)
    with pytest.raises(ValueError, match=r"x must have shape \[..., K\] with K > 0"):
        nf4_gemv(x[:, :0], *q, blocksize=32, out_features=40)
    with pytest.raises(TypeError, match="x must be a tensor"):
        nf4_gemv(None, *q, blocksize=32, out_features=40)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="packed must be on the device of x"):
            nf4_gemv(x, *[t.cpu() for t in q], blocksize=32, out_features=40)
