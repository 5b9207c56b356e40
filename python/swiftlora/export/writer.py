"""Streaming a checkpoint's tensors into safetensors shards: each shard is written as soon as it is full, so only
one shard's tensors are in memory; the files take their final names (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``) once the count is known."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch


def parse_size(size) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2GiB"`` / an int number of bytes -> bytes."""
    if isinstance(size, int) and size > 0:
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(size).strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * units[unit])
            except ValueError:
                break
    raise ValueError(f"max_shard_size must be a positive number of bytes or like '5GB', got {size!r}")


def write_safetensors(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size="5GB") -> list[str]:
    """Write ``(key, CPU tensor)`` pairs into ``directory``; returns the weight file names."""
    from safetensors.torch import save_file

    directory, limit = Path(directory), parse_size(max_shard_size)
    parts: list[Path] = []
    keys: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        part = directory / f".part-{len(parts)}.safetensors"
        save_file(current, part, metadata={"format": "pt"})
        parts.append(part)
        keys.append(list(current))

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            flush()
            current, size = {}, 0
        current[key] = t
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
        weight_map = {k: name for name, ks in zip(names, keys) for k in ks}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for part, name in zip(parts, names):
        part.rename(directory / name)
    return names
