"""swiftlora: fast, memory-lean fine-tuning of LLMs on hand-written CUDA kernels.

Importing swiftlora registers its ops as ``torch.ops.swiftlora.*`` and changes nothing else.
"""
from __future__ import annotations

from ._build import build_info, compiled_arches, cuda_available, cuda_built
from . import nn, ops

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "build_info", "compiled_arches", "cuda_available", "cuda_built", "nn", "ops",
           "__version__"]


def __getattr__(name):
    # the integration layer imports transformers/peft: loaded on first use, so `import swiftlora` stays light
    if name == "FastLanguageModel":
        from .models import FastLanguageModel

        return FastLanguageModel
    raise AttributeError(f"module 'swiftlora' has no attribute {name!r}")
