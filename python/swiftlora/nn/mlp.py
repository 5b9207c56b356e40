"""Gated MLP ``down(act(gate(x)) * up(x))`` with the activation-and-product on swiftlora's GLU kernels.

The three projections are the HF module's own children under their HF names, so PEFT wraps them and state dicts keep
their keys. When all three are PEFT LoRA layers the fused kernels cover (:mod:`swiftlora.nn.lora`: NF4 or dense
bases), the whole block runs as one ``lora_mlp`` op (gate and up in one GEMM, the activation's input recomputed in the
backward, not stored); otherwise each projection runs its own forward around the GLU kernel. Activations by
transformers' names: ``silu``/``swish`` -> SwiGLU (Llama, Mistral, Qwen),
``gelu_pytorch_tanh``/``gelu_new``/``gelu_fast`` -> tanh-approximate GeGLU (Gemma), ``gelu`` -> exact GeGLU.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.glu import geglu, swiglu
from ..ops.lora_mlp import lora_mlp
from .lora import linear, lora_projections

# transformers activation name -> (kernel, GeGLU approximation, lora_mlp's activation)
ACTIVATIONS = {
    "silu": ("swiglu", None, "swiglu"),
    "swish": ("swiglu", None, "swiglu"),
    "gelu_pytorch_tanh": ("geglu", "tanh", "geglu_tanh"),
    "gelu_new": ("geglu", "tanh", "geglu_tanh"),
    "gelu_fast": ("geglu", "tanh", "geglu_tanh"),
    "gelu": ("geglu", "none", "geglu"),
}


class GatedMLP(nn.Module):
    """Input/output ``[..., hidden]``; the intermediate ``[..., intermediate]`` has the projections' output dtype."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation
        self._kernel, self._approximate, self._block_activation = ACTIVATIONS[activation]

    @classmethod
    def from_module(cls, module: nn.Module, activation: str) -> "GatedMLP":
        """From an HF gated MLP (``gate_proj``, ``up_proj``, ``down_proj``), sharing its projections."""
        return cls(module.gate_proj, module.up_proj, module.down_proj, activation)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self._kernel == "swiglu":
            return swiglu(gate, up)
        return geglu(gate, up, approximate=self._approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = lora_projections((self.gate_proj, self.up_proj, self.down_proj), x)
        if fused is not None:
            (gate, up, down), p = fused
            with torch.autocast(x.device.type, enabled=False):
                return lora_mlp(x, gate, up, down, activation=self._block_activation, dropout_p=p)
        return linear(self.down_proj, self.glu(linear(self.gate_proj, x), linear(self.up_proj, x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
