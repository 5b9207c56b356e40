"""swiftlora: fast, memory-lean fine-tuning of LLMs on hand-written CUDA kernels.

Importing swiftlora registers its ops as ``torch.ops.swiftlora.*`` and changes nothing else.
"""
from __future__ import annotations

from ._build import build_info, compiled_arches, cuda_available, cuda_built
from . import nn, ops

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "build_info", "compiled_arches", "cuda_available", "cuda_built",
           "get_chat_template", "is_bfloat16_supported", "nn", "ops", "standardize_sharegpt",
           "train_on_responses_only", "__version__"]

# Unsloth's user API, from the integration layer, which imports transformers/peft: loaded on first use, so
# `import swiftlora` stays light
_LAZY = {
    "FastLanguageModel": "swiftlora.models",
    "is_bfloat16_supported": "swiftlora.models.loader",
    "get_chat_template": "swiftlora.train.chat_templates",
    "standardize_sharegpt": "swiftlora.train.chat_templates",
    "train_on_responses_only": "swiftlora.train.response_masking",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swiftlora' has no attribute {name!r}")
