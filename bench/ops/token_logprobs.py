"""Per-token log-prob benchmark (RL policy log-probs): hidden [8, 1024, 2048] bf16, W [151936, 2048] bf16 frozen
(Qwen vocabulary, LoRA), token ids [8, 1024]; fwd+bwd w.r.t. hidden with a random per-token upstream gradient (the
advantages). Case "": log-probs only. Case "entropy": log-probs and entropies, both in the loss.

Compute-bound, like fused_linear_cross_entropy: the yardstick is the "gemm" provider (bench/ops/_lm_head.py).
  FLOPs    fwd 2 N V H (logits); fwd+bwd 4 N V H (+ grad_hidden)                         (5.1 / 10.2 TFLOP)
           entropy: d entropy/d hidden is another [N, V] @ [V, H] product: 6 N V H
  bytes    fwd reads hidden, W, ids, writes log-probs: (N + V) H E + 12 N; fwd+bwd + grads in, grad_hidden out
A design that recomputes the logits in the backward (unsloth) does one GEMM more than the yardstick; swiftlora
with a frozen head forms d logprob/d hidden in the forward and only scales it in the backward.
"""
from __future__ import annotations

import torch

from ._lm_head import gemm_bench, matmul_flops
from .common import (Case, Unavailable, import_swiftlora_ops, import_unsloth, leaf, loss_bench, python_loop,
                     require_cuda, two_streams)

OP = "token_logprobs"


def cases(quick: bool) -> list[Case]:
    b, t, h, v = (2, 128, 128, 4096) if quick else (8, 1024, 2048, 151936)
    n, dtype = b * t, torch.bfloat16
    e = dtype.itemsize
    fwd = (n + v) * h * e + 12 * n
    shape, dims = f"hidden[{b},{t},{h}],W[{v},{h}]", {"b": b, "t": t, "h": h, "v": v}
    return [
        Case("", shape, dtype, dims, fwd, fwd + n * h * e + 4 * n, matmul_flops(n, v, h, 1),
             matmul_flops(n, v, h, 2)),
        Case("entropy", shape, dtype, {**dims, "entropy": True}, fwd + 4 * n, fwd + n * h * e + 12 * n,
             matmul_flops(n, v, h, 1), matmul_flops(n, v, h, 3)),
    ]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    d = case.dims
    hidden = torch.randn(d["b"], d["t"], d["h"], device=device).to(case.dtype)
    weight = (torch.randn(d["v"], d["h"], device=device) * d["h"] ** -0.5).to(case.dtype)
    ids = torch.randint(0, d["v"], (d["b"], d["t"]), device=device)
    grads = tuple(torch.randn(d["b"], d["t"], device=device) for _ in range(2 if d.get("entropy") else 1))
    return {"hidden": leaf(hidden), "weight": weight, "ids": ids, "grads": grads}


def _entropy(case: Case) -> bool:
    return bool(case.dims.get("entropy"))


def reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("token_logprobs_reference")
    with torch.no_grad():
        out = ref(inp["hidden"], inp["weight"], inp["ids"], with_entropy=_entropy(case))
    return out if _entropy(case) else (out,)


def swiftlora(case: Case, inp: dict):
    (token_logprobs,) = import_swiftlora_ops("token_logprobs")
    h, w, ids = inp["hidden"], inp["weight"], inp["ids"]
    return loss_bench(lambda: token_logprobs(h, w, ids, with_entropy=_entropy(case)), [h], inp["grads"],
                      notes=["frozen head: grads formed in the forward"])


def torch_reference(case: Case, inp: dict):
    (ref,) = import_swiftlora_ops("token_logprobs_reference")
    h, w, ids = inp["hidden"], inp["weight"], inp["ids"]
    return loss_bench(lambda: ref(h, w, ids, with_entropy=_entropy(case)), [h], inp["grads"],
                      notes=["eager: full bf16 logits, float32 log_softmax"])


def gemm(case: Case, inp: dict):
    if _entropy(case):
        raise Unavailable("the yardstick is the log-prob case's two GEMMs")
    return gemm_bench(inp["hidden"], inp["weight"], train_w=False)


def liger(case: Case, inp: dict):
    raise Unavailable("liger-kernel has no per-token log-prob op (its GRPO loss fuses the policy loss itself)")


def unsloth(case: Case, inp: dict):
    if _entropy(case):
        raise Unavailable("unsloth_chunked_logprobs computes no entropy")
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth_zoo.fused_losses.chunked_logprob import unsloth_chunked_logprobs

    h, w, ids = inp["hidden"], inp["weight"], inp["ids"]
    # (hidden_states [..., H], lm_head [V, H], index [...], temperature=1.0) -> float32 [...]; backward recomputes
    return loss_bench(lambda: unsloth_chunked_logprobs(h, w, ids), [h], inp["grads"])


def swiftlora_overlap(case: Case, inp: dict):
    """swiftlora with each vocabulary block's softmax on a side stream beside the GEMMs (lm_head_blocks.OVERLAP)."""
    return two_streams(swiftlora(case, inp))


def swiftlora_pyloop(case: Case, inp: dict):
    """swiftlora with the vocabulary-block loop issued from Python (before lm_head_blocks_ took it to C++)."""
    return python_loop(swiftlora(case, inp))


PROVIDERS = {"swiftlora": swiftlora, "swiftlora_overlap": swiftlora_overlap, "swiftlora_pyloop": swiftlora_pyloop, "torch": torch_reference, "gemm": gemm, "liger": liger, "unsloth": unsloth}
