"""The NF4 benchmark specs run end to end on CPU (quick shapes): rows for the forward, 'n/a' for the backward
these inference ops do not have, and the issue-4 target lines (n/a off the GPU)."""
from __future__ import annotations

import json

from bench import kernels


def test_nf4_specs_quick_cpu(tmp_path):
    argv = ["--ops", "nf4_dequantize,nf4_gemv", "--quick", "--device", "cpu", "--out", str(tmp_path), "--tag", "t",
            "--providers", "swiftlora,torch,gemm"]
    assert kernels.main(argv) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    rows = {(r["op"], r["provider"], r["pass"]): r for r in data["rows"]}
    for op, providers in (("nf4_dequantize", ("swiftlora", "torch")), ("nf4_gemv", ("swiftlora", "torch", "gemm"))):
        for p in providers:
            fwd, bwd = rows[op, p, "fwd"], rows[op, p, "fwd+bwd"]
            assert fwd["status"] == "ok" and fwd["wall_ms"] > 0, fwd
            assert bwd["status"] == "n/a: no backward pass", bwd
        assert rows[op, "swiftlora", "fwd"]["rel_err"] < 1e-2
    assert rows["nf4_dequantize", "swiftlora", "fwd"]["rel_err"] == 0.0  # bit-identical to the reference
    lines = [t["target"] for t in data["targets"]]
    assert any("nf4_gemv" in t for t in lines) and any("nf4_dequantize" in t for t in lines)
