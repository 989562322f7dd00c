"""transformers' Qwen3.5-MoE text model (`qwen3_5_moe_text`, and the text part of `qwen3_5_moe`
checkpoints) with exact CP: Qwen3.5's token mixers, transformers' experts (per token: nothing to do
under CP) and the router's load-balancing loss from the whole CP group's statistics.
See `fla_cp.models.qwen3_5_cp` for the usage."""
from __future__ import annotations

from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

from fla_cp.layers.qwen_hybrid_cp import QwenGatedAttentionCPMixin, QwenGatedDeltaNetCPMixin
from fla_cp.models.qwen_hybrid import QwenCPForCausalLMMixin, QwenCPTextModelMixin


class Qwen3_5MoeCPGatedDeltaNet(QwenGatedDeltaNetCPMixin, hf.Qwen3_5MoeGatedDeltaNet):
    """`Qwen3_5MoeGatedDeltaNet` (Qwen3.5's) under CP."""


class Qwen3_5MoeCPAttention(QwenGatedAttentionCPMixin, hf.Qwen3_5MoeAttention):
    _apply_rotary = staticmethod(hf.apply_rotary_pos_emb)


class Qwen3_5MoeCPTextModel(QwenCPTextModelMixin, hf.Qwen3_5MoeTextModel):
    cp_layer_classes = {"linear_attn": Qwen3_5MoeCPGatedDeltaNet, "self_attn": Qwen3_5MoeCPAttention}


class Qwen3_5MoeCPForCausalLM(QwenCPForCausalLMMixin, hf.Qwen3_5MoeForCausalLM):
    text_model_class = Qwen3_5MoeCPTextModel
