"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .glu import geglu, geglu_reference, swiglu, swiglu_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import half_tables, rope, rope_reference

__all__ = ["geglu", "geglu_reference", "half_tables", "rms_norm", "rms_norm_reference", "rope", "rope_reference",
           "swiglu", "swiglu_reference"]
