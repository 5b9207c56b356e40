"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .cross_entropy import (cross_entropy, cross_entropy_reference, softmax_grad_reference,
                            softmax_stats_reference)
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .glu import geglu, geglu_reference, swiglu, swiglu_reference
from .gguf_quant import gguf_dequantize_reference, gguf_quantize
from .rms_norm import rms_norm, rms_norm_reference
from .rope import half_tables, rope, rope_reference
from .token_logprobs import token_logprobs, token_logprobs_reference

__all__ = ["cross_entropy", "cross_entropy_reference", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_reference", "geglu", "geglu_reference", "gguf_dequantize_reference",
           "gguf_quantize", "half_tables", "rms_norm", "rms_norm_reference", "rope", "rope_reference",
           "softmax_grad_reference", "softmax_stats_reference", "swiglu", "swiglu_reference", "token_logprobs",
           "token_logprobs_reference"]
