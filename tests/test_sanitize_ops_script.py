"""scripts/sanitize_ops.py, the compute-sanitizer driver, runs every step on the CPU kernels and fails loudly when
a kernel's result is wrong (it is what makes a race visible as a wrong value, not only as a sanitizer report)."""
import importlib.util
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sanitize_ops.py"

def _load():
    spec = importlib.util.spec_from_file_location("sanitize_ops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

def test_every_step_passes_on_cpu(capsys):
    mod = _load()
    assert mod.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(mod.STEPS) == 8 and out.count("ok   ") == len(mod.STEPS) and "FAIL" not in out

def test_a_wrong_kernel_result_fails_its_step(monkeypatch, capsys):
    mod = _load()
    real = mod.ops.rms_norm
    monkeypatch.setattr(mod.ops, "rms_norm", lambda x, w, *a, **k: real(x, w, *a, **k) * 1.05)
    assert mod.main(["--device", "cpu", "--steps", "norms_and_activations"]) == 1
    assert "FAIL norms_and_activations" in capsys.readouterr().out

def test_without_cublas_leaves_out_exactly_the_cublas_steps(capsys):
    mod = _load()
    assert mod.main(["--device", "cpu", "--without-cublas"]) == 0
    out = capsys.readouterr().out
    ran = {line.split()[1] for line in out.splitlines() if line.startswith("ok   ")}
    assert ran == {f.__name__ for f in mod.STEPS} - set(mod.CUBLAS_STEPS)
    assert set(mod.CUBLAS_STEPS) <= {f.__name__ for f in mod.STEPS}  # no stale names
    assert out.startswith("skip lm_head_family, lm_head_fused, lora_family")
