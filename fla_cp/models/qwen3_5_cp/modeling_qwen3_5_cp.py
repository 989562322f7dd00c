"""transformers' Qwen3.5 text model (`qwen3_5_text`, and the text part of `qwen3_5` checkpoints) with exact CP.

transformers' classes with CP token mixers (`fla_cp.layers.qwen_hybrid_cp`) and the shared CP plumbing
(`fla_cp.models.qwen_hybrid`, `fla_cp.parallel`); parameter names are transformers', so its
checkpoints load unchanged and `save_pretrained` writes them back as transformers saves them.

    import fla_cp    # maps qwen3_5 / qwen3_5_text in AutoModelForCausalLM to Qwen3_5CPForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, cp_size=4)     # every CP rank: the same full batch
    out = model(input_ids=ids, labels=ids)      # the global token mean, the same on every CP rank
    out.loss.backward(); sync_gradients(model); optimizer.step()
"""
from __future__ import annotations

from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from fla_cp.layers.qwen_hybrid_cp import QwenGatedAttentionCPMixin, QwenGatedDeltaNetCPMixin
from fla_cp.models.qwen_hybrid import QwenCPForCausalLMMixin, QwenCPTextModelMixin


class Qwen3_5CPGatedDeltaNet(QwenGatedDeltaNetCPMixin, hf.Qwen3_5GatedDeltaNet):
    """`Qwen3_5GatedDeltaNet` under CP: separate projections, conv channels `[q | k | v]` of `in_proj_qkv`."""


class Qwen3_5CPAttention(QwenGatedAttentionCPMixin, hf.Qwen3_5Attention):
    """`Qwen3_5Attention` under CP. Its multi-axis RoPE, given the text positions on all three axes (text
    input), is the 1-D partial RoPE at those positions."""
    _apply_rotary = staticmethod(hf.apply_rotary_pos_emb)


class Qwen3_5CPTextModel(QwenCPTextModelMixin, hf.Qwen3_5TextModel):
    cp_layer_classes = {"linear_attn": Qwen3_5CPGatedDeltaNet, "self_attn": Qwen3_5CPAttention}


class Qwen3_5CPForCausalLM(QwenCPForCausalLMMixin, hf.Qwen3_5ForCausalLM):
    text_model_class = Qwen3_5CPTextModel
