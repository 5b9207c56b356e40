"""The scaling benchmark's harness on CPU (gloo ranks): one and two processes on the tiny shape, the report's
efficiency column and a failed count reported as such."""
from __future__ import annotations

import json

import pytest
import torch

from bench import e2e_scaling

pytest.importorskip("bitsandbytes")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def test_tiny_scaling_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = e2e_scaling.main(["--shape", "tiny", "--gpus", "1,2", "--steps", "2", "--warmup", "1", "--seq", "48",
                             "--out", str(tmp_path), "--ckpt-dir", str(tmp_path / "ckpt"), "--tag", "t"])
    assert code == 0
    result = json.loads((tmp_path / "t.json").read_text())
    one, two = result["rows"]
    assert one["status"] == two["status"] == "ok" and two["gpus"] == 2
    assert two["tokens_per_s"] > 0 and one["scaling_efficiency"] == pytest.approx(1.0)
    assert 0 < two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
    table = (tmp_path / "t.md").read_text()
    assert "| 2 |" in table and "%" in table


def test_a_failed_count_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = e2e_scaling.parse_args(["--shape", "tiny", "--ckpt-dir", str(tmp_path / "missing"), "--timeout", "120"])
    row = e2e_scaling.run_count(1, args, tmp_path)  # no checkpoint there: the worker fails
    assert row["status"].startswith("failed") and row["gpus"] == 1
    text = e2e_scaling.report({"shape": "tiny", "gpu": "cpu", "date": "d", "torch": "t", "cuda": None,
                               "swiftlora": "v", "batch": 2, "seq": 48, "steps": 1}, [row])
    assert "failed" in text
