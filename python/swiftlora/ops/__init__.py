"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .cross_entropy import (cross_entropy, cross_entropy_reference, softmax_grad_reference,
                            softmax_stats_reference)
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .glu import geglu, geglu_reference, swiglu, swiglu_reference
from .nf4 import (NF4Tensors, nf4_dequantize, nf4_dequantize_reference, nf4_gemv, nf4_gemv_reference, nf4_quantize,
                  nf4_quantize_reference)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import half_tables, rope, rope_reference
from .token_logprobs import token_logprobs, token_logprobs_reference

__all__ = ["cross_entropy", "cross_entropy_reference", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_reference", "geglu", "geglu_reference", "half_tables", "NF4Tensors",
           "nf4_dequantize", "nf4_dequantize_reference", "nf4_gemv", "nf4_gemv_reference", "nf4_quantize",
           "nf4_quantize_reference", "rms_norm",
           "rms_norm_reference", "rope", "rope_reference", "softmax_grad_reference", "softmax_stats_reference",
           "swiglu", "swiglu_reference", "token_logprobs", "token_logprobs_reference"]
