"""Op entry points: argument checks, fake (meta) kernels, autograd, and the plain-PyTorch references."""
from .rms_norm import rms_norm, rms_norm_reference
from .rope import half_tables, rope, rope_reference

__all__ = ["half_tables", "rms_norm", "rms_norm_reference", "rope", "rope_reference"]
