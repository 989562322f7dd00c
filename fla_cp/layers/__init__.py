"""CP-enabled layers, parameter-compatible with their flash-linear-attention counterparts."""
from fla_cp.layers.attention_cp import AttentionCP
from fla_cp.layers.gated_deltanet_cp import GatedDeltaNetCP

__all__ = ["AttentionCP", "GatedDeltaNetCP"]
