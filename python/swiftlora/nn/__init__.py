"""nn.Modules built on swiftlora's ops, ready to be swapped into HF models."""
from .attention import Attention, RopeTables, RotaryPositions, eager_attention
from .head_metrics import head_metrics
from .lm_head import head_loss, head_token_outputs
from .loss import CausalLMLoss, causal_lm_loss, logit_options, shifted_labels
from .mlp import GatedMLP
from .rms_norm import RMSNorm
from .rotary import RopeConfig, RotaryEmbedding, rope_tables

__all__ = ["Attention", "CausalLMLoss", "GatedMLP", "RMSNorm", "RopeConfig", "RopeTables", "RotaryEmbedding",
           "RotaryPositions", "causal_lm_loss", "eager_attention", "head_loss", "head_metrics", "head_token_outputs",
           "logit_options", "rope_tables", "shifted_labels"]
