"""Qwen3.5 (transformers' `qwen3_5_text` / `qwen3_5`) with CP, registered with AutoModelForCausalLM on import."""
from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5TextConfig

from fla_cp.models.qwen3_5_cp.modeling_qwen3_5_cp import Qwen3_5CPForCausalLM, Qwen3_5CPTextModel
from fla_cp.models.qwen_hybrid import register_family

register_family("qwen3_5_text", (Qwen3_5TextConfig, Qwen3_5Config), Qwen3_5CPForCausalLM)

__all__ = ["Qwen3_5CPForCausalLM", "Qwen3_5CPTextModel"]
