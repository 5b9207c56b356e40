"""``swiftlora train`` end to end on a tiny model and a JSONL data set: progress, answers before/after, loss-curve
PNG, adapters and merged model; ``python -m swiftlora`` and the argument errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from swiftlora.cli import build_parser, main
from tests.models.helpers import save_tiny

pytest.importorskip("trl")


def test_train_job_writes_everything(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "tiny", "qwen2", dtype=torch.float32)
    rows = [{"conversations": [{"from": "human", "value": f"Count to {i}."},
                               {"from": "gpt", "value": " ".join(str(k) for k in range(1, i + 2))}]}
            for i in range(12)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code = main(["train", "--model", str(model_dir), "--dataset", str(data), "--max-steps", "4", "--batch-size",
                 "4", "--max-seq-length", "96", "--r", "4", "--dtype", "float32", "--learning-rate", "5e-3",
                 "--warmup-steps", "0", "--output-dir", str(out), "--prompt", "Count to 3.", "--max-new-tokens", "6"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Before training:" in printed and "After training:" in printed
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert (out / "lora" / "adapter_config.json").exists()
    merged = json.loads((out / "merged-16bit" / "config.json").read_text())
    assert merged["model_type"] == "qwen2" and "quantization_config" not in merged


def test_module_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "swiftlora", "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--max-steps" in result.stdout


def test_bad_arguments_exit_with_a_message(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--gradient-checkpointing", "maybe"])
    assert "unsloth, true or false" in capsys.readouterr().err
    assert main([]) == 2  # no subcommand: help
