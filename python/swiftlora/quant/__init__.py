"""Quantized-weight formats: bitsandbytes' NF4 (QuantState, checkpoint keys, Params4bit/Linear4bit interop)."""
from .nf4_state import QuantState

__all__ = ["QuantState"]
