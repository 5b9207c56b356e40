"""Quantized-weight formats: bitsandbytes' NF4 (QuantState, checkpoint keys, Params4bit/Linear4bit interop).

- ``quantize_nf4`` / ``dequantize_nf4``: tensor <-> (packed, QuantState) with swiftlora's kernels.
- ``QuantState``: bitsandbytes' state and its serialized form (``as_dict(packed=True)`` / ``from_dict``).
- ``quantize_linear_to_bnb``, ``dequantize_bnb_weight``, ``linear_from_bnb``, ``to_bnb_quant_state``,
  ``from_bnb_quant_state``: bitsandbytes modules and states (these import bitsandbytes when called).
"""
from .bnb import (dequantize_bnb_weight, from_bnb_quant_state, linear_from_bnb, quantize_linear_to_bnb,
                  to_bnb_quant_state)
from .nf4 import dequantize_nf4, quantize_nf4, state_from_tensors
from .nf4_state import QuantState

__all__ = ["QuantState", "dequantize_bnb_weight", "dequantize_nf4", "from_bnb_quant_state", "linear_from_bnb",
           "quantize_linear_to_bnb", "quantize_nf4", "state_from_tensors", "to_bnb_quant_state"]
