"""Sweep of the frozen LM head's vocabulary-block path: block size (memory_budget_mb, shared by the two block
buffers, each capped at 32 MiB by lm_head_blocks.L2_BLOCK_BYTES) x softmax/GEMM overlap on or off, for fused_linear_cross_entropy and token_logprobs at
the issue-3 benchmark shapes, beside the two-GEMM yardstick measured in the same process.

    python -m bench.lm_head_sweep [--budgets 16,32,64] [--reps 50] [--quick]

Prints one line per setting: wall ms (median, L2 flushed before each call, as bench.kernels), the ratio to the
GEMMs, kernel ms (summed kernel durations: with overlap on, kernels that run at once are counted twice, so it can
exceed the wall time) and peak extra MiB. A diagnostic for choosing the defaults, not a results file.
"""
from __future__ import annotations

import argparse

import torch

from . import harness
from .ops._lm_head import gemm_bench


def _cases(quick: bool):
    if quick:
        return [("fused_linear_cross_entropy", 256, 128, 4096), ("token_logprobs", 256, 128, 4096)]
    return [("fused_linear_cross_entropy", 8192, 2048, 128256), ("token_logprobs", 8192, 2048, 151936)]


def _op_call(name, hidden, weight, ids, budget):
    from swiftlora import ops

    if name == "fused_linear_cross_entropy":
        return lambda: ops.fused_linear_cross_entropy(hidden, weight, ids, memory_budget_mb=budget)
    grad = torch.randn(ids.shape, device=ids.device)
    return lambda: (ops.token_logprobs(hidden, weight, ids, memory_budget_mb=budget), grad)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lm_head_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="16,32,64", help="memory_budget_mb values (MiB, both block buffers)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test; CPU works)")
    args = p.parse_args(argv)
    import swiftlora.ops.lm_head_blocks as blocks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h = harness.Harness(device, warmup=5 if not args.quick else 1, reps=args.reps if not args.quick else 3,
                        profile_reps=10 if not args.quick else 2)
    for name, n, hdim, v in _cases(args.quick):
        torch.manual_seed(0)
        hidden = torch.randn(n, hdim, device=device).to(torch.bfloat16).requires_grad_()
        weight = (torch.randn(v, hdim, device=device) * hdim**-0.5).to(torch.bfloat16)
        ids = torch.randint(0, v, (n,), device=device)
        g = gemm_bench(hidden, weight, train_w=False)
        base = h.measure(g.fwd_bwd)
        print(f"{name} [{n}, {hdim}] x [{v}, {hdim}]: GEMMs {base.wall_ms:.3f} ms (kernel {base.kernel_ms})")
        for budget in (float(b) for b in args.budgets.split(",")):
            call = _op_call(name, hidden, weight, ids, budget)
            for overlap in (True, False):
                def fwd_bwd(call=call, overlap=overlap):
                    blocks.OVERLAP = overlap
                    try:
                        out = call()
                        if isinstance(out, tuple):
                            return torch.autograd.grad(out[0], hidden, out[1])
                        return torch.autograd.grad(out, hidden)
                    finally:
                        blocks.OVERLAP = True

                m = h.measure(fwd_bwd)
                kernel = "-" if m.kernel_ms is None else f"{m.kernel_ms:.3f}"
                peak = "-" if m.peak_extra_mib is None else f"{m.peak_extra_mib:.1f}"
                print(f"  budget {budget:g} MiB, overlap {'on ' if overlap else 'off'}: {m.wall_ms:.3f} ms "
                      f"= {m.wall_ms / base.wall_ms:.3f}x GEMMs, kernel {kernel} ms, peak extra {peak} MiB")


if __name__ == "__main__":
    main()
