"""Kernel benchmark: swiftlora's ops against the plain-PyTorch reference and the peers (liger, unsloth,
bitsandbytes, peft).

    python -m bench.kernels --ops rms_norm,rope,swiglu,geglu [--quick] [--out bench/results] [--tag NAME]
                            [--peers DIR] [--device cuda|cpu] [--providers swiftlora,torch,liger,unsloth,peft]

swiftlora and torch run in this process; each peer runs in its own subprocess (`--provider NAME --json-out FILE`)
with DIR prepended to PYTHONPATH, since unsloth pins other library versions. Rows of every provider are merged
into <out>/<tag>.json and <tag>.md (tag: <gpu>-<date>) and printed, with the foundation issue's targets.
A provider that cannot be imported or fails becomes a row with status "unavailable: <reason>".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from . import harness, ops
from .ops.common import Unavailable, rel_err

REPO_ROOT = Path(__file__).resolve().parent.parent
# An op spec may lack swiftlora_inplace / swiftlora_v1, swiftlora_chunked and swiftlora_a64 (the QLoRA ops' plans
# beside the default: dequantize + one cuBLAS GEMM, 4 pipelined chunks, LoRA columns padded to 64); "gemm" is the
# yardstick of the fused LM-head and QLoRA ops (their matmuls alone).
# swiftlora_overlap: the frozen LM head's vocabulary blocks with each softmax on a side stream (lm_head_blocks.OVERLAP);
# swiftlora_pyloop: the same blocks issued from a Python loop instead of the C++ op (lm_head_blocks.NATIVE off).
LOCAL_PROVIDERS = ("swiftlora", "swiftlora_v1", "swiftlora_chunked", "swiftlora_a64", "swiftlora_inplace",
                   "swiftlora_overlap", "swiftlora_pyloop", "torch", "gemm")
PEER_PROVIDERS = ("liger", "unsloth", "bitsandbytes", "peft")  # peft: PEFT LoRA over bitsandbytes (QLoRA ops)
FOUNDATION_PEERS = ("liger", "unsloth")  # the peers the foundation ops are compared with
PROVIDERS = LOCAL_PROVIDERS + PEER_PROVIDERS
PASSES = ("fwd", "fwd+bwd")
PEER_PACKAGES = {
    "liger": ["liger-kernel", "triton", "torch"],
    "unsloth": ["unsloth", "unsloth_zoo", "triton", "transformers", "peft", "bitsandbytes", "torch"],
    "bitsandbytes": ["bitsandbytes", "torch"],
    "peft": ["peft", "bitsandbytes", "transformers", "torch"],
}
PEER_ENV = {  # unsloth: no network, no telemetry, its compile cache out of the tree
    "UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_OFFLINE": "1", "UNSLOTH_COMPILE_LOCATION": "/tmp/uc",
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(ops.OPS), help="comma-separated: " + ",".join(ops.OPS))
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ",".join(PROVIDERS))
    p.add_argument("--quick", action="store_true", help="small shapes and few reps (seconds on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when a GPU is visible")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"), help="directory for <tag>.json/.md")
    p.add_argument("--tag", default=None, help="result file name; default <gpu-short-name>-<date>[-quick]")
    p.add_argument("--peers", default=None, help="directory prepended to PYTHONPATH of the peer subprocesses")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (median reported)")
    p.add_argument("--profile-reps", type=int, default=None, help="profiled calls for the kernel time")
    p.add_argument("--peer-timeout", type=float, default=300.0, help="seconds per peer subprocess")
    p.add_argument("--provider", default=None, help=argparse.SUPPRESS)  # child mode: one provider
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ops = _split(args.ops, ops.OPS, "op")
    args.providers = _split(args.providers, PROVIDERS, "provider")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    quick_defaults = (2, 5, 3) if args.quick else (10, 100, 20)
    for name, default in zip(("warmup", "reps", "profile_reps"), quick_defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def _split(value: str, known: tuple, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return items


# ------------------------------------------------------------------------------------------- one provider's rows


def _base_row(spec, case, provider: str, pass_: str) -> dict:
    return {
        "op": spec.OP, "case": case.name, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
        "provider": provider, "pass": pass_,
        "floor_bytes": case.bytes_fwd if pass_ == "fwd" else case.bytes_fwd_bwd,
        "floor_flops": case.flops_fwd if pass_ == "fwd" else case.flops_fwd_bwd,
        "status": "ok", "note": "",
    }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, Unavailable) else f"{type(exc).__name__}: {msg}"[:300]


def run_provider(provider: str, op_names: list[str], quick: bool, h: harness.Harness) -> list[dict]:
    """Every (op, case, pass) row of one provider, measured in this process."""
    rows = []
    for op in op_names:
        spec = ops.load(op)
        if provider not in spec.PROVIDERS:  # e.g. swiftlora_inplace for an op without an in-place mode
            continue
        for case in spec.cases(quick):
            rows += _run_case(spec, case, provider, h)
    return rows


def _run_case(spec, case, provider: str, h: harness.Harness) -> list[dict]:
    rows = [_base_row(spec, case, provider, p) for p in PASSES]
    label = f"{spec.OP}{'[' + case.name + ']' if case.name else ''} {case.shape} {provider}"
    try:
        inp = spec.make_inputs(case, h.device)
        bench = spec.PROVIDERS[provider](case, inp)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run is a row, never a crash
        _unavailable(rows, exc, label)
        return rows
    rows[0]["rel_err"], check_note = _check(spec, case, inp, bench)
    note = "; ".join(bench.notes + ([check_note] if check_note else []))
    for row, fn in zip(rows, (bench.fwd, bench.fwd_bwd)):
        row["note"] = note
        if fn is None:  # an inference op (e.g. nf4_dequantize): no backward to time
            row["status"] = "n/a: no backward pass"
            continue
        try:
            m = h.measure(fn, bench.restore)
        except Exception as exc:  # noqa: BLE001
            _unavailable([row], exc, f"{label} {row['pass']}")
            continue
        row.update({k: v for k, v in vars(m).items() if k != "kernel_note"})
        if m.kernel_note:
            row["note"] = "; ".join(filter(None, [note, m.kernel_note]))
        kernel = f", kernel {m.kernel_ms:.4f} ms" if m.kernel_ms is not None else ""
        print(f"   {label} {row['pass']}: {m.wall_ms:.4f} ms{kernel}", flush=True)
    del inp, bench
    if h.is_cuda:
        torch.cuda.empty_cache()
    return rows


def _unavailable(rows: list[dict], exc: BaseException, label: str) -> None:
    status = f"unavailable: {_reason(exc)}"
    for row in rows:
        row["status"] = status
    print(f"   {label}: {status}", flush=True)
    if not isinstance(exc, Unavailable):
        traceback.print_exception(exc)


def _check(spec, case, inp, bench) -> tuple[float | None, str]:
    """Relative error of the provider's forward against swiftlora's reference, on the pristine inputs (before any
    timed call rotates or overwrites them), and a note when it could not be computed."""
    try:
        ref = spec.reference(case, inp)
    except Exception as exc:  # noqa: BLE001
        return None, f"no error check: {_reason(exc)}"
    try:
        return rel_err(bench.output(), ref), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"error check failed: {_reason(exc)}"
    finally:
        if bench.restore is not None:
            bench.restore()


# ------------------------------------------------------------------------------------------------ peer subprocess


def run_peer(provider: str, args: argparse.Namespace, work_dir: Path) -> tuple[list[dict], dict]:
    """Runs one peer in a subprocess; its rows, or 'unavailable' rows when the subprocess itself fails."""
    work_dir.mkdir(parents=True, exist_ok=True)
    json_out, log = work_dir / f"{provider}.json", work_dir / f"{provider}.log"
    json_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.kernels", "--provider", provider, "--json-out", str(json_out),
           "--ops", ",".join(args.ops), "--device", args.device, "--warmup", str(args.warmup),
           "--reps", str(args.reps), "--profile-reps", str(args.profile_reps)] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    for k, v in PEER_ENV.items():
        env.setdefault(k, v)
    path = [str(Path(args.peers).resolve())] if args.peers else []
    path += [str(REPO_ROOT)] + [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))  # in order, without repeats
    print(f"== {provider}: subprocess (PYTHONPATH={env['PYTHONPATH']}), log {log}", flush=True)
    reason = None
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.peer_timeout).returncode
        if rc != 0:
            reason = f"subprocess exited with {rc}"
    except subprocess.TimeoutExpired:
        reason = f"subprocess timed out after {args.peer_timeout:.0f} s"
    if reason is None and json_out.exists():
        data = json.loads(json_out.read_text())
        return data["rows"], data["versions"]
    tail = log.read_text(errors="replace").strip().splitlines()[-15:] if log.exists() else []
    print("\n".join(f"   {line}" for line in tail), flush=True)
    reason = reason or "subprocess wrote no results"
    last = tail[-1].strip() if tail else ""
    rows = []
    for op in args.ops:
        spec = ops.load(op)
        for case in spec.cases(args.quick):
            for p in PASSES:
                row = _base_row(spec, case, provider, p)
                row["status"] = f"unavailable: {reason} (log {log.name}): {last}"[:400]
                rows.append(row)
    return rows, {}


# ------------------------------------------------------------------------------------------ derived columns, targets


def derive(rows: list[dict], copy_bw_gbps: float) -> None:
    """GB/s from the floor bytes, fraction of the copy bandwidth, speedup against the torch reference."""
    torch_wall = {
        (r["op"], r["case"], r["pass"]): r.get("wall_ms") for r in rows if r["provider"] == "torch"
    }
    for r in rows:
        r["floor_ms_at_copy_bw"] = r["floor_bytes"] / (copy_bw_gbps * 1e9) * 1e3
        for prefix, t in (("", r.get("wall_ms")), ("kernel_", r.get("kernel_ms"))):
            gbps = r["floor_bytes"] / (t * 1e-3) / 1e9 if t else None
            r[f"{prefix}gbps"] = gbps
            r[f"{prefix}copy_bw_frac"] = gbps / copy_bw_gbps if gbps else None
        wall = r.get("wall_ms")
        r["tflops"] = r["floor_flops"] / (wall * 1e-3) / 1e12 if r.get("floor_flops") and wall else None
        ref = torch_wall.get((r["op"], r["case"], r["pass"]))
        r["speedup_vs_torch"] = ref / r["wall_ms"] if ref and r.get("wall_ms") else None


def _sort_key(r: dict):
    return (ops.OPS.index(r["op"]), r["case"], PASSES.index(r["pass"]), PROVIDERS.index(r["provider"]))


TARGET_SHAPES = {op: ops.load(op).cases(False)[0].shape for op in ops.OPS}
NOISE = 1.02  # "not slower than a peer": within 2% of its median
FOUNDATION_OPS = ("rms_norm", "rope", "swiglu", "geglu")  # the ">= 5x torch, not slower than each peer" targets


def targets(rows: list[dict], device: str, op_names: list[str]) -> list[dict]:
    """The issues' targets for the ops run (foundation, then cross-entropy), on swiftlora's fwd+bwd rows at the
    target shapes on a GPU."""
    get = {(r["op"], r["case"], r["pass"], r["provider"]): r for r in rows}
    out = []

    def add(name: str, ok: bool | None, detail: str):
        if name.split("[")[0].split(" ")[0] not in op_names:
            return
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ok]
        out.append({"target": name, "passed": ok, "detail": detail, "line": f"{verdict:4}  {name}: {detail}"})

    def ours(op, case="", provider="swiftlora"):
        r = get.get((op, case, "fwd+bwd", provider))
        if r is None:
            return None, "not run"
        if device != "cuda" or r["shape"] != TARGET_SHAPES[op]:
            return None, "needs the target shape on a GPU (not --quick / cpu)"
        if r["status"] != "ok":
            return None, r["status"]
        return r, ""

    def ms(v):
        return "-" if v is None else f"{v:.4f} ms"

    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    r, why = ours("rms_norm")
    add("rms_norm fwd+bwd wall <= 0.30 ms", r and r["wall_ms"] <= 0.30, why or ms(r["wall_ms"]))
    add("rms_norm fwd+bwd kernel >= 90% copy BW",
        r and (r["kernel_copy_bw_frac"] >= 0.90 if r["kernel_copy_bw_frac"] is not None else None),
        why or f"kernel {pct(r['kernel_copy_bw_frac'])} ({ms(r['kernel_ms'])})")
    r, why = ours("rope")
    add("rope fwd+bwd wall <= 0.15 ms", r and r["wall_ms"] <= 0.15, why or ms(r["wall_ms"]))
    r, why = ours("swiglu")
    add("swiglu fwd+bwd >= 85% copy BW (wall)", r and r["copy_bw_frac"] >= 0.85,
        why or f"wall {pct(r['copy_bw_frac'])} ({ms(r['wall_ms'])}), kernel {pct(r['kernel_copy_bw_frac'])}")
    for op in FOUNDATION_OPS:
        for case in ops.load(op).cases(False):
            label = op + (f"[{case.name}]" if case.name else "")
            r, why = ours(op, case.name)
            sp = r and r.get("speedup_vs_torch")
            add(f"{label} fwd+bwd >= 5x torch reference", None if r is None or sp is None else sp >= 5,
                why or (f"{sp:.2f}x" if sp else "torch reference not measured"))
            for peer in FOUNDATION_PEERS:
                p = get.get((op, case.name, "fwd+bwd", peer))
                if r is None or p is None or p["status"] != "ok":
                    detail = why or (p["status"] if p else "not run")
                    add(f"{label} fwd+bwd not slower than {peer}", None, detail)
                    continue
                ratio = r["wall_ms"] / p["wall_ms"]
                add(f"{label} fwd+bwd not slower than {peer}", ratio <= NOISE,
                    f"{ms(r['wall_ms'])} vs {ms(p['wall_ms'])} ({ratio:.2f}x its time; pass <= {NOISE})")
    cross_entropy_targets(get, ours, add)
    nf4_targets(get, device, add)
    qlora_targets(get, add, device)
    return out


def cross_entropy_targets(get, ours, add) -> None:
    """Issue 3: cross_entropy (in place: the gradient in the logits' buffer) <= 1.6 ms and <= 64 MiB extra; the fused
    LM-head ops within 1.15x / 1.2x of their GEMMs measured in the same run ("gemm" provider) and <= 128 / 256 MiB
    extra; each faster than the best of liger and unsloth (our fastest variant)."""

    def ms(v):
        return "-" if v is None else f"{v:.4f} ms"

    r, why = ours("cross_entropy", provider="swiftlora_inplace")
    add("cross_entropy fwd+bwd wall <= 1.6 ms (in place)", r and r["wall_ms"] <= 1.6, why or ms(r["wall_ms"]))
    mib = r and r.get("peak_extra_mib")
    add("cross_entropy fwd+bwd peak extra <= 64 MiB (in place)", None if mib is None else mib <= 64,
        why or ("-" if mib is None else f"{mib:.1f} MiB"))
    for op, ratio, limit in (("fused_linear_cross_entropy", 1.15, 128), ("token_logprobs", 1.2, 256)):
        r, why = ours(op)
        g = get.get((op, "", "fwd+bwd", "gemm"))
        if r is None or g is None or g["status"] != "ok":
            add(f"{op} fwd+bwd <= {ratio}x its GEMMs", None, why or (g["status"] if g else "gemm not run"))
        else:
            x = r["wall_ms"] / g["wall_ms"]
            add(f"{op} fwd+bwd <= {ratio}x its GEMMs", x <= ratio,
                f"{ms(r['wall_ms'])} vs GEMMs {ms(g['wall_ms'])} ({x:.3f}x)")
        mib = r and r.get("peak_extra_mib")
        add(f"{op} fwd+bwd peak extra <= {limit} MiB", None if mib is None else mib <= limit,
            why or ("-" if mib is None else f"{mib:.1f} MiB"))
    for op in ("cross_entropy", "fused_linear_cross_entropy", "token_logprobs"):
        mine = [m for m in (ours(op, provider=p)[0] for p in ("swiftlora", "swiftlora_inplace")) if m]
        peers = [p for p in (get.get((op, "", "fwd+bwd", q)) for q in ("liger", "unsloth")) if p and p["status"] == "ok"]
        if not mine or not peers:
            add(f"{op} fwd+bwd faster than the best peer", None,
                "needs our row at the target shape on a GPU" if not mine else "no peer measured")
            continue
        best, peer = min(m["wall_ms"] for m in mine), min(peers, key=lambda p: p["wall_ms"])
        add(f"{op} fwd+bwd faster than the best peer", best < peer["wall_ms"],
            f"{ms(best)} vs {peer['provider']} {ms(peer['wall_ms'])}")


def _target_row(get, device: str, op: str, pass_: str = "fwd", provider: str = "swiftlora"):
    """(row, "") of an op's row at its target shape on a GPU, else (None, why not)."""
    r = get.get((op, "", pass_, provider))
    if r is None:
        return None, "not run"
    if device != "cuda" or r["shape"] != TARGET_SHAPES[op]:
        return None, "needs the target shape on a GPU (not --quick / cpu)"
    return (r, "") if r["status"] == "ok" else (None, r["status"])


def nf4_targets(get, device: str, add) -> None:
    """Issue 4: nf4_dequantize of W[14336, 4096] (double quant) <= 0.052 ms (>= 95% of the copy floor, 0.049 ms);
    nf4_gemv at M = 1 >= 80% of the bandwidth floor of reading the packed weight and faster than bitsandbytes'
    4-bit inference matmul in the same run. Wall times of the fwd rows (these ops have no backward)."""

    def row(op, provider="swiftlora"):
        return _target_row(get, device, op, "fwd", provider)

    r, why = row("nf4_dequantize")
    add("nf4_dequantize W[14336,4096] wall <= 0.052 ms", r and r["wall_ms"] <= 0.052,
        why or f"{r['wall_ms']:.4f} ms ({r['copy_bw_frac']:.0%} of copy BW; kernel {r.get('kernel_ms') or 0:.4f} ms)")
    r, why = row("nf4_gemv")
    add("nf4_gemv M=1 wall >= 80% of the bandwidth floor", r and r["copy_bw_frac"] >= 0.80,
        why or f"{r['copy_bw_frac']:.0%} ({r['wall_ms'] * 1e3:.1f} us; floor {r['floor_ms_at_copy_bw'] * 1e3:.1f} us)")
    b = get.get(("nf4_gemv", "", "fwd", "bitsandbytes"))
    if r is None or b is None or b["status"] != "ok":
        add("nf4_gemv M=1 faster than bitsandbytes matmul_4bit", None, why or (b["status"] if b else "not run"))
    else:
        add("nf4_gemv M=1 faster than bitsandbytes matmul_4bit", r["wall_ms"] < b["wall_ms"],
            f"{r['wall_ms'] * 1e3:.1f} us vs {b['wall_ms'] * 1e3:.1f} us")


def qlora_targets(get, add, device: str) -> None:
    """Issue 4: qlora_linear's forward (the fastest of its plans and version 2) <= 1.10x the bf16 cuBLAS GEMM on the
    pre-dequantized weight ("gemm" provider, same run); the LoRA MLP block fwd+bwd (its fastest plan) <= 4.3 ms,
    and faster than PEFT + bitsandbytes and Unsloth."""

    def row(op, pass_, provider):
        return _target_row(get, device, op, pass_, provider)

    def best(op, pass_, providers):
        found = [r for r in (row(op, pass_, p)[0] for p in providers) if r]
        return (min(found, key=lambda r: r["wall_ms"]), "") if found else row(op, pass_, "swiftlora")

    plans = ("swiftlora", "swiftlora_v1", "swiftlora_chunked", "swiftlora_a64")
    mine, why = best("qlora_linear", "fwd", plans)
    g, gwhy = row("qlora_linear", "fwd", "gemm")
    ok = None if mine is None or g is None else mine["wall_ms"] / g["wall_ms"] <= 1.10
    add("qlora_linear fwd <= 1.10x bf16 GEMM (same run)", ok,
        why or gwhy or f"{mine['provider']} {mine['wall_ms']:.4f} ms vs GEMM {g['wall_ms']:.4f} ms "
                       f"({mine['wall_ms'] / g['wall_ms']:.3f}x)")
    mine, why = best("lora_mlp", "fwd+bwd", plans)
    add("lora_mlp fwd+bwd wall <= 4.3 ms", None if mine is None else mine["wall_ms"] <= 4.3,
        why or f"{mine['provider']} {mine['wall_ms']:.4f} ms")
    for peer in ("unsloth", "peft"):
        p, pwhy = row("lora_mlp", "fwd+bwd", peer)
        ok = None if mine is None or p is None else mine["wall_ms"] < p["wall_ms"]
        add(f"lora_mlp fwd+bwd faster than {peer}", ok, why or pwhy or f"{mine['wall_ms']:.4f} ms vs {p['wall_ms']:.4f} ms")


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    h = harness.Harness(torch.device(args.device), args.warmup, args.reps, args.profile_reps)
    if args.provider:  # child: one provider, rows to --json-out
        rows = run_provider(args.provider, args.ops, args.quick, h)
        versions = harness.package_versions(PEER_PACKAGES.get(args.provider, ["torch"]))
        Path(args.json_out).write_text(json.dumps({"rows": rows, "versions": versions}))
        return 0

    copy_bytes = (64 << 20) if (args.quick or args.device == "cpu") else (1 << 30)
    copy_bw = h.copy_bandwidth_gbps(copy_bytes)
    header = harness.environment(h.device, REPO_ROOT)
    header.update(copy_bw_gbps=copy_bw, copy_bw_bytes=copy_bytes, quick=args.quick, warmup=args.warmup,
                  reps=args.reps, profile_reps=args.profile_reps, peers_dir=args.peers)
    date = _dt.datetime.now().strftime("%Y%m%d")
    tag = args.tag or f"{harness.gpu_short_name(header.get('gpu'))}-{date}{'-quick' if args.quick else ''}"
    out_dir = Path(args.out)
    print(f"== {header.get('gpu') or 'cpu'}: copy bandwidth {copy_bw:.0f} GB/s", flush=True)

    rows = []
    for provider in args.providers:
        if provider in LOCAL_PROVIDERS:
            print(f"== {provider}", flush=True)
            rows += run_provider(provider, args.ops, args.quick, h)
        else:
            if h.is_cuda:
                torch.cuda.empty_cache()
            peer_rows, versions = run_peer(provider, args, out_dir / "tmp" / tag)
            rows += peer_rows
            header["peers"][provider] = versions
    rows.sort(key=_sort_key)
    derive(rows, copy_bw)
    checks = targets(rows, args.device, args.ops)
    json_path, md_path = harness.write_results(out_dir, tag, header, rows, checks)
    print(harness.markdown_table(rows))
    print("\n== targets (foundation, cross-entropy, NF4 and QLoRA issues)")
    for t in checks:
        print(t["line"])
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
