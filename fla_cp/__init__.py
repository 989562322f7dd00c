"""fla_cp: exact context parallelism for Gated DeltaNet on top of flash-linear-attention."""
from fla_cp import ops

__version__ = "0.1.0"
