"""``swiftlora train``: the main job's command line (see :mod:`swiftlora.train.main_job`)."""
from __future__ import annotations

import argparse

from ..distributed import shutdown
from .main_job import DEFAULT_PROMPT, JobConfig, run

DEFAULTS = JobConfig()


def _bool_or_unsloth(text: str):
    lowered = text.lower()
    if lowered in ("unsloth", "offload"):
        return "unsloth"
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected unsloth, true or false, got {text!r}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a model with LoRA on a chat data set (no arguments: the embedded default job)",
        description="Load a model (4-bit by default), add LoRA, train with TRL's SFTTrainer, and save adapters and "
                    "a merged model. Without --model/--dataset: SmolLM2-135M-Instruct on chatterbot-corpus.")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hub id, checkpoint directory, LoRA adapter directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-seq-length", type=int, default=DEFAULTS.max_seq_length)
    g.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="load 16-bit weights (no NF4)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 where supported")
    g.add_argument("--cache-dir", default=DEFAULTS.cache_dir, help="where the default GGUF is converted once")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="a .jsonl/.json file or a Hugging Face data set (default: chatterbot-corpus)")
    g.add_argument("--format", dest="data_format", default="auto",
                   choices=["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"])
    g.add_argument("--max-rows", type=int, help="use only the first N rows")
    g.add_argument("--template", help="chat template (chatml, llama-3, qwen-2.5, gemma, mistral, phi-3, zephyr, "
                                      "alpaca, vicuna ...; default: the model's own)")
    g.add_argument("--all-tokens", dest="responses_only", action="store_false",
                   help="learn from every token, not only the assistant's answers")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", "--r", dest="r", type=int, default=DEFAULTS.r,
                   help="LoRA rank (spell it --lora-r after torchrun, whose parser takes --r for its own options)")
    g.add_argument("--lora-alpha", type=int, default=DEFAULTS.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=DEFAULTS.lora_dropout)
    g.add_argument("--target-modules", default=",".join(DEFAULTS.target_modules), help="comma-separated")
    g.add_argument("--gradient-checkpointing", type=_bool_or_unsloth, default="unsloth",
                   help="unsloth (offload to host memory), true or false")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=DEFAULTS.max_steps, help="-1: train --epochs epochs")
    g.add_argument("--epochs", type=float, default=DEFAULTS.epochs)
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    g.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum)
    g.add_argument("--learning-rate", "--lr", type=float, default=DEFAULTS.learning_rate)
    g.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps)
    g.add_argument("--packing", action="store_true", help="pack several conversations per row")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=DEFAULTS.output_dir)
    g.add_argument("--save-merged", default=DEFAULTS.save_merged, choices=["merged_16bit", "merged_4bit", "none"])
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="the sample chat question asked before and after")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    cfg = JobConfig(model=args.model, dataset=args.dataset, data_format=args.data_format, max_rows=args.max_rows,
                    template=args.template, responses_only=args.responses_only, max_seq_length=args.max_seq_length,
                    load_in_4bit=args.load_in_4bit, dtype=args.dtype, r=args.r, lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout, target_modules=targets,
                    gradient_checkpointing=args.gradient_checkpointing, max_steps=args.max_steps,
                    epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                    learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, packing=args.packing,
                    seed=args.seed, output_dir=args.output_dir,
                    save_merged=None if args.save_merged == "none" else args.save_merged, prompt=args.prompt,
                    max_new_tokens=args.max_new_tokens, cache_dir=args.cache_dir)
    run(cfg)
    shutdown()  # under torchrun / accelerate: a clean end for every rank
    return 0
