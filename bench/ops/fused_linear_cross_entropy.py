"""Fused LM head + cross-entropy benchmark: hidden [8192, 2048] bf16 (8k tokens of a 1-2B model), W [128256, 2048]
bf16 (Llama-3 vocabulary), int64 labels, mean loss, upstream gradient 1.
Case "": W frozen (LoRA / QLoRA: only grad_hidden). Case "train-w": W trainable (full fine-tuning: grad_W too).

It is compute-bound: the floor is the matmul FLOPs, and the yardstick the "gemm" provider (bench/ops/_lm_head.py),
the same GEMMs unchunked in the same run.
  FLOPs    fwd 2 N V H (logits); fwd+bwd 4 N V H (+ grad_hidden), 6 N V H with grad_W         (8.6 / 12.9 TFLOP)
  bytes    fwd reads hidden, W, labels: (N + V) H E + 8 N; fwd+bwd also writes grad_hidden N H E (+ grad_W V H E)
An op that never holds the [N, V] logits still moves 2 N V E through memory per logits pass (the chunk is written
by the GEMM and read back by the loss kernel, 4.2 GB here) unless the loss runs inside the GEMM's epilogue.
A training forward (inputs require grad) of swiftlora and liger does all the work: their backward scales the saved
gradients by the upstream gradient (a no-op for 1).
"""
from __future__ import annotations

import torch

from ._lm_head import gemm_bench, matmul_flops
from .common import (Case, import_swiftlora_ops, import_unsloth, leaf, loss_bench, python_loop, require_cuda,
                     two_streams)

OP = "fused_linear_cross_entropy"


def cases(quick: bool) -> list[Case]:
    n, h, v = (256, 128, 4096) if quick else (8192, 2048, 128256)
    dtype = torch.bfloat16
    e = dtype.itemsize
    fwd = (n + v) * h * e + 8 * n
    shape, dims = f"hidden[{n},{h}],W[{v},{h}]", {"n": n, "h": h, "v": v}
    return [
        Case("", shape, dtype, dims, fwd, fwd + n * h * e, matmul_flops(n, v, h, 1), matmul_flops(n, v, h, 2)),
        Case("train-w", shape, dtype, {**dims, "train_w": True}, fwd, fwd + (n + v) * h * e,
             matmul_flops(n, v, h, 1), matmul_flops(n, v, h, 3)),
    ]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    n, h, v = case.dims["n"], case.dims["h"], case.dims["v"]
    hidden = torch.randn(n, h, device=device).to(case.dtype)
    weight = (torch.randn(v, h, device=device) * h**-0.5).to(case.dtype)  # logits ~ N(0, 1)
    return {"hidden": leaf(hidden), "weight": weight.requires_grad_(bool(case.dims.get("train_w"))),
            "labels": torch.randint(0, v, (n,), device=device)}


def _args(inp: dict):
    return inp["hidden"], inp["weight"], inp["labels"]


def reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("fused_linear_cross_entropy_reference")
    with torch.no_grad():
        return (ref(*_args(inp)),)


def swiftlora(case: Case, inp: dict):
    (fused_linear_cross_entropy,) = import_swiftlora_ops("fused_linear_cross_entropy")
    h, w, y = _args(inp)
    return loss_bench(lambda: fused_linear_cross_entropy(h, w, y), [h, w], notes=["default 64 MiB chunks"])


def torch_reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("fused_linear_cross_entropy_reference")
    h, w, y = _args(inp)
    return loss_bench(lambda: ref(h, w, y), [h, w], notes=["eager: full bf16 logits, float32 log_softmax"])


def gemm(case: Case, inp: dict):
    h, w, _ = _args(inp)
    return gemm_bench(h, w, w.requires_grad)


def liger(case: Case, inp: dict):
    require_cuda(inp, "liger")
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    h, w, y = _args(inp)
    # (input, weight, target, bias=None, ce_weight=None, ignore_index=-100, ..., reduction="mean", ...) ->
    # (loss, z_loss, accuracy, predicted); defaults otherwise (accum_dtype None: grad_W accumulated in bf16)
    return loss_bench(lambda: LigerFusedLinearCrossEntropyFunction.apply(h, w, y)[0], [h, w],
                      notes=["defaults (bf16 grad_W accumulation)"])


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth_zoo.fused_losses.cross_entropy_loss import unsloth_fused_ce_loss

    h, w, y = _args(inp)
    n, hid = h.shape
    # (trainer, hidden_states, lm_head_weight, lm_head_bias, labels, ...): mean over labels != -100; labels are
    # already aligned with the rows (shift_labels=False); its chunking reads the free GPU memory
    fn = lambda: unsloth_fused_ce_loss(None, h.view(1, n, hid), w, None, y.view(1, n), shift_labels=False)  # noqa: E731
    return loss_bench(fn, [h, w], notes=["shift_labels=False, default target_gb"])


def swiftlora_overlap(case: Case, inp: dict):
    """swiftlora with each vocabulary block's softmax on a side stream beside the GEMMs (lm_head_blocks.OVERLAP)."""
    return two_streams(swiftlora(case, inp))


def swiftlora_pyloop(case: Case, inp: dict):
    """swiftlora with the vocabulary-block loop issued from Python (before lm_head_blocks_ took it to C++)."""
    return python_loop(swiftlora(case, inp))


PROVIDERS = {"swiftlora": swiftlora, "swiftlora_overlap": swiftlora_overlap, "swiftlora_pyloop": swiftlora_pyloop, "torch": torch_reference, "gemm": gemm, "liger": liger, "unsloth": unsloth}
