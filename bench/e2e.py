"""End-to-end QLoRA training step: swiftlora vs HF + PEFT + bitsandbytes vs Unsloth vs Liger-Kernel.

    python -m bench.e2e [--shapes 1b,8b] [--providers swiftlora,hf,unsloth,liger] [--peers DIR]
                        [--steps 10 --warmup 3] [--batch 2 --seq 2048] [--tag NAME] [--quick]

Model: a random-init Llama checkpoint with Llama-3.2-1B or Llama-3.1-8B shapes (bf16 safetensors, written once
under ``--ckpt-dir``), loaded by each library's own user API in 4-bit NF4 (double quantization, bf16 compute):
LoRA r=16, alpha=16, dropout 0 on all seven projections, gradient checkpointing as each library recommends
(swiftlora and Unsloth: "unsloth" offloading; HF/Liger: transformers' non-reentrant checkpointing), AdamW
(torch, lr 2e-4) on the LoRA weights, batch ``--batch`` x ``--seq`` random tokens (labels = inputs).

Measured per provider, each in its own subprocess (peers with ``--peers`` first on PYTHONPATH, so their imports
and patches never meet swiftlora's): median step time (forward + backward + optimizer step, CUDA-synchronised,
after ``--warmup`` steps), tokens/s, peak GPU memory (``max_memory_allocated`` over the timed steps, weights
included), and the losses (same data and seed: a sanity check, not a parity test).
Results: ``bench/results/e2e-<gpu>-<date>.json`` and ``.md``. ``--quick``: a tiny shape on whatever device exists
(a smoke test of the harness; CPU works).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import harness

REPO_ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("swiftlora", "hf", "unsloth", "liger")
PEER_PROVIDERS = ("unsloth", "liger")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
               rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
               rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=4096,
                 rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
}
PEER_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_OFFLINE": "1", "UNSLOTH_COMPILE_LOCATION": "/tmp/uc",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ the checkpoint


def _tokenizer(vocab_size: int):
    """A small word-level tokenizer (the step feeds token ids directly; the libraries only want one to exist)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(252)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=vocab_size)


def make_checkpoint(shape: str, root: Path, device: torch.device) -> Path:
    """A random-init bf16 Llama checkpoint of ``shape`` under ``root`` (reused when already there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{shape}-random"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")
    _tokenizer(config.vocab_size).save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ the providers


def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _hf_peft(path: Path, device, liger: bool):
    import peft
    from transformers import AutoModelForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=_bnb_config(),
                                                 device_map={"": device}, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(3407)
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=list(TARGETS),
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _swiftlora(path: Path, device, seq: int):
    from swiftlora import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, device_map={"": device})
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=list(TARGETS), use_gradient_checkpointing="unsloth")


def _unsloth(path: Path, seq: int):
    from unsloth import FastLanguageModel  # first: it patches transformers at import

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=list(TARGETS), use_gradient_checkpointing="unsloth")


def build(provider: str, path: Path, device, seq: int):
    if provider == "swiftlora":
        return _swiftlora(path, device, seq)
    if provider == "unsloth":
        return _unsloth(path, seq)
    return _hf_peft(path, device, liger=provider == "liger")


# ------------------------------------------------------------------------------------------------ the measurement


def measure(provider: str, shape: str, args) -> dict:
    """One provider on one shape, in this process."""
    if provider == "unsloth":
        import unsloth  # noqa: F401  (before transformers)
    device = torch.device(args.device)
    path = make_checkpoint(shape, Path(args.ckpt_dir), device)
    model = build(provider, path, device, args.seq)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    batches = [torch.randint(4, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(4)]
    cuda = device.type == "cuda"
    times, losses = timed_steps(model, opt, batches, args.warmup, args.steps, cuda)
    median = statistics.median(times)
    return {"provider": provider, "shape": shape, "batch": args.batch, "seq": args.seq, "status": "ok",
            "step_ms": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
            "tokens_per_s": args.batch * args.seq / median,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "trainable_params": sum(p.numel() for p in params), "losses": losses}


def timed_steps(model, opt, batches, warmup: int, steps: int, cuda: bool, before=None, slowest=None):
    """``warmup + steps`` training steps (forward, backward, optimizer); returns the timed steps' seconds and every
    step's loss. ``before()`` runs ahead of each step's clock (e.g. a barrier), ``slowest(seconds)`` turns a rank's
    time into the step's (e.g. the max over ranks). Peak memory counts from the first timed step."""
    times, losses = [], []
    for step in range(warmup + steps):
        if step == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ids = batches[step % len(batches)]
        if before is not None:
            before()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if step >= warmup:
            times.append(slowest(elapsed) if slowest is not None else elapsed)
    return times, losses


