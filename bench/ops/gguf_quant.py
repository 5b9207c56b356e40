"""GGUF quantizer benchmark: every type on a Llama-8B-sized matrix, against the device's copy bandwidth.

    python -m bench.ops.gguf_quant                      # CUDA if available, else CPU; all types
    python -m bench.ops.gguf_quant --device cpu --quick --types q8_0,q4_k

Input x [14336, 4096] bf16 (an 8B ffn matrix; --quick: [512, 4096]). Floor per call: read x (2 B/element) and
write the blocks (bytes_per_block / block B/element). Reported: wall and kernel time (bench.harness: L2 flushed
between calls), GB/s over the floor, the fraction of the measured copy bandwidth (target on the H100: >= 0.5)
and input MB/s (float32-equivalent element rate x 4 B, the number to compare with llama-quantize on CPU). The raw
op is timed (torch.ops.swiftlora.gguf_quantize: no NaN check). Rows go to bench/results/gguf_quant-<tag>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import harness

REPO = Path(__file__).resolve().parents[2]
SHAPE, QUICK_SHAPE = (14336, 4096), (512, 4096)


def measure_types(device: torch.device, types: list[str], shape: tuple[int, int], h: harness.Harness) -> list[dict]:
    from swiftlora.ops.gguf_quant import GGUF_QUANT_TYPES

    torch.manual_seed(0)
    x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    copy_bw = h.copy_bandwidth_gbps(x.numel() * 2) if h.is_cuda else None
    rows = []
    for name in types:
        tid, block, size = GGUF_QUANT_TYPES[name.upper()]
        floor = x.numel() * 2 + x.numel() // block * size
        m = h.measure(lambda: torch.ops.swiftlora.gguf_quantize(x, tid))
        gbps = floor / (m.wall_ms * 1e-3) / 1e9
        row = {"op": "gguf_quantize", "type": name.upper(), "shape": f"x[{shape[0]},{shape[1]}]", "dtype": "bfloat16",
               "device": str(device), "floor_bytes": floor, "wall_ms": m.wall_ms, "kernel_ms": m.kernel_ms,
               "gbps": gbps, "copy_bw_gbps": copy_bw, "copy_bw_frac": gbps / copy_bw if copy_bw else None,
               "input_mb_s_f32": x.numel() * 4 / (m.wall_ms * 1e-3) / 1e6}
        frac = f", {row['copy_bw_frac']:.0%} of copy" if copy_bw else ""
        print(f"{name.upper():5s} {m.wall_ms:9.3f} ms  {gbps:8.1f} GB/s{frac}  ({row['input_mb_s_f32']:.0f} MB/s "
              "float32-equivalent input)", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--types", default="q8_0,q4_0,q4_1,q5_0,q5_1,q2_k,q3_k,q4_k,q5_k,q6_k")
    p.add_argument("--quick", action="store_true", help=f"x{list(QUICK_SHAPE)} instead of x{list(SHAPE)}")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--tag", default=None, help="results file suffix (default: device name)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    h = harness.Harness(device, warmup=2 if device.type == "cpu" else 5, reps=args.reps, profile_reps=5)
    rows = measure_types(device, [t.strip() for t in args.types.split(",") if t.strip()],
                         QUICK_SHAPE if args.quick else SHAPE, h)
    env = harness.environment(device, REPO)
    tag = args.tag or harness.gpu_short_name(env.get("gpu")) if device.type == "cuda" else (args.tag or "cpu")
    out = Path(args.out) / f"gguf_quant-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": env, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
