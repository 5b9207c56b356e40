"""One NF4 projection's forward GEMM with the LoRA term: ``y = x @ dequant(W)ᵀ + xa @ lora_bᵀ (+ bias)``.

Kernel: ``torch.ops.swiftlora.qlora_gemm`` (csrc/cuda/qlora_gemm_sm90.cu on sm_90a: a warp-specialized wgmma GEMM
that dequantizes the NF4 weight into its register operand, no 16-bit copy of W is written; elsewhere, and for
shapes that kernel does not take, dequantize + GEMM). The qlora ops (:func:`~swiftlora.ops.qlora_linear`,
``lora_qkv``, ``lora_mlp``) run the same kernel in their forward by default on sm_90a, from C++ (one launch per
projection into its columns of the output). No autograd of its own.
"""
from __future__ import annotations

import torch

from .._compat import below_autograd
from .. import _build  # noqa: F401  (registers torch.ops.swiftlora)
from .lora_weights import NF4Weight

_lib = torch.ops.swiftlora


def qlora_gemm(x: torch.Tensor, weight: NF4Weight, xa: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(weight)ᵀ + xa @ lora_bᵀ (+ bias)``.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16.
        weight: :class:`~swiftlora.ops.NF4Weight` ``[N, K]``.
        xa: ``[..., R]`` LoRA inputs (``dropout(x) @ Aᵀ``) and lora_b: ``[N, R]`` already multiplied by the LoRA
            scale, both in x's dtype; both or neither.
        bias: optional ``[N]``.
    Returns:
        ``[..., N]`` in x's dtype. Not differentiable.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"qlora_gemm: weight must be an NF4Weight, got {type(weight).__name__}")
    with below_autograd():
        return _lib.qlora_gemm(x.detach(), *weight.tensors(), weight.blocksize, weight.shape[0],
                               None if xa is None else xa.detach(), None if lora_b is None else lora_b.detach(),
                               None if bias is None else bias.detach())


def qlora_gemm_reference(x, weight: NF4Weight, xa=None, lora_b=None, bias=None) -> torch.Tensor:
    """:func:`qlora_gemm` in plain PyTorch, in x's dtype (the weight dequantized to it)."""
    y = x @ weight.dequantize(x.dtype).t()
    if xa is not None:
        y = y + xa @ lora_b.to(x.dtype).t()
    return y if bias is None else y + bias.to(x.dtype)


@torch.library.register_fake("swiftlora::qlora_gemm")
def _(x, packed, absmax, absmax2, code2, offset, blocksize, out_features, xa, lora_b, bias):
    return x.new_empty((*x.shape[:-1], out_features))
