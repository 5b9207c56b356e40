"""Writes nf4_golden.pt: bitsandbytes' own NF4 outputs for a few small inputs, so tests/ops/test_nf4.py checks
bit-compatibility where bitsandbytes is not installed.

    PYTHONPATH=python python tests/quant/golden/make_nf4_golden.py [--device cuda]

Inputs come from fixed seeds. On the CPU, bitsandbytes' 8-bit absmax codes come from a lookup table that can
differ from its CUDA kernels near a midpoint (see tests/ops/test_nf4_bnb.py); a case whose codes differ from the
CUDA rule (our reference) is redrawn with the next seed, so every stored value is also what bitsandbytes' CUDA
kernels produce. Run with --device cuda on a GPU to take everything from the CUDA kernels directly.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

CASES = [  # name, blocksize, compress_statistics, shape
    ("bs64-nested", 64, True, (24, 96)),
    ("bs32-plain-odd", 32, False, (7, 33)),
    ("bs256-nested-short-last-block", 256, True, (5, 300)),
    ("bs4096-plain", 4096, False, (3, 1500)),
]


def _case(name, blocksize, compress, shape, dtype, device, seed):
    import bitsandbytes.functional as bnb_f

    from swiftlora.ops.nf4 import nf4_quantize_reference

    for attempt in range(20):
        g = torch.Generator().manual_seed(seed + attempt)
        x = (torch.randn(shape, generator=g) * 0.03).to(dtype).to(device)
        packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
        ref = nf4_quantize_reference(x, blocksize, compress)
        if torch.equal(ref.absmax, state.absmax) and torch.equal(ref.packed, packed):
            break
    else:
        raise RuntimeError(f"{name}: bitsandbytes disagrees with the CUDA rule for 20 seeds")
    return {
        "name": f"{name}-{str(dtype).removeprefix('torch.')}", "blocksize": blocksize, "compress_statistics": compress,
        "x": x.cpu(), "packed": packed.cpu(), "absmax": state.absmax.cpu(),
        "absmax2": state.state2.absmax.cpu() if compress else None,
        "offset": state.offset.cpu() if compress else None,
        "dequantized": bnb_f.dequantize_4bit(packed, state).cpu(),
    }


def main() -> None:
    import bitsandbytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).with_name("nf4_golden.pt")))
    args = ap.parse_args()
    cases = []
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        for j, (name, bs, compress, shape) in enumerate(CASES):
            cases.append(_case(name, bs, compress, shape, dtype, args.device, seed=1000 * i + 100 * j))
    for c in cases:
        c["source"] = f"bitsandbytes {bitsandbytes.__version__} on {args.device}"
    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")  # a failed write never replaces a good file
    os.close(fd)
    torch.save(cases, tmp)
    os.replace(tmp, out)
    print(f"wrote {len(cases)} cases to {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
