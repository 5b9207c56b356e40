"""RMSNorm module on the swiftlora kernel, a drop-in for the HF Llama/Qwen (w·x̂) and Gemma ((1+w)·x̂) norms."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. ``offset=True`` is Gemma's ``(1 + weight)`` form (weight initialised to 0).

    Input ``[..., hidden_size]`` float32/float16/bfloat16; output has the input's dtype and shape.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: bool = False, device=None, dtype=None):
        super().__init__()
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps = float(eps)
        self.offset = bool(offset)

    @classmethod
    def from_module(cls, module: nn.Module, offset: bool) -> "RMSNorm":
        """Wraps an HF norm module, sharing its weight Parameter (so optimisers and state dicts see the same one).

        The epsilon is read from ``variance_epsilon`` (Llama, Qwen, Mistral) or ``eps`` (Gemma)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(f"RMSNorm.from_module: {type(module).__name__} has no weight and eps/variance_epsilon")
        norm = cls.__new__(cls)
        nn.Module.__init__(norm)
        norm.weight = module.weight
        norm.eps, norm.offset = float(eps), bool(offset)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
