"""transformers' Qwen3-Next (`qwen3_next`) with exact CP: fused, per-key-head-grouped GDN projections
(`in_proj_qkvz`, `in_proj_ba`, regrouped by transformers' own `fix_query_key_value_ordering` into the
same `[q | k | v]` conv channels as Qwen3.5), gated attention, dense or MoE MLPs, and the router's
load-balancing loss from the whole CP group's statistics. See `fla_cp.models.qwen3_5_cp` for the usage."""
from __future__ import annotations

import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from fla_cp.layers.qwen_hybrid_cp import QwenGatedAttentionCPMixin, QwenGatedDeltaNetCPMixin
from fla_cp.models.qwen_hybrid import QwenCPForCausalLMMixin, QwenCPTextModelMixin


class Qwen3NextCPGatedDeltaNet(QwenGatedDeltaNetCPMixin, hf.Qwen3NextGatedDeltaNet):
    """`Qwen3NextGatedDeltaNet` under CP."""

    def _cp_project(self, hidden_states):
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                            self.in_proj_ba(hidden_states))
        B, T = hidden_states.shape[:2]
        qkv = torch.cat([x.reshape(B, T, -1) for x in (q, k, v)], dim=-1)
        return qkv, (z, b, a)


class Qwen3NextCPAttention(QwenGatedAttentionCPMixin, hf.Qwen3NextAttention):
    _apply_rotary = staticmethod(hf.apply_rotary_pos_emb)


class Qwen3NextCPModel(QwenCPTextModelMixin, hf.Qwen3NextModel):
    cp_layer_classes = {"linear_attn": Qwen3NextCPGatedDeltaNet, "self_attn": Qwen3NextCPAttention}


class Qwen3NextCPForCausalLM(QwenCPForCausalLMMixin, hf.Qwen3NextForCausalLM):
    text_model_class = Qwen3NextCPModel
