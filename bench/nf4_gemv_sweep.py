"""Sweep of the nf4_gemv and nf4_dequantize kernel variants (the SWIFTLORA_NF4_GEMV_VARIANT and
SWIFTLORA_NF4_DEQUANT_VARIANT knobs, csrc/cuda/nf4_gemv.cu, nf4_dequant.cu) on the issue-4 shape W [14336, 4096]
NF4 (blocksize 64, double-quantized), x [M, 4096] bf16, M = 1, 4, 16; W dequantized to bf16.

    python -m bench.nf4_gemv_sweep [--variants simt,mma-s2-d5,...] [--ms 1,4,16] [--reps 200] [--quick]
                                   [--dequant-variants words,table,table-cs]

One line per (variant, M): wall µs (CUDA events around the call alone, median of --reps calls, L2 flushed before
each by rewriting a 256 MiB buffer, as bench.kernels), kernel µs (torch.profiler), the weight bytes' bandwidth and
the share of the 10.1 µs floor (30.3 MB at 3.0 TB/s), and the check against nf4_gemv_reference: relative error
to the float64 product and DESIGN.md's bound (2x the bf16 reference's error, and < 1e-2). Shapes a variant does
not take (the tensor-core kernel: M > 4) run the SIMT kernel, so those rows repeat "simt". Then one line per
dequantize variant: wall and kernel µs, bandwidth over the 147.7 MB floor bytes, and whether its output is
bit-identical to nf4_dequantize_reference. A diagnostic for picking the defaults, not a results file.
"""
from __future__ import annotations

import argparse
import os

import torch

from . import harness
from .ops._nf4 import BLOCKSIZE, K, N, QUICK_K, QUICK_N, quantized_weight, weight_bytes

VARIANTS = "simt,mma-s1-d5,mma-s2-d3,mma-s2-d5,mma-s2-d6"
DEQUANT_VARIANTS = "words,table,table-cs"
ENV = "SWIFTLORA_NF4_GEMV_VARIANT"
DEQUANT_ENV = "SWIFTLORA_NF4_DEQUANT_VARIANT"
COPY_TBPS = 3.0


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.nf4_gemv_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=VARIANTS, help="comma-separated SWIFTLORA_NF4_GEMV_VARIANT values")
    p.add_argument("--ms", default="1,4,16", help="rows of x")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--dequant-variants", default=DEQUANT_VARIANTS, help="SWIFTLORA_NF4_DEQUANT_VARIANT values")
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
    old = {e: os.environ.get(e) for e in (ENV, DEQUANT_ENV)}
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
        if args.dequant_variants:
            _dequant_sweep(h, inp, n, k, args.dequant_variants.split(","))
    finally:
        for e, v in old.items():
            if v is None:
                os.environ.pop(e, None)
            else:
                os.environ[e] = v


def _dequant_sweep(h: harness.Harness, inp: dict, n: int, k: int, variants: list[str]) -> None:
    from swiftlora.ops.nf4 import nf4_dequantize, nf4_dequantize_reference

    args = (inp["packed"], *inp["state"].kernel_args())
    floor_bytes = weight_bytes(n, k) + n * k * 2
    ref = nf4_dequantize_reference(*args, blocksize=BLOCKSIZE, shape=(n, k), dtype=torch.bfloat16)
    print(f"nf4_dequantize -> bf16 [{n}, {k}]: floor {floor_bytes / 1e6:.1f} MB, "
          f"{floor_bytes / (COPY_TBPS * 1e12) * 1e6:.1f} us at {COPY_TBPS} TB/s")
    print(f"{'variant':<11} {'wall us':>8} {'kernel us':>9} {'TB/s':>5}  bits")
    for variant in variants:
        os.environ[DEQUANT_ENV] = variant

        def call():
            return nf4_dequantize(*args, blocksize=BLOCKSIZE, shape=(n, k), dtype=torch.bfloat16)

        same = torch.equal(call().view(torch.int16), ref.view(torch.int16))
        meas = h.measure(call)
        wall_us = meas.wall_ms * 1e3
        kernel = f"{meas.kernel_ms * 1e3:9.2f}" if meas.kernel_ms is not None else f"{'-':>9}"
        print(f"{variant:<11} {wall_us:8.2f} {kernel} {floor_bytes / wall_us / 1e6:5.2f}  "
              f"{'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
