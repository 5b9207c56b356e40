"""Writes one GGUF file: metadata and vocabulary through gguf-py's GGUFWriter, then the tensors one at a time
(loaded, transformed and quantized on the weights' device by swiftlora's kernels, copied to the host, written),
so no second copy of the model is ever held. The file is written under a temporary name and renamed at the end:
a failed export never leaves a truncated file nor replaces a previous good one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ...ops.gguf_quant import gguf_quantize
from .arch import ArchSpec, text_config, write_arch_metadata
from .methods import QuantPolicy, is_quantized
from .tensors import TensorSource
from .vocab import Vocab

_T = gguf.GGMLQuantizationType


@dataclass
class PlannedTensor:
    source: TensorSource
    qtype: _T

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.source.shape)) // block * size


def policy_for(method: str, spec: ArchSpec, config: Any, plan: list[TensorSource]) -> QuantPolicy:
    cfg = text_config(config)
    n_head = cfg.num_attention_heads
    n_head_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    return QuantPolicy(
        method=method, n_layer=cfg.num_hidden_layers, n_head=n_head, n_head_kv=n_head_kv,
        n_attn_v=sum("attn_v.weight" in t.name for t in plan),
        has_output=any(t.name == "output.weight" for t in plan),
        large_llama=spec.model_arch == gguf.MODEL_ARCH.LLAMA and cfg.num_hidden_layers == 80 and n_head != n_head_kv)


def encode_tensor(w: torch.Tensor, qtype: _T) -> np.ndarray:
    """float32 tensor -> the numpy array GGUFWriter writes for ``qtype`` (uint8 bytes for BF16 and quantized)."""
    if qtype == _T.F32:
        return w.float().cpu().numpy()
    if qtype == _T.F16:
        return w.half().cpu().numpy()
    if qtype == _T.BF16:
        return w.bfloat16().view(torch.uint8).cpu().numpy()
    if not is_quantized(qtype):
        raise ValueError(f"GGUF export: cannot write tensor type {qtype.name}")
    return gguf_quantize(w, int(qtype)).cpu().numpy()


def write_gguf(path: Path, spec: ArchSpec, config: Any, vocab: Vocab, plan: list[TensorSource], method: str,
               name: str, progress: bool = True) -> Path:
    """Writes ``path`` (via ``path.tmp-<pid>``) and returns it."""
    policy = policy_for(method, spec, config, plan)
    tensors = [PlannedTensor(src, policy.tensor_type(src.name, src.shape)) for src in plan]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(None, spec.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(policy.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_arch_metadata(writer, spec, config, len(vocab.tokens))
        vocab.write(writer)
        for t in tensors:
            raw = None if t.qtype in (_T.F32, _T.F16) else t.qtype
            dtype = {_T.F32: np.float32, _T.F16: np.float16}.get(t.qtype, np.uint8)
            shape = t.source.shape if raw is None else (*t.source.shape[:-1], t.nbytes // _rows(t.source.shape))
            writer.add_tensor_info(t.source.name, shape, np.dtype(dtype), t.nbytes, raw_dtype=raw)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in _progress(tensors, f"{path.name}", progress):
            data = encode_tensor(t.source.load(), t.qtype)
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"GGUF export: {t.source.name} encoded to {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    bar = tqdm(items, desc=desc, unit="tensor")
    for item in bar:
        bar.set_postfix_str(f"{item.source.name} {item.qtype.name}", refresh=False)
        yield item
