"""Qwen3.5-MoE (transformers' `qwen3_5_moe_text` / `qwen3_5_moe`) with CP, registered with AutoModelForCausalLM."""
from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig

from fla_cp.models.qwen3_5_moe_cp.modeling_qwen3_5_moe_cp import Qwen3_5MoeCPForCausalLM, Qwen3_5MoeCPTextModel
from fla_cp.models.qwen_hybrid import register_family

register_family("qwen3_5_moe_text", (Qwen3_5MoeTextConfig, Qwen3_5MoeConfig), Qwen3_5MoeCPForCausalLM)

__all__ = ["Qwen3_5MoeCPForCausalLM", "Qwen3_5MoeCPTextModel"]
