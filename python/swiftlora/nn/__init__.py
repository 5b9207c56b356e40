"""nn.Modules built on swiftlora's ops, ready to be swapped into HF models."""
from .rms_norm import RMSNorm
from .rotary import RopeConfig, RotaryEmbedding, rope_tables

__all__ = ["RMSNorm", "RopeConfig", "RotaryEmbedding", "rope_tables"]
