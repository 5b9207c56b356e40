"""NF4 in bitsandbytes' layout: quantize, dequantize and the decode GEMV, plus plain-PyTorch references.

Kernels: ``torch.ops.swiftlora.nf4_quantize`` / ``nf4_dequantize`` / ``nf4_gemv`` (csrc/cpu/nf4*.cpp,
csrc/cuda/nf4*.cu; the bit-level rules in csrc/common/nf4.h). Format (shared/reference/formats-and-peers.md §1):
the tensor is flattened row-major and cut into blocks of ``blocksize`` elements; each element is a 4-bit index into
the NF4 table, two per byte with the first element in the high nibble; each block has one fp32 scale ``absmax``,
optionally double-quantized to uint8 (``absmax2`` per 256 scales, the 8-bit dynamic map ``code2``, one ``offset``).

Quantize and dequantize reproduce bitsandbytes' CUDA ``quantize_4bit`` / ``dequantize_4bit`` (with
``compress_statistics``) bit for bit on CUDA. bitsandbytes builds those kernels with ``--use_fast_math`` (its
shipped SASS shows FMNMX.FTZ, FMUL.FTZ, MUFU.RCP), so subnormals flush to zero and 1/absmax is the GPU's approximate
reciprocal; ours do the same. The CPU kernels flush the same way but divide exactly (the correctly rounded 1/absmax,
as bitsandbytes' CPU backend does): a CPU and a CUDA quantization may differ by one code step where a scaled value
lies within an ulp of a threshold (rare: it takes a block whose two reciprocals differ and an element that close to
a threshold). Dequantization has no reciprocal and is identical on every device.

Where bitsandbytes' CPU backend departs from its CUDA kernels we follow CUDA (what checkpoints are made with): an
all-zero block gets codes 0 (CUDA) not 7 (CPU); a value between an fp32 midpoint of two codes and the threshold
nvcc compiled for it (4 of the 15 midpoints, e.g. 0.8614784479141235 * absmax) rounds as CUDA does; the 8-bit
absmax code is CUDA's binary search, not the CPU's 65536-entry lookup table; the short last block is scaled by
1/absmax (CUDA) not divided by absmax (CPU PyTorch path).

The references below reproduce the CPU rules with PyTorch ops, on any device; run on the GPU they also reproduce
the offset bitsandbytes computes there (``absmax.mean()`` is the same torch reduction).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)
from .._compat import below_autograd
from ._nf4_tables import dynamic_code, nf4_code, nf4_thresholds

_lib = torch.ops.swiftlora

DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
GEMV_MAX_ROWS = 16
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NF4Tensors(NamedTuple):
    """One NF4-quantized tensor as the kernels take it (the last three None unless double-quantized).

    packed: uint8 ``[(n + 1) // 2, 1]``; absmax: float32 ``[nblocks]`` or uint8 ``[nblocks]`` (double-quantized);
    absmax2: float32 ``[ceil(nblocks / 256)]``; code2: float32 ``[256]``; offset: float32 ``[]``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``quant_storage`` may be any dtype; the bytes are what count."""
    return packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)


def nf4_quantize(x: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE,
                 compress_statistics: bool = False) -> NF4Tensors:
    """NF4-quantizes ``x`` like ``bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics,
    quant_type="nf4")``, bit for bit.

    Args:
        x: any shape, float32/float16/bfloat16 (flattened row-major; an odd element count pads one zero).
        blocksize: elements per scale, a power of two in 32..4096.
        compress_statistics: double-quantize the scales (the QLoRA default): absmax becomes uint8 with ``absmax2``,
            ``code2`` (bitsandbytes' 8-bit dynamic map) and ``offset`` (the mean fp32 absmax).
    Returns:
        NF4Tensors on x's device; ``packed`` is uint8 ``[(x.numel() + 1) // 2, 1]``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nf4_quantize: x must be a tensor, got {type(x).__name__}")
    code2 = dynamic_code(x.device) if compress_statistics else None
    with below_autograd():
        packed, absmax, absmax2, offset = _lib.nf4_quantize(x.detach(), int(blocksize), code2)
    if code2 is None:
        return NF4Tensors(packed, absmax)
    return NF4Tensors(packed, absmax, absmax2, code2, offset)


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None = None,
                   code2: torch.Tensor | None = None, offset: torch.Tensor | None = None, *,
                   blocksize: int = DEFAULT_BLOCKSIZE, shape, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The tensor of ``shape`` in ``dtype`` that the NF4 data encodes, bit-identical to bitsandbytes'
    ``dequantize_4bit``: ``dtype(fp32(table[code] * scale))``, the scale decoded as
    ``fp32(code2[absmax] * absmax2[b // 256]) + offset`` when double-quantized.

    Args:
        packed: uint8 (or any quant_storage dtype, read as bytes) holding ``(n + 1) // 2`` bytes, n = prod(shape).
        absmax, absmax2, code2, offset: as :class:`NF4Tensors` (pass all three of the last or none).
        blocksize: the quantization blocksize. shape: output shape. dtype: float32/float16/bfloat16.
    """
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"nf4_dequantize: dtype must be float32, float16 or bfloat16, got {dtype}")
    with below_autograd():
        return _lib.nf4_dequantize(_as_bytes(packed), absmax, absmax2, code2, offset, int(blocksize),
                                   [int(s) for s in shape], dtype)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None = None,
             code2: torch.Tensor | None = None, offset: torch.Tensor | None = None, *,
             blocksize: int = DEFAULT_BLOCKSIZE, out_features: int) -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ`` for decode-sized ``x`` (1..16 rows), reading the packed weight once.

    Products are summed in fp32 and y is rounded once to x's dtype. On CUDA (sm_80+), M <= 4, K a multiple of 128
    and blocksize 64 run on tensor cores: the 16 NF4 code values enter rounded to x's dtype, times the fp32 block
    scale after the block's sum (as accurate as dequantize-then-matmul in x's dtype); otherwise the weight enters
    as its exact fp32 values. No autograd (inference). Beyond 4 rows, dequantizing and a cuBLAS matmul is faster
    (bench/NOTES.md).

    Args:
        x: ``[..., K]`` float16/bfloat16, at most 16 rows in all.
        packed, absmax, absmax2, code2, offset, blocksize: the NF4 weight ``[out_features, K]`` (NF4Tensors).
        out_features: N.
    Returns:
        ``[..., N]`` in x's dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nf4_gemv: x must be a tensor, got {type(x).__name__}")
    with below_autograd():
        return _lib.nf4_gemv(x.detach(), _as_bytes(packed), absmax, absmax2, code2, offset, int(blocksize),
                             int(out_features))


# ------------------------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("swiftlora::nf4_quantize")
def _(x, blocksize, code2):
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    if code2 is None:
        empty = x.new_empty((0,), dtype=torch.float32)
        return packed, x.new_empty((nblocks,), dtype=torch.float32), empty, empty.new_empty((0,))
    return (packed, x.new_empty((nblocks,), dtype=torch.uint8),
            x.new_empty((-(-nblocks // NESTED_BLOCKSIZE),), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


@torch.library.register_fake("swiftlora::nf4_dequantize")
def _(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("swiftlora::nf4_gemv")
def _(x, packed, absmax, absmax2, code2, offset, blocksize, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------------------------------- references
_FLT_MAX = torch.finfo(torch.float32).max
_FLT_MIN = torch.finfo(torch.float32).tiny


def _ftz(t: torch.Tensor) -> torch.Tensor:
    """fp32 subnormals to signed zero (bitsandbytes' CUDA kernels run with -ftz=true)."""
    return torch.where(t.abs() < _FLT_MIN, t * 0, t)


def _mul_ftz(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _ftz(_ftz(a) * _ftz(b))


def _reciprocal(a: torch.Tensor) -> torch.Tensor:
    """1/a correctly rounded and flushed (the GPU kernels use the approximate MUFU.RCP: see csrc/common/nf4.h)."""
    return _ftz(torch.reciprocal(_ftz(a)))


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA block reduction: max over |x| ignoring NaN and flushing subnormals, starting from
    -FLT_MAX (the zero padding of a short last block is part of ``blocks``)."""
    a = _ftz(blocks.abs())
    a = torch.where(torch.isnan(a), torch.full_like(a, -math.inf), a)
    return a.amax(dim=1).clamp(min=-_FLT_MAX)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, ``[nblocks, blocksize]``."""
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _nf4_codes(xn: torch.Tensor) -> torch.Tensor:
    """The code of each normalised value: the number of CUDA thresholds strictly below it; NaN -> 0."""
    thresholds = nf4_thresholds(xn.device)
    codes = torch.bucketize(xn, thresholds, right=False)
    return torch.where(torch.isnan(xn), torch.zeros_like(codes), codes)


def _dynamic_codes(xn: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' dQuantize<0> on a sorted 256-entry map, vectorised (same comparisons, same fp32 midpoints)."""
    pivot = torch.full_like(xn, 127, dtype=torch.int64)
    upper_p = torch.full_like(pivot, 255)
    lower_p = torch.zeros_like(pivot)
    lower = torch.full_like(xn, -1.0)
    upper = torch.full_like(xn, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = xn > val
        lower_p, lower = torch.where(gt, pivot, lower_p), torch.where(gt, val, lower)
        upper_p, upper = torch.where(gt, upper_p, pivot), torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    up = torch.where(xn > _ftz(_ftz(upper + val) * 0.5), upper_p, pivot)
    down = torch.where(xn < _ftz(_ftz(lower + val) * 0.5), lower_p, pivot)
    return torch.where(xn > val, up, down).to(torch.uint8)


def nf4_quantize_reference(x: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE,
                           compress_statistics: bool = False) -> NF4Tensors:
    """Plain-PyTorch NF4 quantization with bitsandbytes' CUDA rounding rules (see the module docstring)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, blocksize)
    absmax = _block_absmax(blocks)
    xn = _mul_ftz(blocks, _reciprocal(absmax)[:, None])
    codes = _nf4_codes(xn).reshape(-1)[: n + (n & 1)].to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)
    if not compress_statistics:
        return NF4Tensors(packed, absmax)
    code2 = dynamic_code(x.device)
    offset = absmax.mean()
    centred = _blocks(absmax - offset, NESTED_BLOCKSIZE)
    absmax2 = _block_absmax(centred)
    q = _dynamic_codes(_mul_ftz(centred, _reciprocal(absmax2)[:, None]), code2).reshape(-1)[: absmax.numel()]
    return NF4Tensors(packed, q, absmax2, code2, offset)


def nf4_block_scales_reference(absmax: torch.Tensor, absmax2: torch.Tensor | None = None,
                               code2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 scale of every block: ``absmax``, or ``fp32(code2[absmax] * absmax2[b // 256]) + offset``."""
    if absmax2 is None:
        return absmax.float()
    per_block = absmax2.repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
    return _mul_ftz(code2[absmax.long()], per_block) + offset  # bnb: a fast-math kernel, then torch's add


def nf4_dequantize_reference(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None = None,
                             code2: torch.Tensor | None = None, offset: torch.Tensor | None = None, *,
                             blocksize: int = DEFAULT_BLOCKSIZE, shape,
                             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain-PyTorch dequantization, same bits as bitsandbytes' ``dequantize_4bit``."""
    n = math.prod(shape)
    b = _as_bytes(packed).reshape(-1)
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n].long()
    scales = nf4_block_scales_reference(absmax, absmax2, code2, offset)
    values = _mul_ftz(nf4_code(b.device)[codes], scales.repeat_interleave(blocksize)[:n])
    return values.to(dtype).reshape(shape)


def nf4_gemv_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                       absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                       offset: torch.Tensor | None = None, *, blocksize: int = DEFAULT_BLOCKSIZE, out_features: int,
                       compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ dequant(W)ᵀ`` with W dequantized to ``compute_dtype`` (default float64) and the product in it."""
    dt = compute_dtype or torch.float64
    w = nf4_dequantize_reference(packed, absmax, absmax2, code2, offset, blocksize=blocksize,
                                 shape=(out_features, x.shape[-1]), dtype=torch.float32 if dt == torch.float64 else dt)
    return x.to(dt) @ w.to(dt).t()
