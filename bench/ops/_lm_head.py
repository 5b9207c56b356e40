"""Shared by the fused LM-head specs (fused_linear_cross_entropy, token_logprobs): the "gemm" yardstick, i.e. the
bf16 matmuls such an op cannot avoid, unchunked into preallocated outputs (cuBLAS through torch.mm):
  fwd      logits = hidden @ Wᵀ                                  2 N V H FLOPs
  fwd+bwd  + grad_hidden = grad_logits @ W (+ grad_W = grad_logitsᵀ @ hidden for a trainable head)
The logits buffer is reused as grad_logits: only the GEMMs are timed, not the loss between them.
"""
from __future__ import annotations

import torch

from .common import Bench, Unavailable


def gemm_bench(hidden: torch.Tensor, weight: torch.Tensor, train_w: bool) -> Bench:
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    grad_h = torch.empty_like(h)
    grad_w = torch.empty_like(w) if train_w else None

    def fwd():
        return torch.mm(h, w.t(), out=logits)

    def fwd_bwd():
        fwd()
        torch.mm(logits, w, out=grad_h)
        if grad_w is not None:
            torch.mm(logits.t(), h, out=grad_w)
        return grad_h

    def output():
        raise Unavailable("gemm yardstick: no loss to check")

    return Bench(fwd=fwd, fwd_bwd=fwd_bwd, output=output,
                 notes=["yardstick: " + ("3" if train_w else "2") + " unchunked bf16 GEMMs, no loss"])


def matmul_flops(n: int, v: int, h: int, gemms: int) -> int:
    return 2 * n * v * h * gemms
