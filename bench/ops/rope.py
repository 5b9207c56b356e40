"""RoPE benchmark: q [2, 2048, 32, 128] and k [2, 2048, 8, 128] bf16, layout [B, S, H, D] (Llama-8B GQA heads).

Floor, E = element size, QK = B * S * (Hq + Hk) * D * E:
  fwd      reads q, k and the cos/sin tables; writes q', k'         2 QK + S * D/2 * 4 * 2 (fp32 half-width tables)
  bwd      the same with dq', dk' in and dq, dk out                 2 QK + tables
q + k is 42 MB here, less than H100's 50 MB L2: the flush between calls keeps them from being read from L2.

Tables: ours are half-width [S, D/2] float32, indexed by position (None = arange(S)). The peers take Hugging
Face-style full-width tables with duplicated halves: liger [1, S, D] in q's dtype (what HF's rotary module hands
it), unsloth [S, D] float32 (its rotary cache is built in the default dtype). Both peers take [B, H, S, D] q/k:
they get ``q.transpose(1, 2)`` views of the same [B, S, H, D] tensors (no copy), which both rotate in place.
"""
from __future__ import annotations

import torch

from .common import Case, autograd_bench, import_swiftlora_ops, import_unsloth, leaf, require_cuda

OP = "rope"
BASE = 10000.0


def cases(quick: bool) -> list[Case]:
    b, s, hq, hk, d = (1, 64, 4, 2, 64) if quick else (2, 2048, 32, 8, 128)
    dtype = torch.bfloat16
    qk = b * s * (hq + hk) * d * dtype.itemsize
    tables = s * (d // 2) * 4 * 2
    fwd = 2 * qk + tables
    shape = f"q[{b},{s},{hq},{d}] k[{b},{s},{hk},{d}]"
    return [Case("", shape, dtype, {"b": b, "s": s, "hq": hq, "hk": hk, "d": d}, fwd, 2 * fwd)]


def make_inputs(case: Case, device) -> dict:
    torch.manual_seed(0)
    b, s, hq, hk, d = (case.dims[k] for k in ("b", "s", "hq", "hk", "d"))
    q = torch.randn(b, s, hq, d, device=device, dtype=case.dtype)
    k = torch.randn(b, s, hk, d, device=device, dtype=case.dtype)
    inv_freq = 1.0 / (BASE ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv_freq)  # [S, D/2]
    full = torch.cat((freqs, freqs), dim=-1)  # [S, D], Hugging Face style
    return {
        "q": leaf(q), "k": leaf(k),
        "cos": freqs.cos(), "sin": freqs.sin(),
        "cos_full": full.cos(), "sin_full": full.sin(),
    }


def reference(case: Case, inp: dict):
    (rope_reference,) = import_swiftlora_ops("rope_reference")
    with torch.no_grad():
        return tuple(rope_reference(inp["q"], inp["k"], inp["cos"], inp["sin"]))


def swiftlora(case: Case, inp: dict):
    (rope,) = import_swiftlora_ops("rope")
    q, k, cos, sin = inp["q"], inp["k"], inp["cos"], inp["sin"]
    return autograd_bench(lambda: rope(q, k, cos, sin), [q, k], [q, k], notes=["fp32 half-width cos/sin"])


def torch_reference(case: Case, inp: dict):
    (rope_reference,) = import_swiftlora_ops("rope_reference")
    q, k, cos, sin = inp["q"], inp["k"], inp["cos"], inp["sin"]
    return autograd_bench(lambda: rope_reference(q, k, cos, sin), [q, k], [q, k], notes=["eager"])


def _bhsd(*ts):
    return [t.transpose(1, 2) for t in ts]


def _bshd(outs):
    return [t.transpose(1, 2) for t in outs]


def liger(case: Case, inp: dict):
    require_cuda(inp, "liger")
    from liger_kernel.ops import LigerRopeFunction

    q, k = inp["q"], inp["k"]
    cos, sin = (inp[n][None].to(case.dtype) for n in ("cos_full", "sin_full"))  # [1, S, D]
    fn = lambda: LigerRopeFunction.apply(*_bhsd(q, k), cos, sin)  # noqa: E731
    notes = ["[B,H,S,D] views, in place; bf16 [1,S,D] cos/sin"]
    return autograd_bench(fn, [q, k], _bhsd(q, k), canonical=_bshd, notes=notes)


def unsloth(case: Case, inp: dict):
    require_cuda(inp, "unsloth")
    import_unsloth()
    from unsloth.kernels.rope_embedding import fast_rope_embedding

    q, k = inp["q"], inp["k"]
    cos, sin = inp["cos_full"], inp["sin_full"]  # [S, D] float32
    fn = lambda: fast_rope_embedding(*_bhsd(q, k), cos, sin)  # noqa: E731
    notes = ["[B,H,S,D] views, in place; fp32 [S,D] cos/sin"]
    return autograd_bench(fn, [q, k], _bhsd(q, k), canonical=_bshd, notes=notes)


PROVIDERS = {"swiftlora": swiftlora, "torch": torch_reference, "liger": liger, "unsloth": unsloth}
