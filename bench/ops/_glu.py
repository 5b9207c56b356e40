"""Shared by the SwiGLU and GeGLU specs: h = act(gate) * up on gate, up [4096, 14336] bf16 (Llama-8B MLP width,
4096 tokens).

Floor, T = M * N * E (one tensor):
  fwd      reads gate, up; writes h                                 3 T
  bwd      reads dh, gate, up; writes dgate, dup (act recomputed)   5 T
"""
from __future__ import annotations

from typing import Callable

import torch

from ..harness import Restore
from .common import Bench, Case, autograd_bench, import_unsloth, leaf, require_cuda


def glu_case(name: str, quick: bool) -> Case:
    m, n = (256, 1024) if quick else (4096, 14336)
    dtype = torch.bfloat16
    t = m * n * dtype.itemsize
    return Case(name, f"gate,up[{m},{n}]", dtype, {"m": m, "n": n}, 3 * t, 8 * t)


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    m, n = case.dims["m"], case.dims["n"]
    gate = torch.randn(m, n, device=device, dtype=case.dtype)
    up = torch.randn(m, n, device=device, dtype=case.dtype)
    return {"gate": leaf(gate), "up": leaf(up)}


def function_bench(fn: Callable, inp: dict, notes=()) -> Bench:
    gate, up = inp["gate"], inp["up"]
    return autograd_bench(lambda: fn(gate, up), [gate, up], [gate], notes=notes)


def inplace_bench(fn: Callable, inp: dict) -> Bench:
    """swiftlora with inplace_backward=True: dgate, dup go into gate's and up's buffers, h into dh's (the fused
    MLP's mode, and what Liger always does): gate/up restored before each call, untimed."""
    gate, up = inp["gate"], inp["up"]
    return autograd_bench(lambda: fn(gate, up), [gate, up], [gate], restore=Restore(gate, up),
                          notes=["inplace_backward (gate/up restored, untimed)"])


def liger_bench(function_cls, inp: dict) -> Bench:
    """Liger's SiLUMul / GELUMul backward writes dgate, dup into the saved gate, up: restored before each call."""
    require_cuda(inp, "liger")
    gate, up = inp["gate"], inp["up"]
    return autograd_bench(
        lambda: function_cls.apply(gate, up), [gate, up], [gate], restore=Restore(gate, up),
        notes=["bwd overwrites gate/up (restored, untimed)"],
    )


def unsloth_bench(forward_kernel: Callable, backward_kernel: Callable, inp: dict) -> Bench:
    """Unsloth's GLU kernels are plain functions that its LoRA MLP autograd Function calls, not autograd ops:
    forward(gate [B,S,N], up) -> h; backward(dh, gate, up) [B*S, N] in place -> (h, dup, dgate) in (dh, gate, up).
    Its backward also rewrites h (the LoRA down-projection needs it): 6 T instead of 5 T."""
    gate, up = (inp[n].detach() for n in ("gate", "up"))
    m, n = gate.shape
    dh = torch.randn_like(gate)
    gate3, up3 = gate.view(1, m, n), up.view(1, m, n)

    def fwd():
        return forward_kernel(gate3, up3)

    def fwd_bwd():
        fwd()
        return backward_kernel(dh, gate, up)

    return Bench(
        fwd=fwd, fwd_bwd=fwd_bwd, output=lambda: (fwd().view(m, n),), restore=Restore(gate, up, dh),
        notes=["kernels called directly (no autograd); bwd in place, restored untimed"],
    )


def unsloth_kernels(module: str, forward: str, backward: str, inp: dict) -> tuple[Callable, Callable]:
    require_cuda(inp, "unsloth")
    import_unsloth()
    import importlib

    mod = importlib.import_module(f"unsloth.kernels.{module}")
    return getattr(mod, forward), getattr(mod, backward)
