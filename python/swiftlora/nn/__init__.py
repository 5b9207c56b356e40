"""nn.Modules built on swiftlora's ops, ready to be swapped into HF models."""
from .rms_norm import RMSNorm

__all__ = ["RMSNorm"]
