"""Loading HF causal LMs with swiftlora's modules swapped in (one small table per architecture family), LoRA,
and switching between training and generation."""
from .fast_language_model import FastLanguageModel
from .patching import supported_model_types

__all__ = ["FastLanguageModel", "supported_model_types"]
