"""GGUF block quantization: float rows -> the bytes of a ggml quantized type, as llama.cpp writes them.

Kernel: ``torch.ops.swiftlora.gguf_quantize`` (csrc/cpu/gguf_quant.cpp, csrc/cuda/gguf_quant.cu, arithmetic in
csrc/common/gguf_*quant_math.h). The output is byte-identical to llama.cpp's reference quantizer
(``quantize_row_*_ref`` in ggml-quants.c, which ``llama-quantize`` uses without an importance matrix), so the
reference implementation is llama.cpp's own C code: the tests compare against it through llama-cpp-python's
``ggml_quantize_chunk``, and against gguf-py's numpy quantizers (``gguf.quants.quantize``) for the 32-blocks.
``gguf_dequantize_reference`` below (plain PyTorch) decodes every type, for round trips.
"""
from __future__ import annotations

import torch

from .._compat import below_autograd
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)

_lib = torch.ops.swiftlora

# ggml type ids (gguf.GGMLQuantizationType) -> (elements per block, bytes per block)
GGUF_QUANT_TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}
_BY_ID = {tid: (name, be, bb) for name, (tid, be, bb) in GGUF_QUANT_TYPES.items()}


def qtype_id(qtype: int | str) -> int:
    """The ggml type id of ``qtype`` given as an id, a name ("q4_k", "Q4_K") or a gguf.GGMLQuantizationType."""
    if isinstance(qtype, str):
        key = qtype.upper()
        if key not in GGUF_QUANT_TYPES:
            raise ValueError(f"gguf_quantize: unknown qtype {qtype!r}; expected one of {sorted(GGUF_QUANT_TYPES)}")
        return GGUF_QUANT_TYPES[key][0]
    tid = int(qtype)
    if tid not in _BY_ID:
        raise ValueError(f"gguf_quantize: qtype {tid} is not a quantized type we write; expected one of "
                         f"{ {name: v[0] for name, v in GGUF_QUANT_TYPES.items()} }")
    return tid


