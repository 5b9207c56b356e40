"""nn.Modules built on swiftlora's ops, ready to be swapped into HF models."""
from .loss import CausalLMLoss, causal_lm_loss, logit_options, shifted_labels
from .rms_norm import RMSNorm
from .rotary import RopeConfig, RotaryEmbedding, rope_tables

__all__ = ["CausalLMLoss", "RMSNorm", "RopeConfig", "RotaryEmbedding", "causal_lm_loss", "logit_options",
           "rope_tables", "shifted_labels"]
