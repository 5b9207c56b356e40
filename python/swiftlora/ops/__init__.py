"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .glu import geglu, geglu_reference, swiglu, swiglu_reference
from .rms_norm import rms_norm, rms_norm_reference

__all__ = ["geglu", "geglu_reference", "rms_norm", "rms_norm_reference", "swiglu", "swiglu_reference"]
