"""CP-enabled layers, parameter-compatible with their flash-linear-attention counterparts."""
from fla_cp.layers.gated_deltanet_cp import GatedDeltaNetCP

__all__ = ["GatedDeltaNetCP"]
