"""The kernel benchmark on CPU: the runner's rows, header and files, peers that cannot run (rows, not crashes), and
the GPU-only bookkeeping (kernel-time filter, targets) on synthetic data."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bench import harness, kernels, ops

PASSES = ("fwd", "fwd+bwd")


def run(tmp_path, *extra) -> tuple[dict, str]:
    argv = ["--ops", "rms_norm", "--quick", "--device", "cpu", "--out", str(tmp_path), "--tag", "t", *extra]
    assert kernels.main(argv) == 0
    return json.loads((tmp_path / "t.json").read_text()), (tmp_path / "t.md").read_text()


def test_quick_cpu_run_writes_rows_and_header(tmp_path):
    data, md = run(tmp_path, "--providers", "swiftlora,torch,liger", "--peers", str(tmp_path / "no-peers"))
    header = data["header"]
    for key in ("date", "device", "python", "torch", "torch_cuda", "swiftlora", "git_commit", "peers", "copy_bw_gbps"):
        assert key in header, key
    assert header["device"] == "cpu" and header["copy_bw_gbps"] > 0
    assert "cuda_built" in header["swiftlora"], header["swiftlora"]
    assert "liger" in header["peers"]

    rows = {(r["provider"], r["pass"]): r for r in data["rows"] if r["case"] == ""}
    assert set(rows) == {(p, q) for p in ("swiftlora", "torch", "liger") for q in PASSES}
    for provider in ("swiftlora", "torch"):
        for pass_ in PASSES:
            r = rows[provider, pass_]
            assert r["status"] == "ok", r
            assert r["shape"] == "x[256,512]" and r["dtype"] == "bfloat16"
            assert r["wall_ms"] > 0 and r["gbps"] > 0 and r["copy_bw_frac"] > 0 and r["speedup_vs_torch"] > 0
            assert r["floor_bytes"] == (ops.load("rms_norm").cases(True)[0].bytes_fwd if pass_ == "fwd"
                                        else ops.load("rms_norm").cases(True)[0].bytes_fwd_bwd)
    assert rows["torch", "fwd"]["speedup_vs_torch"] == pytest.approx(1.0)
    assert rows["swiftlora", "fwd"]["rel_err"] < 1e-2
    for pass_ in PASSES:  # liger needs CUDA: a row that says why
        assert rows["liger", pass_]["status"].startswith("unavailable: "), rows["liger", pass_]

    assert "| rms_norm |" in md and "| swiftlora | fwd+bwd |" in md and "## Targets" in md
    assert "unavailable: " in md


def test_peer_subprocess_crash_is_a_row(tmp_path):
    broken = tmp_path / "peers" / "torch"  # shadows torch in the peer's subprocess only
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('broken peer environment')\n")
    data, _ = run(tmp_path, "--providers", "unsloth", "--peers", str(tmp_path / "peers"))
    statuses = [r["status"] for r in data["rows"]]
    assert len(statuses) == 2 * len(ops.load("rms_norm").cases(True))  # fwd and fwd+bwd of each case
    for status in statuses:
        assert status.startswith("unavailable: subprocess exited with 1"), status
        assert "broken peer environment" in status


def test_restore_puts_back_overwritten_inputs():
    t = torch.randn(3, 5, dtype=torch.bfloat16)
    saved = t.clone()
    restore = harness.Restore(t)
    t.mul_(3)
    restore()
    assert torch.equal(t, saved)


def _event(name, device_type, us, kind=None):
    return SimpleNamespace(name=name, device_type=device_type, activity_type=kind,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_kernel_time_leaves_out_flush_restores_and_annotations():
    from torch.autograd import DeviceType

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    flush = "void at::native::vectorized_elementwise_kernel<4, at::native::bitwise_not_kernel_cuda(...)"
    events = []
    for _ in range(2):  # two calls, each: flush + one restore (untimed), a kernel and a memset (timed)
        events += [_event(flush, cuda, 90.0, "kernel"), _event(flush, cuda, 40.0, "kernel")]
        events += [_event("rms_norm_fwd_kernel", cuda, 10.0, "kernel"), _event("Memset (Device)", cuda, 1.0, "gpu_memset")]
        events += [_event("aten::rms_norm", cpu, 50.0), _event("range", cuda, 500.0, "gpu_user_annotation")]
    ms, per_call, note = harness.device_time_per_call(events, 2, 2)
    assert note == "" and ms == pytest.approx(0.011) and per_call == 2
    ms, per_call, note = harness.device_time_per_call(events, 2, 1)  # flush count mismatch: no number
    assert ms is None and per_call is None and "expected 2" in note


def test_targets_on_synthetic_rows():
    case = ops.load("rms_norm").cases(False)[0]
    copy_bw = 3000.0

    def row(provider, wall, kernel):
        return {"op": "rms_norm", "case": "", "shape": case.shape, "pass": "fwd+bwd", "provider": provider,
                "status": "ok", "wall_ms": wall, "kernel_ms": kernel, "floor_bytes": case.bytes_fwd_bwd}

    rows = [row("swiftlora", 0.25, 0.24), row("torch", 2.0, 1.5), row("liger", 0.26, 0.25), row("unsloth", 0.24, 0.23)]
    kernels.derive(rows, copy_bw)
    verdicts = {t["target"]: t["passed"] for t in kernels.targets(rows, "cuda", ["rms_norm"])}
    assert verdicts == {
        "rms_norm fwd+bwd wall <= 0.30 ms": True,
        "rms_norm fwd+bwd kernel >= 90% copy BW": True,  # 671 MB in 0.24 ms = 2797 GB/s = 93%
        "rms_norm fwd+bwd >= 5x torch reference": True,
        "rms_norm fwd+bwd not slower than liger": True,
        "rms_norm fwd+bwd not slower than unsloth": False,  # 0.25 / 0.24 = 1.04 > 1.02
        # no rows for the frozen-weight case: no verdicts
        "rms_norm[frozen-w] fwd+bwd >= 5x torch reference": None,
        "rms_norm[frozen-w] fwd+bwd not slower than liger": None,
        "rms_norm[frozen-w] fwd+bwd not slower than unsloth": None,
    }
    quick = kernels.targets(rows, "cpu", ["rms_norm"])
    assert all(t["passed"] is None for t in quick)


def test_gpu_short_name():
    assert harness.gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert harness.gpu_short_name("NVIDIA H200") == "h200"
    assert harness.gpu_short_name(None) == "cpu"


def test_cross_entropy_targets_on_synthetic_rows():
    def row(op, provider, wall, mib, case=""):
        spec = ops.load(op).cases(False)[0]
        return {"op": op, "case": case, "shape": spec.shape, "pass": "fwd+bwd", "provider": provider, "status": "ok",
                "wall_ms": wall, "kernel_ms": wall, "floor_bytes": spec.bytes_fwd_bwd, "peak_extra_mib": mib}

    rows = [row("cross_entropy", "swiftlora", 2.2, 2100.0), row("cross_entropy", "swiftlora_inplace", 1.5, 40.0),
            row("cross_entropy", "liger", 1.8, 60.0), row("cross_entropy", "unsloth", 2.0, 2100.0),
            row("fused_linear_cross_entropy", "swiftlora", 13.0, 130.0),
            row("fused_linear_cross_entropy", "gemm", 12.0, 0.0),
            row("fused_linear_cross_entropy", "liger", 12.5, 300.0),
            row("token_logprobs", "swiftlora", 8.0, 120.0), row("token_logprobs", "gemm", 7.0, 0.0)]
    kernels.derive(rows, 3000.0)
    names = ["cross_entropy", "fused_linear_cross_entropy", "token_logprobs"]
    verdicts = {t["target"]: t["passed"] for t in kernels.targets(rows, "cuda", names)}
    assert verdicts == {
        "cross_entropy fwd+bwd wall <= 1.6 ms (in place)": True,
        "cross_entropy fwd+bwd peak extra <= 64 MiB (in place)": True,
        "fused_linear_cross_entropy fwd+bwd <= 1.15x its GEMMs": True,  # 13 / 12 = 1.083
        "fused_linear_cross_entropy fwd+bwd peak extra <= 128 MiB": False,
        "token_logprobs fwd+bwd <= 1.2x its GEMMs": True,  # 8 / 7 = 1.14
        "token_logprobs fwd+bwd peak extra <= 256 MiB": True,
        "cross_entropy fwd+bwd faster than the best peer": True,  # in place 1.5 < liger 1.8
        "fused_linear_cross_entropy fwd+bwd faster than the best peer": False,  # 13 vs liger 12.5
        "token_logprobs fwd+bwd faster than the best peer": None,  # no peer row
    }


def test_qlora_targets_on_synthetic_rows():
    def row(op, pass_, provider, wall):
        spec = ops.load(op).cases(False)[0]
        return {"op": op, "case": "", "shape": spec.shape, "pass": pass_, "provider": provider, "status": "ok",
                "wall_ms": wall, "kernel_ms": wall, "floor_bytes": spec.bytes_fwd_bwd}

    rows = [row("qlora_linear", "fwd", "swiftlora", 0.80), row("qlora_linear", "fwd", "gemm", 0.70),
            row("lora_mlp", "fwd+bwd", "swiftlora", 4.2), row("lora_mlp", "fwd+bwd", "unsloth", 5.26)]
    kernels.derive(rows, 3000.0)
    verdicts = {t["target"]: t["passed"] for t in kernels.targets(rows, "cuda", ["qlora_linear", "lora_mlp"])}
    assert verdicts == {
        "qlora_linear fwd <= 1.10x bf16 GEMM (same run)": False,  # 0.80 / 0.70 = 1.14
        "lora_mlp fwd+bwd wall <= 4.3 ms": True,
        "lora_mlp fwd+bwd faster than unsloth": True,
        "lora_mlp fwd+bwd faster than peft": None,  # not run
    }
    assert all(t["passed"] is None for t in kernels.targets(rows, "cpu", ["qlora_linear", "lora_mlp"]))
    # The targets take the fastest plan of the same run (here the chunked plan, and the padded plan).
    rows = [row("qlora_linear", "fwd", "swiftlora", 0.80), row("qlora_linear", "fwd", "swiftlora_chunked", 0.76),
            row("qlora_linear", "fwd", "gemm", 0.70), row("lora_mlp", "fwd+bwd", "swiftlora", 4.4),
            row("lora_mlp", "fwd+bwd", "swiftlora_a64", 4.25)]
    kernels.derive(rows, 3000.0)
    checks = {t["target"]: t for t in kernels.targets(rows, "cuda", ["qlora_linear", "lora_mlp"])}
    assert checks["qlora_linear fwd <= 1.10x bf16 GEMM (same run)"]["passed"] is True  # 0.76 / 0.70 = 1.086
    assert "swiftlora_chunked" in checks["qlora_linear fwd <= 1.10x bf16 GEMM (same run)"]["detail"]
    assert checks["lora_mlp fwd+bwd wall <= 4.3 ms"]["passed"] is True
