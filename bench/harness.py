"""Timing, kernel time, memory and copy bandwidth for the kernel benchmark, and the row writers.

One measurement of a callable ``fn`` (a forward, or a forward + backward):
- wall time: CUDA events around ``fn`` alone, ``warmup`` calls first, then the median of ``reps`` calls. Before each
  call (untimed) the inputs an in-place provider overwrote are restored and L2 is flushed by rewriting a 256 MiB
  buffer. As in ``triton.testing.do_bench`` there is no host sync between calls, so the CPU may run ahead (as in
  training); a gap between ``fn``'s kernels still counts. On CPU: ``time.perf_counter`` around ``fn``.
- kernel time: ``torch.profiler`` over ``profile_reps`` calls; the sum of device activity durations (kernels,
  memcpy, memset) per call. The untimed work (flush, restore) is done by ``bitwise_not`` kernels only, which no
  benchmarked op launches, so they are recognised by name and left out; their count is checked.
- peak extra memory: ``torch.cuda.max_memory_allocated`` during one call beyond what was allocated before it
  (inputs, gradients to feed, the flush buffer): outputs, saved activations and workspaces.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

FLUSH_BYTES = 256 << 20
CPU_FLUSH_BYTES = 32 << 20
UNTIMED_KERNEL = "bitwise_not"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(_INT_OF_SIZE[t.element_size()])


class Restore:
    """Restores tensors that an in-place provider overwrites, untimed, before each call.

    Keeps the bitwise complement of each tensor and writes it back with ``bitwise_not``: the same (and only) kernel
    the L2 flush uses, so the kernel-time filter leaves both out.
    """

    def __init__(self, *tensors: torch.Tensor):
        self.pairs = [(t, torch.bitwise_not(_as_int(t))) for t in tensors]

    def __len__(self) -> int:
        return len(self.pairs)

    def __call__(self) -> None:
        with torch.no_grad():
            for t, complement in self.pairs:
                torch.bitwise_not(complement, out=_as_int(t))


@dataclass
class Measurement:
    wall_ms: float | None = None
    wall_ms_min: float | None = None
    wall_ms_max: float | None = None
    reps: int = 0
    kernel_ms: float | None = None
    kernels_per_call: float | None = None
    kernel_note: str = ""
    peak_extra_mib: float | None = None


@dataclass
class Harness:
    """Measures callables on one device with a fixed number of warmup / timed / profiled calls."""

    device: torch.device
    warmup: int = 10
    reps: int = 100
    profile_reps: int = 20
    _flush_buf: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        nbytes = FLUSH_BYTES if self.is_cuda else CPU_FLUSH_BYTES
        self._flush_buf = torch.zeros(nbytes // 8, dtype=torch.int64, device=self.device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def flush(self) -> None:
        """Evicts L2 (CPU: the last-level cache, mostly) by rewriting a buffer larger than it."""
        self._flush_buf.bitwise_not_()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], object], restore: Restore | None = None) -> Measurement:
        untimed = self._untimed(restore)
        times = self.wall_times(fn, untimed)
        m = Measurement(
            wall_ms=statistics.median(times), wall_ms_min=min(times), wall_ms_max=max(times), reps=len(times)
        )
        if self.is_cuda:
            m.kernel_ms, m.kernels_per_call, m.kernel_note = self._kernel_time(fn, untimed, 1 + len(restore or ()))
            m.peak_extra_mib = self._peak_extra_mib(fn, restore)
        return m

    def wall_times(self, fn: Callable[[], object], untimed: Callable[[], None]) -> list[float]:
        """Milliseconds of each of ``reps`` calls, after ``warmup`` calls; ``untimed`` runs before each."""
        for _ in range(self.warmup):
            untimed()
            fn()
        return self._wall_cuda(fn, untimed) if self.is_cuda else self._wall_cpu(fn, untimed)

    def copy_bandwidth_gbps(self, nbytes: int) -> float:
        """Device-to-device copy bandwidth in GB/s (1e9 B/s), counting read + write: 2 * nbytes per
        ``dst.copy_(src)``. Buffers much larger than L2, so no flush."""
        src = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        times = self.wall_times(lambda: dst.copy_(src), lambda: None)
        del src, dst
        return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9

    def _untimed(self, restore: Restore | None) -> Callable[[], None]:
        def untimed():
            if restore is not None:
                restore()
            self.flush()

        return untimed

    def _wall_cuda(self, fn, untimed) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        self.sync()
        for start, end in zip(starts, ends):
            untimed()
            start.record()
            fn()
            end.record()
        self.sync()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def _wall_cpu(self, fn, untimed) -> list[float]:
        times = []
        for _ in range(self.reps):
            untimed()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def _kernel_time(self, fn, untimed, untimed_per_call: int) -> tuple[float | None, float | None, str]:
        from torch.profiler import ProfilerActivity, profile

        n = self.profile_reps
        self.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                untimed()
                fn()
            self.sync()
        return device_time_per_call(prof.events(), n, untimed_per_call)

    def _peak_extra_mib(self, fn, restore: Restore | None) -> float:
        if restore is not None:
            restore()
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        del out
        return (peak - base) / 2**20


def device_time_per_call(events, n_calls: int, untimed_per_call: int) -> tuple[float | None, float | None, str]:
    """(ms, device activities) per call from profiler events: the device events (kernels, memcpy, memset) other
    than the untimed ``bitwise_not`` ones, whose count must be ``n_calls * untimed_per_call``."""
    from torch.autograd import DeviceType

    total_us, kernels, n_untimed = 0.0, 0, 0
    for evt in events:
        if not _is_device_work(evt, DeviceType.CUDA):
            continue
        if UNTIMED_KERNEL in evt.name:
            n_untimed += 1
            continue
        total_us += evt.time_range.elapsed_us()
        kernels += 1
    if n_calls == 0 or n_untimed != n_calls * untimed_per_call:
        return None, None, (
            f"kernel time unavailable: {n_untimed} '{UNTIMED_KERNEL}' kernels in the profile, "
            f"expected {n_calls * untimed_per_call} (L2 flush + restores)"
        )
    return total_us / n_calls / 1e3, kernels / n_calls, ""


def _is_device_work(evt, device_type) -> bool:
    """A kernel, memcpy or memset on the device; not a device-side annotation or synchronisation record."""
    if evt.device_type != device_type:
        return False
    kind = getattr(evt, "activity_type", None)  # newer torch
    if kind:
        return kind in ("kernel", "gpu_memcpy", "gpu_memset")
    if getattr(evt, "is_user_annotation", False):
        return False
    return "Sync" not in evt.name and "Wait Event" not in evt.name


# ----------------------------------------------------------------------------------------------- environment header


def _run(cmd: list[str], cwd: str | Path | None = None) -> str | None:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_short_name(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; no GPU -> 'cpu'."""
    if not name:
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")).lower()


