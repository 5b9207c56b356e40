"""End-to-end GGUF export benchmark: an 8B-shaped Llama (Llama-3-8B config, random bf16 weights) with a LoRA
adapter on every projection, exported to Q4_K_M by ``save_pretrained_gguf`` (merge in float32, Q/K permutation,
quantization on the GPU, writing the file) — target on the H100: <= 60 s for the whole call.

    python -m bench.gguf_export                  # CUDA, 8B shape, q4_k_m, into a temporary directory
    python -m bench.gguf_export --quick --device cpu

Rows: the call's wall time, the file size and the write rate, the model build time (not counted), and the GPU
memory peak. Results go to bench/results/gguf_export-<gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from . import harness

REPO = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
QUICK = dict(LLAMA3_8B, vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)


def build_model(shape: dict, device: torch.device, lora_r: int):
    """Random bf16 LlamaForCausalLM of ``shape`` on ``device``, wrapped in a PEFT LoRA (non-zero B)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(default)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    return model


def bench_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer; the export pads its vocabulary to the embedding's rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(1000, vocab_size), special_tokens=["<|eot|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small Llama instead of the 8B shape")
    p.add_argument("--method", default="q4_k_m")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--dir", default=None, help="output directory (default: a temporary one, deleted)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    from swiftlora.export.gguf import save_pretrained_gguf

    device = torch.device(args.device)
    shape = QUICK if args.quick else LLAMA3_8B
    t0 = time.perf_counter()
    model = build_model(shape, device, args.lora_r)
    tok = bench_tokenizer(shape["vocab_size"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        (path,) = save_pretrained_gguf(model, tmp, tok, args.method, progress=True)
        export_s = time.perf_counter() - t0
        size = path.stat().st_size
    row = {"bench": "gguf_export", "method": args.method, "shape": "llama3-8b" if not args.quick else "quick",
           "params": sum(p.numel() for p in model.parameters()), "lora_r": args.lora_r, "device": str(device),
           "build_s": build_s, "export_s": export_s, "file_bytes": size, "write_mb_s": size / export_s / 1e6,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "target_s": 60.0}
    print(json.dumps(row, indent=1))
    env = harness.environment(device, REPO)
    tag = harness.gpu_short_name(env.get("gpu")) if device.type == "cuda" else "cpu"
    out = Path(args.out) / f"gguf_export-{tag}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": env, "rows": [row]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
