"""fla_cp's own Triton kernels for the CP-specific work (segment summaries).

The local GDN forward/backward reuses FLA's chunk kernels; only what FLA has no kernel for lives here.
"""
from fla_cp.ops.triton.chunk_summary import chunk_summary_bwd, chunk_summary_fwd

__all__ = ['chunk_summary_fwd', 'chunk_summary_bwd']
