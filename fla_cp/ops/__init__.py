from fla_cp.ops.context import CPContext, build_cp_context
from fla_cp.ops.chunk_cp import chunk_cp_gated_delta_rule
from fla_cp.ops.attention import attention_cp

__all__ = ["CPContext", "build_cp_context", "chunk_cp_gated_delta_rule", "attention_cp"]
