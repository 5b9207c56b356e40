"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .cross_entropy import (cross_entropy, cross_entropy_reference, softmax_grad_reference,
                            softmax_stats_reference)
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .gguf_quant import gguf_dequantize_reference, gguf_quantize
from .glu import geglu, geglu_reference, swiglu, swiglu_reference
from .lora_mlp import lora_mlp, lora_mlp_reference
from .lora_qkv import lora_qkv, lora_qkv_reference
from .lora_weights import LoRAProjection, NF4Weight
from .nf4 import (NF4Tensors, nf4_dequantize, nf4_dequantize_reference, nf4_gemv, nf4_gemv_reference, nf4_quantize,
                  nf4_quantize_reference)
from .qlora_gemm import qlora_gemm, qlora_gemm_reference
from .qlora_linear import (QLoRAPlan, dropout_masks, lora_projections, lora_reference, qlora_linear,
                           qlora_linear_reference, qlora_plan)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import half_tables, rope, rope_reference
from .token_logprobs import token_logprobs, token_logprobs_reference

__all__ = ["cross_entropy", "cross_entropy_reference", "dropout_masks", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_reference", "geglu", "geglu_reference", "gguf_dequantize_reference",
           "gguf_quantize", "half_tables", "lora_mlp", "lora_mlp_reference", "lora_projections", "lora_qkv",
           "lora_qkv_reference", "lora_reference", "LoRAProjection", "nf4_dequantize", "nf4_dequantize_reference",
           "nf4_gemv", "nf4_gemv_reference", "nf4_quantize", "nf4_quantize_reference", "NF4Tensors", "NF4Weight",
           "qlora_gemm", "qlora_gemm_reference", "qlora_linear", "qlora_linear_reference", "qlora_plan", "QLoRAPlan",
           "rms_norm",
           "rms_norm_reference", "rope", "rope_reference", "softmax_grad_reference", "softmax_stats_reference",
           "swiglu", "swiglu_reference", "token_logprobs", "token_logprobs_reference"]
