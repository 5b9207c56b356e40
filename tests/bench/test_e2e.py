"""The end-to-end benchmark's harness on CPU: a tiny-shape swiftlora step measured in-process, the HF + PEFT +
bitsandbytes baseline in its subprocess, a peer that cannot import reported as unavailable, and the report."""
from __future__ import annotations

import pytest

from bench import e2e

pytest.importorskip("bitsandbytes")


def test_quick_rows_and_report(tmp_path):
    args = e2e.parse_args(["--quick", "--device", "cpu", "--ckpt-dir", str(tmp_path / "ckpt"), "--steps", "1",
                           "--out", str(tmp_path)])
    ours = e2e.measure("swiftlora", "tiny", args)
    assert ours["status"] == "ok" and ours["step_ms"] > 0 and ours["tokens_per_s"] > 0
    shapes = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)]  # q k v o gate up down
    assert ours["trainable_params"] == 2 * sum(16 * (i + o) for i, o in shapes)  # r=16 on 7 projections, 2 layers
    assert len(ours["losses"]) == args.warmup + args.steps
    hf = e2e.run_subprocess("hf", "tiny", args, tmp_path)
    assert hf["status"] == "ok", hf["status"]
    assert abs(hf["losses"][0] - ours["losses"][0]) < 1e-2 * abs(hf["losses"][0])  # same data, same model
    missing = e2e.run_subprocess("liger", "tiny", args, tmp_path)  # liger_kernel is not installed here
    assert missing["status"].startswith("unavailable")
    text = e2e.report({"date": "d", "git_commit": "c", "torch": "t", "steps": 1, "warmup": 1}, [ours, hf, missing])
    assert "| tiny | swiftlora |" in text and "| tiny | liger | - |" in text
