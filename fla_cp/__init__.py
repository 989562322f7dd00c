"""fla_cp: exact context parallelism for Gated DeltaNet on top of flash-linear-attention."""
from fla_cp import ops
from fla_cp import models  # registers gated_deltanet_cp with the HF Auto classes

__version__ = "0.1.0"
