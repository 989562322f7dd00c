"""Config of the CP model: FLA's `GatedDeltaNetConfig` plus how the sequence is split."""
from __future__ import annotations

from fla.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetConfig

CP_LAYOUTS = ("contiguous", "zigzag")


class GatedDeltaNetCPConfig(GatedDeltaNetConfig):
    """Every field of FLA's `GatedDeltaNetConfig`, plus:

    Args:
        cp_size: ranks per context-parallel group (1 = no CP). World size = dp x cp_size.
        cp_layout: "contiguous" (rank r holds slice r) or "zigzag" (2P parts, r holds r and 2P-1-r).
    """
    model_type = 'gated_deltanet_cp'

    def __init__(self, cp_size: int = 1, cp_layout: str = "contiguous", **kwargs):
        if int(cp_size) < 1:
            raise ValueError(f"cp_size must be >= 1, got {cp_size}")
        if cp_layout not in CP_LAYOUTS:
            raise ValueError(f"cp_layout must be one of {CP_LAYOUTS}, got {cp_layout!r}")
        # an FLA checkpoint's config.json says model_type="gated_deltanet"; ours is saved as ours
        kwargs.pop("model_type", None)
        self.cp_size = int(cp_size)
        self.cp_layout = cp_layout
        super().__init__(**kwargs)
