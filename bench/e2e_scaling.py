"""Data-parallel scaling of swiftlora's QLoRA step: tokens/s on 1, 2, ... N GPUs (DDP over NCCL, torchrun).

    python -m bench.e2e_scaling [--shape 8b] [--gpus 1,2] [--steps 10 --warmup 3] [--batch 2 --seq 2048]
                                [--tag NAME] [--out bench/results]

The model and step are bench/e2e.py's (random-init Llama shape in NF4, LoRA r=16 on the seven projections,
"unsloth" checkpointing, AdamW), with ``--batch`` x ``--seq`` tokens per GPU (weak scaling: the global batch grows
with the GPU count, as data-parallel fine-tuning is used). Each GPU count runs in its own ``torchrun`` process
group; the model is wrapped in ``DistributedDataParallel`` exactly as accelerate does for the Trainer (NCCL,
gradients averaged in buckets, overlapped with the backward). A step's time is the slowest rank's. Reported:
median step time, global tokens/s, scaling efficiency = tokens/s(N) / (N x tokens/s(1)), peak memory per GPU.
``--shape tiny --gpus 1,2`` with ``CUDA_VISIBLE_DEVICES=`` runs the harness on CPU (gloo) as a smoke test.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from . import e2e, harness

REPO_ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One rank of one GPU count (started by torchrun)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(args.ckpt_dir) / f"llama-{args.shape}-random"
    model = e2e.build("swiftlora", path, device, args.seq)
    model.train()
    ddp = DistributedDataParallel(model, device_ids=[local] if cuda else None, find_unused_parameters=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(1 + rank)  # each rank its own data
    vocab = e2e.SHAPES[args.shape]["vocab_size"]
    batches = [torch.randint(4, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    def slowest(seconds: float) -> float:  # the step ends when the slowest rank ends
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    times, losses = e2e.timed_steps(ddp, opt, batches, args.warmup, args.steps, cuda, before=dist.barrier,
                                    slowest=slowest)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        median = statistics.median(times)
        row = {"gpus": world, "shape": args.shape, "batch_per_gpu": args.batch, "seq": args.seq, "status": "ok",
               "step_ms": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
               "tokens_per_s": world * args.batch * args.seq / median, "peak_gib_per_gpu": float(peak),
               "losses_rank0": losses}
        Path(args.json_out).write_text(json.dumps(row))
    dist.destroy_process_group()


def run_count(n: int, args, work: Path) -> dict:
    out, log = work / f"scaling-{args.shape}-{n}.json", work / f"scaling-{args.shape}-{n}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "bench.e2e_scaling", "--worker", "--shape", args.shape, "--json-out", str(out), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
           "--ckpt-dir", args.ckpt_dir]
    # the repository root for bench.*; swiftlora as this interpreter imports it (installed, or on PYTHONPATH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    print(f"== {n} GPU(s): log {log}", flush=True)
    row, why = e2e.run_worker(cmd, env, out, log, args.timeout)
    return row or {"gpus": n, "shape": args.shape, "status": f"failed: {why}"}


def report(header: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r.get("gpus") == 1 and r["status"] == "ok"), None)
    lines = [f"# Data-parallel scaling, {header['shape']} QLoRA step ({header['gpu']}, {header['date']})", "",
             f"torch {header['torch']}, CUDA {header['cuda']}, swiftlora {header['swiftlora']}; batch "
             f"{header['batch']} x {header['seq']} tokens per GPU, DDP over NCCL, median of {header['steps']} steps.",
             "", "| GPUs | step ms | tokens/s | scaling efficiency | peak GiB/GPU |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['gpus']} | {r['status']} | | | |")
            continue
        eff = r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]) if base else None
        r["scaling_efficiency"] = eff
        lines.append(f"| {r['gpus']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{'' if eff is None else f'{eff:.1%}'} | {r['peak_gib_per_gpu']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b", choices=sorted(e2e.SHAPES))
    p.add_argument("--gpus", default="1,2", help="comma-separated GPU counts")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ckpt-dir", default="/tmp/swiftlora-e2e-ckpt")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    counts = [int(c) for c in args.gpus.split(",")]
    cuda = torch.cuda.is_available()
    if cuda and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    e2e.make_checkpoint(args.shape, Path(args.ckpt_dir), torch.device("cuda" if cuda else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"scaling-{args.shape}-{_dt.date.today():%Y%m%d}"
    work = out / f".{tag}-work"
    work.mkdir(exist_ok=True)
    rows = [run_count(n, args, work) for n in counts]
    env = harness.environment(torch.device("cuda" if cuda else "cpu"), REPO_ROOT)
    env["gpu_count"] = torch.cuda.device_count() if cuda else 0
    build = env.get("swiftlora", {})
    header = {"shape": args.shape, "gpu": f"{env['gpu_count']} x {env['gpu']}" if cuda else "cpu",
              "date": f"{_dt.date.today()}", "torch": torch.__version__, "cuda": torch.version.cuda,
              "swiftlora": build.get("version", build.get("error")), "batch": args.batch, "seq": args.seq,
              "steps": args.steps}
    table = report(header, rows)
    (out / f"{tag}.md").write_text(table)
    (out / f"{tag}.json").write_text(json.dumps({"header": {**header, **env}, "rows": rows}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
