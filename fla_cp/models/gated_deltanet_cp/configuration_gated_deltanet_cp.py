"""Config of the CP model: FLA's `GatedDeltaNetConfig` plus how the sequence is split."""
from __future__ import annotations

from fla.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetConfig

from fla_cp.layers.short_conv_cp import CONV_BACKENDS
from fla_cp.ops.backends import BACKENDS as KERNEL_BACKENDS

CP_LAYOUTS = ("contiguous", "zigzag")


class GatedDeltaNetCPConfig(GatedDeltaNetConfig):
    """Every field of FLA's `GatedDeltaNetConfig`, plus:

    Args:
        cp_size: ranks per context-parallel group (1 = no CP). World size = dp x cp_size.
        cp_layout: "contiguous" (rank r holds slice r) or "zigzag" (2P parts, r holds r and 2P-1-r).
        kernel_backend: the GDN operator's kernels: "auto" (Triton on CUDA: FLA's chunk kernels and
            ours; PyTorch elsewhere), "triton" or "torch".
        conv_backend: the short conv's: "auto" (FLA's Triton `causal_conv1d` on CUDA, PyTorch
            elsewhere), "fla" or "torch".
    """
    model_type = 'gated_deltanet_cp'

    def __init__(self, cp_size: int = 1, cp_layout: str = "contiguous", kernel_backend: str = "auto",
                 conv_backend: str = "auto", **kwargs):
        if int(cp_size) < 1:
            raise ValueError(f"cp_size must be >= 1, got {cp_size}")
        for name, value, allowed in (("cp_layout", cp_layout, CP_LAYOUTS),
                                     ("kernel_backend", kernel_backend, KERNEL_BACKENDS),
                                     ("conv_backend", conv_backend, CONV_BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        # an FLA checkpoint's config.json says model_type="gated_deltanet"; ours is saved as ours
        kwargs.pop("model_type", None)
        self.cp_size = int(cp_size)
        self.cp_layout = cp_layout
        self.kernel_backend = kernel_backend
        self.conv_backend = conv_backend
        super().__init__(**kwargs)
