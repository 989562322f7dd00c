"""Qwen3-Next (transformers' `qwen3_next`) with CP, registered with AutoModelForCausalLM on import."""
from transformers.models.qwen3_next import Qwen3NextConfig

from fla_cp.models.qwen3_next_cp.modeling_qwen3_next_cp import Qwen3NextCPForCausalLM, Qwen3NextCPModel
from fla_cp.models.qwen_hybrid import register_family

register_family("qwen3_next", (Qwen3NextConfig,), Qwen3NextCPForCausalLM)

__all__ = ["Qwen3NextCPForCausalLM", "Qwen3NextCPModel"]