def environment(device: torch.device, repo_root: Path) -> dict:
    """What the numbers depend on: device, driver, versions, swiftlora's build, git commit, date."""
    device = torch.device(device)
    env: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host_cpu": _cpu_name(),
        "argv": sys.argv[1:],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_sm"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                              str(device.index or 0)])
    try:
        import swiftlora

        env["swiftlora"] = {"version": swiftlora.__version__, **swiftlora.build_info()}
    except Exception as exc:  # noqa: BLE001 - the header must be written whatever is broken
        env["swiftlora"] = {"error": f"{type(exc).__name__}: {exc}"}
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo_root)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root)
    env["git_commit"] = commit
    env["git_dirty"] = bool(dirty) if dirty is not None else None
    env["peers"] = {}
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: list[str]) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------------ row writers

COLUMNS = [  # (header, row key, format)
    ("op", "op", "{}"),
    ("case", "case", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("provider", "provider", "{}"),
    ("pass", "pass", "{}"),
    ("wall ms", "wall_ms", "{:.4f}"),
    ("kernel ms", "kernel_ms", "{:.4f}"),
    ("GB/s", "gbps", "{:.0f}"),
    ("% copy BW", "copy_bw_frac", "{:.0%}"),
    ("kernel % copy BW", "kernel_copy_bw_frac", "{:.0%}"),
    ("TFLOP/s", "tflops", "{:.0f}"),
    ("x torch", "speedup_vs_torch", "{:.2f}"),
    ("peak extra MiB", "peak_extra_mib", "{:.1f}"),
    ("rel err", "rel_err", "{:.1e}"),
    ("status", "status", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or v == "":
        return "-" if key != "status" else ""
    return fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row, key, fmt) for _, key, fmt in COLUMNS]
        if row.get("status") == "ok":
            cells[-1] = "ok" + (f" ({row['note']})" if row.get("note") else "")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def markdown_report(header: dict, rows: list[dict], targets: list[dict]) -> str:
    gpu = header.get("gpu") or f"CPU ({header.get('host_cpu')})"
    sl = header.get("swiftlora", {})
    peers = ", ".join(f"{p}: {json.dumps(v)}" for p, v in header.get("peers", {}).items()) or "none"
    cuda = header["device"] == "cuda"
    timer = "CUDA events" if cuda else "time.perf_counter"
    kernel = f"device kernels per call (torch.profiler, {header['profile_reps']} calls)" if cuda else "n/a on CPU"
    out = [
        f"# Kernel benchmark: {gpu}",
        "",
        f"- date {header['date']}, git {header.get('git_commit')}{' (dirty)' if header.get('git_dirty') else ''}",
        f"- torch {header['torch']} (CUDA {header.get('torch_cuda')}), python {header['python']}, "
        f"driver {header.get('driver')}",
        f"- swiftlora {json.dumps(sl)}",
        f"- peers {peers}",
        f"- copy bandwidth {header['copy_bw_gbps']:.0f} GB/s ({header['copy_bw_bytes'] / 2**30:g} GiB "
        "`dst.copy_(src)`, read + write)",
        f"- wall: median of {header['reps']} calls ({timer}, caches flushed before each); kernel: {kernel}; "
        "GB/s = floor bytes / time (see bench/NOTES.md)",
        "",
        markdown_table(rows),
        "",
        "## Targets",
        "",
    ]
    out += [f"- {t['line']}" for t in targets] or ["- none evaluated"]
    return "\n".join(out) + "\n"


def write_results(out_dir: Path, tag: str, header: dict, rows: list[dict], targets: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{tag}.json", out_dir / f"{tag}.md"
    json_path.write_text(json.dumps({"header": header, "rows": rows, "targets": targets}, indent=1) + "\n")
    md_path.write_text(markdown_report(header, rows, targets))
    return json_path, md_path
