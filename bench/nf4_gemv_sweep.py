"""Sweep of the nf4_gemv kernel variants (the SWIFTLORA_NF4_GEMV_VARIANT knob, csrc/cuda/nf4_gemv.cu) on the
issue-4 shape W [14336, 4096] NF4 (blocksize 64, double-quantized), x [M, 4096] bf16, M = 1, 4, 16.

    python -m bench.nf4_gemv_sweep [--variants simt,mma,stream,...] [--ms 1,4,16] [--reps 200] [--quick]

One line per (variant, M): wall µs (CUDA events around the call alone, median of --reps calls, L2 flushed before
each by rewriting a 256 MiB buffer, as bench.kernels), kernel µs (torch.profiler), the weight bytes' bandwidth and
the share of the 10.1 µs floor (30.3 MB at 3.0 TB/s), and the check against nf4_gemv_reference: relative error
to the float64 product and DESIGN.md's bound (2x the bf16 reference's error, and < 1e-2). Shapes a variant does
not take (the tensor-core kernel: M > 4) run the SIMT kernel, so those rows repeat "simt". A diagnostic for
picking the defaults, not a results file (bench.kernels --ops nf4_gemv is).
"""
from __future__ import annotations

import argparse
import os

import torch

from . import harness
from .ops._nf4 import BLOCKSIZE, K, N, QUICK_K, QUICK_N, quantized_weight, weight_bytes

VARIANTS = "simt,mma,stream,stream-w8,stream-d4,stream-d8"
ENV = "SWIFTLORA_NF4_GEMV_VARIANT"
COPY_TBPS = 3.0


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.nf4_gemv_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=VARIANTS, help="comma-separated SWIFTLORA_NF4_GEMV_VARIANT values")
    p.add_argument("--ms", default="1,4,16", help="rows of x")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help=f"W [{QUICK_N}, {QUICK_K}] (a smoke test)")
    args = p.parse_args(argv)
    from swiftlora.ops.nf4 import nf4_gemv, nf4_gemv_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, k = (QUICK_N, QUICK_K) if args.quick else (N, K)
    inp = quantized_weight(n, k, torch.bfloat16, device)
    wargs = (inp["packed"], *inp["state"].kernel_args())
    floor_us = weight_bytes(n, k) / (COPY_TBPS * 1e12) * 1e6
    h = harness.Harness(device, warmup=10, reps=args.reps, profile_reps=20)
    print(f"W [{n}, {k}] nf4-dq bs{BLOCKSIZE}, {weight_bytes(n, k) / 1e6:.2f} MB; floor {floor_us:.2f} us at "
          f"{COPY_TBPS} TB/s; {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'variant':<11} {'M':>2} {'wall us':>8} {'kernel us':>9} {'TB/s':>5} {'% floor':>7} {'rel err':>9} "
          f"{'bound':>9}  check")
    old = os.environ.get(ENV)
    try:
        for m in (int(v) for v in args.ms.split(",")):
            torch.manual_seed(m)
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            ref64 = nf4_gemv_reference(x, *wargs, blocksize=BLOCKSIZE, out_features=n)
            ref16 = nf4_gemv_reference(x, *wargs, blocksize=BLOCKSIZE, out_features=n, compute_dtype=torch.bfloat16)
            bound = 2 * max(_rel_err(ref16, ref64), _rel_err(ref64.to(torch.bfloat16), ref64))
            for variant in args.variants.split(","):
                os.environ[ENV] = variant

                def call(x=x):
                    return nf4_gemv(x, *wargs, blocksize=BLOCKSIZE, out_features=n)

                err = _rel_err(call(), ref64)
                meas = h.measure(call)
                wall_us = meas.wall_ms * 1e3
                kernel = f"{meas.kernel_ms * 1e3:9.2f}" if meas.kernel_ms is not None else f"{'-':>9}"
                ok = "ok" if err <= bound and err < 1e-2 else "FAIL"
                print(f"{variant:<11} {m:>2} {wall_us:8.2f} {kernel} {weight_bytes(n, k) / wall_us / 1e6:5.2f} "
                      f"{100 * floor_us / wall_us:6.1f}% {err:9.3e} {bound:9.3e}  {ok}")
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


if __name__ == "__main__":
    main()
