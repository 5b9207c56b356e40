"""Sweep of cross_entropy_fused_'s kernel variants (SWIFTLORA_CE_VARIANT, csrc/cuda/cross_entropy.cu).

``python -m bench.ce_sweep [--variants 0,3,7] [--reps 30] [--ncu]``: for each variant, times
``cross_entropy(x, y, inplace_backward=True)`` forward + backward on logits [8192, 128256] bf16 with CUDA events
(median of --reps calls; before each call, untimed, the logits are restored from a saved copy and L2 is flushed by
rewriting a 256 MiB buffer, as bench/harness.py does), after checking each variant's loss and gradient against
variant 0's and a float64 reference on smaller cases (odd V, ignored rows, smoothing + z-loss). Prints a table of
ms and the one-pass floor (2 × the logits' bytes at the measured copy bandwidth; 1.40 ms at 3.0 TB/s) as a
percentage. ``--ncu``: one untimed call per variant, nothing else, for
``ncu --kernel-name regex:cross_entropy --set full python -m bench.ce_sweep --ncu --variants 0,7``.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from .harness import Harness, Restore

ENV = "SWIFTLORA_CE_VARIANT"
# Must match kCeVariants in csrc/cuda/cross_entropy.cu.
VARIANTS = {
    0: "general kernel (soft-cap, smoothing, z-loss)",
    1: "lean kernel (cross_entropy_plain.cuh)",
}
# (rows, V, dtype, cross_entropy options): V odd (a ragged tail), a wide V, and the options that change the
# coefficients (the lean kernel hands those to the general one).
CHECKS = [
    (512, 128256, torch.bfloat16, {}),
    (300, 50257, torch.bfloat16, {"label_smoothing": 0.1, "z_loss": 1e-4}),
    (64, 131075, torch.float16, {}),
    (32, 262147, torch.bfloat16, {}),
    (64, 32000, torch.float32, {"softcap": 30.0}),
]


def _fwd_bwd(x: torch.Tensor, y: torch.Tensor, **opts):
    from swiftlora.ops import cross_entropy

    loss = cross_entropy(x, y, inplace_backward=True, **opts)
    return torch.autograd.grad(loss, [x])[0]


def _per_variant(variants, fn):
    out = {}
    old = os.environ.get(ENV)
    try:
        for i in variants:
            os.environ[ENV] = str(i)
            out[i] = fn(i)
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(variants, device) -> dict[int, float]:
    """Worst relative error of each variant's loss and gradient against float64, next to variant 0's (as a ratio:
    ≤ ~1 means as accurate as the original kernel)."""
    from swiftlora.ops import cross_entropy, cross_entropy_reference

    worst = {i: 0.0 for i in variants}
    for n, v, dtype, opts in CHECKS:
        torch.manual_seed(1)
        base = (3 * torch.randn(n, v, device=device)).to(dtype)
        y = torch.randint(0, v, (n,), device=device)
        y[torch.rand(n, device=device) < 0.2] = -100
        x64 = base.double().requires_grad_()
        loss64 = cross_entropy_reference(x64, y, reduction="none", **opts)
        (g64,) = torch.autograd.grad(loss64.sum(), [x64])

        def run(_):
            x = base.clone().requires_grad_()
            loss = cross_entropy(x, y, reduction="none", inplace_backward=True, **opts)
            (g,) = torch.autograd.grad(loss.sum(), [x])
            return loss.detach(), g

        res = _per_variant(sorted(set(variants) | {0}), run)
        ref_err = max(_rel(res[0][0], loss64), _rel(res[0][1], g64), 1e-7)
        for i in variants:
            err = max(_rel(res[i][0], loss64), _rel(res[i][1], g64))
            finite = bool(torch.isfinite(res[i][0]).all() and torch.isfinite(res[i][1]).all())
            worst[i] = max(worst[i], err / ref_err if finite else float("inf"))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(map(str, VARIANTS)))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ncu", action="store_true", help="one untimed call per variant (for ncu), no checks")
    args = ap.parse_args()
    variants = [int(s) for s in args.variants.split(",") if s]
    device = torch.device("cuda")

    torch.manual_seed(0)
    x = (2 * torch.randn(args.rows, args.vocab, device=device)).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, args.vocab, (args.rows,), device=device)
    restore = Restore(x)
    if args.ncu:
        _per_variant(variants, lambda i: (restore(), _fwd_bwd(x, y), torch.cuda.synchronize()))
        return

    accuracy = check(variants, device)
    h = Harness(device, warmup=args.warmup, reps=args.reps)
    bw = h.copy_bandwidth_gbps(1 << 30)
    floor_ms = 2 * x.numel() * x.element_size() / (bw * 1e9) * 1e3

    def untimed():
        restore()
        h.flush()

    times = _per_variant(variants, lambda i: h.wall_times(lambda: _fwd_bwd(x, y), untimed))
    print(f"\ncross_entropy(inplace_backward=True) fwd+bwd, logits [{args.rows}, {args.vocab}] bf16, "
          f"{torch.cuda.get_device_name(device)}; copy {bw / 1e3:.2f} TB/s -> one-pass floor {floor_ms:.3f} ms "
          f"(1.40 ms at 3.0 TB/s); median of {args.reps}")
    print(f"| variant | kernel | ms (median) | min-max | floor / ms | vs 1.40 ms | err / variant 0's |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i in variants:
        t = times[i]
        med = statistics.median(t)
        print(f"| {i} | {VARIANTS.get(i, '?')} | {med:.3f} | {min(t):.3f}-{max(t):.3f} | "
              f"{100 * floor_ms / med:.1f}% | {100 * 1.40 / med:.1f}% | {accuracy[i]:.2f} |")


if __name__ == "__main__":
    main()
