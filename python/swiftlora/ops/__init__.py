"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .rms_norm import rms_norm, rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
