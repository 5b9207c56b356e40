"""Cross-entropy benchmark: logits [8192, 128256] bf16 (Llama-3 vocabulary, 8k tokens), int64 labels, mean over the
tokens, upstream gradient 1 (``loss.backward()``).

Floor, L = N V E (the logits: 2.10 GB):
  fwd      reads logits and labels; writes loss (and lse)           L + 8 N + 8 N
  fwd+bwd  one pass: reads logits, writes their gradient            2 L + 8 N + 8 N
A single pass is possible because the gradient can be formed in the forward (swiftlora_inplace and liger write it
into the logits' buffer: no second [N, V] buffer). The out-of-place path (swiftlora: softmax_stats, then
softmax_grad into a new buffer) reads the logits twice: 3 L, so its floor fraction tops out at 2/3.
"""
from __future__ import annotations

import torch

from ..harness import Restore
from .common import Case, import_swiftlora_ops, import_unsloth, leaf, loss_bench, require_cuda

OP = "cross_entropy"


def cases(quick: bool) -> list[Case]:
    n, v = (256, 8192) if quick else (8192, 128256)
    dtype = torch.bfloat16
    logits = n * v * dtype.itemsize
    small = 8 * n + 8 * n  # labels in; loss + lse out
    return [Case("", f"logits[{n},{v}]", dtype, {"n": n, "v": v}, logits + small, 2 * logits + small)]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    n, v = case.dims["n"], case.dims["v"]
    logits = (2 * torch.randn(n, v, device=device)).to(case.dtype)
    return {"logits": leaf(logits), "labels": torch.randint(0, v, (n,), device=device)}


def reference(case: Case, inp: dict):
    (cross_entropy_reference,) = import_swiftlora_ops("cross_entropy_reference")
    with torch.no_grad():
        return (cross_entropy_reference(inp["logits"], inp["labels"]),)


def swiftlora(case: Case, inp: dict):
    (cross_entropy,) = import_swiftlora_ops("cross_entropy")
    x, y = inp["logits"], inp["labels"]
    return loss_bench(lambda: cross_entropy(x, y), [x], notes=["out of place: softmax_stats + softmax_grad"])


def swiftlora_inplace(case: Case, inp: dict):
    """inplace_backward=True: cross_entropy_fused_ writes the gradient into the logits in the forward (restored,
    untimed, before each call); the backward is scale_rows_ by 1 (no pass)."""
    (cross_entropy,) = import_swiftlora_ops("cross_entropy")
    x, y = inp["logits"], inp["labels"]
    return loss_bench(lambda: cross_entropy(x, y, inplace_backward=True), [x], restore=Restore(x),
                      notes=["inplace_backward (logits restored, untimed)"])


def torch_reference(case: Case, inp: dict):
    (cross_entropy_reference,) = import_swiftlora_ops("cross_entropy_reference")
    x, y = inp["logits"], inp["labels"]
    return loss_bench(lambda: cross_entropy_reference(x, y), [x], notes=["eager, float32 log_softmax"])


def liger(case: Case, inp: dict):
    require_cuda(inp, "liger")
    from liger_kernel.ops import LigerCrossEntropyFunction

    x, y = inp["logits"], inp["labels"]
    # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss,
    #  return_token_accuracy, return_predicted_tokens) -> (loss, z_loss, accuracy, predicted); the forward writes
    # the gradient into the input's buffer.
    fn = lambda: LigerCrossEntropyFunction.apply(x, y, None, -100, 0.0, 0.0, "mean", None, False, False, False)[0]  # noqa: E731
    return loss_bench(fn, [x], restore=Restore(x), notes=["grad written into the logits (restored, untimed)"])


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

    x, y = inp["logits"], inp["labels"]
    n, v = x.shape
    # logits (batch, seq, vocab), labels (batch, seq) -> sum / count of labels != -100; gradient out of place
    return loss_bench(lambda: fast_cross_entropy_loss(x.view(1, n, v), y.view(1, n)), [x])


PROVIDERS = {"swiftlora": swiftlora, "swiftlora_inplace": swiftlora_inplace, "torch": torch_reference,
             "liger": liger, "unsloth": unsloth}
