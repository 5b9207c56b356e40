"""GGUF export for llama.cpp / LM Studio / Ollama, with swiftlora's own block quantizers (no llama.cpp build).

``save_pretrained_gguf(model, save_directory, tokenizer, quantization_method)`` is the entry point (Unsloth's
``model.save_pretrained_gguf``); see export/hub.py for ``push_to_hub_gguf``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...distributed import check_not_sharded, on_main_process
from .merge import merged_for_export
from .arch import ARCHS, arch_spec, text_config
from .methods import ALIASES, METHODS, resolve_methods
from .tensors import plan_tensors
from .vocab import build_vocab
from .writer import write_gguf

__all__ = ["ALIASES", "ARCHS", "METHODS", "gguf_filename", "resolve_methods", "save_pretrained_gguf"]


def gguf_filename(stem: str, method: str) -> str:
    """``<stem>.<METHOD>.gguf``, e.g. ``model.Q4_K_M.gguf``."""
    return f"{stem}.{method.upper()}.gguf"


def _embedding_rows(model: Any) -> int:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[0])


@on_main_process
def save_pretrained_gguf(model: Any, save_directory: str | os.PathLike, tokenizer: Any = None,
                         quantization_method: str | list[str] = "fast_quantized", *, file_stem: str = "model",
                         model_name: str | None = None, modelfile: bool = True, progress: bool = True) -> list[Path]:
    """Writes ``save_directory/<file_stem>.<METHOD>.gguf`` for each method, plus an Ollama ``Modelfile``.

    Args:
        model: a Hugging Face causal LM (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3) or a PEFT model
            over one (merged in float32, in memory). Weights stay on their device; CUDA weights are quantized on
            the GPU.
        save_directory: created if missing.
        tokenizer: the model's tokenizer (required: its vocabulary, special tokens and chat template go into the
            file).
        quantization_method: a name or list of names: f32, f16 (= not_quantized), bf16, q8_0 (= fast_quantized),
            q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m (= quantized), q5_k_s, q5_k_m,
            q6_k. Mixes (*_s/_m/_l) choose each tensor's type as llama-quantize does.
        file_stem: file name prefix. model_name: ``general.name`` (default: the config's name or path).
        modelfile: also write ``Modelfile`` (Ollama) for the first method's file, from the tokenizer's chat template.
        progress: a tqdm bar per file, advancing per tensor.
    Returns:
        the GGUF paths, in method order.
    """
    methods = resolve_methods(quantization_method)
    check_not_sharded(model, "save_pretrained_gguf")
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf: pass the model's tokenizer (tokenizer=...): its vocabulary and chat "
                         "template are part of the GGUF file")
    model = merged_for_export(model)
    config = model.config
    spec = arch_spec(config)
    out_dir = Path(save_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_tensors(model, spec, config)
    vocab = build_vocab(tokenizer, _embedding_rows(model), force_no_space_prefix=spec.no_space_prefix)
    name = model_name or os.path.basename(str(getattr(text_config(config), "_name_or_path", "") or "model")) or "model"
    paths = [write_gguf(out_dir / gguf_filename(file_stem, m), spec, config, vocab, plan, m, name, progress)
             for m in methods]
    if modelfile:
        from ..ollama import write_modelfile

        write_modelfile(out_dir, paths[0].name, tokenizer)
    return paths