def block_shape(qtype: int | str) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype``."""
    _, be, bb = _BY_ID[qtype_id(qtype)]
    return be, bb


def gguf_quantize(x: torch.Tensor, qtype: int | str, check_finite: bool = True) -> torch.Tensor:
    """Quantize the rows of ``x`` to a GGUF block type.

    Args:
        x: ``[..., n]`` float32/float16/bfloat16, CPU or CUDA, any strides; ``n`` a multiple of the block size (32 for
            Q4_0..Q8_0, 256 for the K-quants). 16-bit inputs are widened exactly to float32 first, as llama-quantize
            does with an F16/BF16 file.
        qtype: ggml type id or name: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
        check_finite: raise on NaN/inf inputs (llama.cpp's loader rejects the resulting blocks). The CPU kernel
            always checks, for free; on CUDA this costs one extra read of ``x`` (the raw op does not check).
    Returns:
        uint8 ``[..., n / block · bytes_per_block]`` on ``x``'s device: each row is the GGUF data of that row.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gguf_quantize: x must be a tensor, got {type(x).__name__}")
    tid = qtype_id(qtype)
    if check_finite and x.device.type != "cpu" and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("gguf_quantize: x has NaN or infinite values; GGUF blocks need finite weights")
    with below_autograd():
        return _lib.gguf_quantize(x.detach(), tid)


@torch.library.register_fake("swiftlora::gguf_quantize")
def _(x, qtype):
    be, bb = block_shape(qtype)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // be * bb), dtype=torch.uint8)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from a [..., 2] uint8 tensor, as float32."""
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def _nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (b & 0xF).long(), (b >> 4).long()


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 packed bytes [..., 12] -> 8 scale codes and 8 min codes [..., 8]."""
    s = s.long()
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc.float(), mn.float()


def _bits(b: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """[..., k] uint8 -> [..., count, k] codes of nbits each, lowest bits first."""
    shifts = torch.arange(count, device=b.device) * nbits
    return (b.long().unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << nbits) - 1)


def gguf_dequantize_reference(data: torch.Tensor, qtype: int | str) -> torch.Tensor:
    """Plain-PyTorch decoder: uint8 ``[..., blocks·bytes_per_block]`` -> float32 ``[..., blocks·block]``."""
    name, be, bb = _BY_ID[qtype_id(qtype)]
    blk = data.reshape(*data.shape[:-1], -1, bb)
    if name in ("Q8_0",):
        out = _f16(blk[..., 0:2]).unsqueeze(-1) * blk[..., 2:].view(torch.int8).float()
    elif name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        off = 2 if name.endswith("_0") else 4
        d = _f16(blk[..., 0:2]).unsqueeze(-1)
        qh = 0
        if name.startswith("Q5"):
            qh = _bits(blk[..., off:off + 4], 1, 8).transpose(-1, -2).reshape(*blk.shape[:-1], 32)
            off += 4
        lo, hi = _nibbles(blk[..., off:off + 16])
        q = torch.cat([lo, hi], -1) + (qh * 16 if name.startswith("Q5") else 0)
        if name.endswith("_0"):
            out = d * (q - (16 if name.startswith("Q5") else 8)).float()
        else:
            out = d * q.float() + _f16(blk[..., 2:4]).unsqueeze(-1)
    else:
        out = _dequantize_k(name, blk)
    return out.reshape(*data.shape[:-1], -1)


def _dequantize_k(name: str, blk: torch.Tensor) -> torch.Tensor:
    lead = blk.shape[:-1]
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blk[..., 0:2]).unsqueeze(-1), _f16(blk[..., 2:4]).unsqueeze(-1)
        sc, mn = _scale_min_k4(blk[..., 4:16])
        qs = blk[..., 16:144] if name == "Q4_K" else blk[..., 48:176]
        lo, hi = _nibbles(qs.reshape(*lead, 4, 32))
        q = torch.stack([lo, hi], -2).reshape(*lead, 8, 32)  # sub-block 2g: low nibbles, 2g+1: high
        if name == "Q5_K":
            q = q + 16 * _bits(blk[..., 16:48], 1, 8).reshape(*lead, 8, 32)
        return (d * sc).unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)
    if name == "Q6_K":
        ql, qh = blk[..., 0:128].reshape(*lead, 2, 64), blk[..., 128:192].reshape(*lead, 2, 32)
        lo, hi = _nibbles(ql)  # [.., 2, 64]
        high = _bits(qh, 2, 4)  # [.., 2, 4, 32]: element 32k+l of each half
        low = torch.stack([lo[..., :32], lo[..., 32:], hi[..., :32], hi[..., 32:]], -2)
        q = (low | (high << 4)).reshape(*lead, 16, 16) - 32
        sc = blk[..., 192:208].view(torch.int8).float()
        return (_f16(blk[..., 208:210]).unsqueeze(-1) * sc).unsqueeze(-1) * q.float()
    if name == "Q2_K":
        sc = blk[..., 0:16].long()
        q = _bits(blk[..., 16:80].reshape(*lead, 2, 32), 2, 4).reshape(*lead, 16, 16)
        d, dmin = _f16(blk[..., 80:82]).unsqueeze(-1), _f16(blk[..., 82:84]).unsqueeze(-1)
        return (d * (sc & 0xF)).unsqueeze(-1) * q.float() - (dmin * (sc >> 4)).unsqueeze(-1)
    # Q3_K
    hm = _bits(blk[..., 0:32], 1, 8).reshape(*lead, 256)
    q = _bits(blk[..., 32:96].reshape(*lead, 2, 32), 2, 4).reshape(*lead, 256) + 4 * hm - 4
    s = blk[..., 96:108].long()
    low = torch.cat([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], -1)
    high = _bits(s[..., 8:12], 2, 4).reshape(*lead, 16)
    codes = (low | (high << 4)) - 32
    d = _f16(blk[..., 108:110]).unsqueeze(-1)
    return ((d * codes.float()).unsqueeze(-1) * q.reshape(*lead, 16, 16).float())
