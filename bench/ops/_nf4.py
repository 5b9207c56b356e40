"""Shared by the NF4 benchmark specs (nf4_dequantize, nf4_gemv): the weight W [14336, 4096] (Llama-3-8B's MLP,
the issue's shape) NF4-quantized with double quantization, blocksize 64, as every provider sees it, and the
bitsandbytes QuantState of the same bytes for the bitsandbytes and unsloth providers.

The weight is quantized by swiftlora's kernel (bit-identical to bitsandbytes' quantize_4bit on CUDA), once per
case, outside the timed region.
"""
from __future__ import annotations

import torch

from .common import Unavailable

N, K = 14336, 4096
QUICK_N, QUICK_K = 256, 512
BLOCKSIZE = 64


def weight_bytes(n: int, k: int) -> int:
    """Bytes of a double-quantized NF4 weight: packed codes, uint8 absmax, fp32 absmax2, code2 and offset."""
    nblocks = -(-n * k // BLOCKSIZE)
    return n * k // 2 + nblocks + 4 * -(-nblocks // 256) + 4 * 256 + 4


def quantized_weight(n: int, k: int, dtype: torch.dtype, device) -> dict:
    """{"w": dense W, "packed": uint8 [n*k/2, 1], "state": swiftlora QuantState} for a seeded random W."""
    try:
        from swiftlora.quant import quantize_nf4
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import swiftlora.quant: {type(exc).__name__}: {exc}") from exc
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    packed, state = quantize_nf4(w, BLOCKSIZE, compress_statistics=True)
    return {"w": w, "packed": packed, "state": state}


def bnb_state(inp: dict):
    """(bitsandbytes module, its QuantState holding the same tensors)."""
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import bitsandbytes: {type(exc).__name__}: {exc}") from exc
    from swiftlora.quant import to_bnb_quant_state

    return bitsandbytes, to_bnb_quant_state(inp["state"])


def unsloth_utils():
    """unsloth.kernels.utils (after `import unsloth`, as it requires)."""
    from .common import import_unsloth

    import_unsloth()
    try:
        from unsloth.kernels import utils
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import unsloth.kernels.utils: {type(exc).__name__}: {exc}") from exc
    return utils