def run_subprocess(provider: str, shape: str, args, work: Path) -> dict:
    """``measure`` in a fresh interpreter (peers: their folder first on PYTHONPATH)."""
    out, log = work / f"{provider}-{shape}.json", work / f"{provider}-{shape}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.e2e", "--worker", provider, "--shapes", shape, "--json-out", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq",
           str(args.seq), "--device", args.device, "--ckpt-dir", args.ckpt_dir]
    env = {**os.environ, **{k: v for k, v in PEER_ENV.items() if k not in os.environ}}
    path = [str(Path(args.peers).resolve())] if args.peers and provider in PEER_PROVIDERS else []
    path += [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    print(f"== {provider} {shape}: log {log}", flush=True)
    row, why = run_worker(cmd, env, out, log, args.timeout)
    return row or {"provider": provider, "shape": shape, "batch": args.batch, "seq": args.seq,
                   "status": f"unavailable: {why}"[:300]}


def run_worker(cmd: list[str], env: dict, out: Path, log: Path, timeout: float) -> tuple[dict | None, str]:
    """Runs a worker command (output to ``log``) that writes its JSON row to ``out``: (row, "") or (None, why)."""
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        reason = None if rc == 0 else f"exited with {rc}"
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout:.0f} s"
    if reason is None and out.exists():
        return json.loads(out.read_text()), ""
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    return None, f"{reason or 'no result'}: {tail[0] if tail else ''}"


# ------------------------------------------------------------------------------------------------ report


def report(header: dict, rows: list[dict]) -> str:
    lines = [f"# End-to-end QLoRA step: {header.get('gpu') or 'CPU'}", "",
             f"- date {header['date']}, git {header.get('git_commit')}, torch {header['torch']}",
             f"- versions {json.dumps(header.get('packages', {}))}",
             "- Llama random init, NF4 + double quant, bf16 compute, LoRA r=16 alpha=16 on 7 projections, AdamW; "
             f"median of {header['steps']} steps after {header['warmup']} warmup", "",
             "| shape | provider | step ms | tokens/s | peak GiB | x HF | first loss | status |",
             "|---|---|---|---|---|---|---|---|"]
    hf = {r["shape"]: r for r in rows if r["provider"] == "hf" and r["status"] == "ok"}
    for r in rows:
        ok = r["status"] == "ok"
        speed = f"{hf[r['shape']]['step_ms'] / r['step_ms']:.2f}" if ok and r["shape"] in hf else "-"
        peak = f"{r['peak_gib']:.2f}" if ok and r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['shape']} | {r['provider']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} | "
                     f"{speed} | {r['losses'][0]:.3f} | ok |" if ok else
                     f"| {r['shape']} | {r['provider']} | - | - | - | - | - | {r['status']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--peers", help="folder with unsloth / liger_kernel, put first on the peers' PYTHONPATH")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ckpt-dir", default="/tmp/swiftlora-e2e")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--tag")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per provider subprocess")
    p.add_argument("--quick", action="store_true", help="tiny shape, 2 steps, seq 128: a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.steps, args.warmup, args.seq = "tiny", 2, 1, 128
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        row = measure(args.worker, args.shapes, args)
        Path(args.json_out).write_text(json.dumps(row))
        return 0
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS)) + sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown providers/shapes {unknown}; providers {PROVIDERS}, shapes {sorted(SHAPES)}")
    header = harness.environment(torch.device(args.device), REPO_ROOT)
    header["packages"] = harness.package_versions(["transformers", "peft", "trl", "bitsandbytes", "accelerate"])
    header.update(steps=args.steps, warmup=args.warmup)
    work = Path(args.out) / "tmp" / "e2e"
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_subprocess(p, s, args, work) for s in args.shapes.split(",") for p in providers]
    print(report(header, rows))
    tag = args.tag or f"e2e-{harness.gpu_short_name(header.get('gpu'))}-{_dt.date.today():%Y%m%d}"
    if not args.quick:
        out = Path(args.out)
        (out / f"{tag}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        (out / f"{tag}.md").write_text(report(header, rows))
        print(f"wrote {out / tag}.json and .md")
    return 0 if all(r["status"] == "ok" for r in rows if r["provider"] in ("swiftlora", "hf")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
