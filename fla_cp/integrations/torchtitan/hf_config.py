"""torchtitan's Qwen3.5 text model config (with fla_cp's CP modules) from a transformers Qwen3.5 config.

    qwen3_5_config_from_hf("path/to/Qwen3.5-0.8B")          # a checkpoint directory (VLM or text config.json)
    qwen3_5_config_from_hf(transformers_config)              # Qwen3_5TextConfig, or Qwen3_5Config (its text_config)

The result computes what transformers' model of that config computes on text (`Qwen3_5ForCausalLM`, or a
VLM's language model, tied as the VLM), so the checkpoint loads with `Qwen35TextStateDictAdapter`
(state_dict.py) and gives transformers' logits. What torchtitan's model can't express is refused with a
ValueError naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torchtitan.models import qwen3_5 as tt_qwen3_5
from torchtitan.models.common import Embedding, Linear
from torchtitan.models.qwen3_5.model import OffsetRMSNorm, Qwen35Model, RMSNormGated
from torchtitan.models.qwen3_5.rope import MRoPE

from fla_cp.integrations.torchtitan.qwen3_5 import Qwen35TextModel, with_cp_layers

LAYER_TYPES = ("linear_attention", "full_attention")
DEFAULT_MROPE_SECTION = [11, 11, 10]      # transformers' default (modeling_qwen3_5.py, Qwen3_5TextRotaryEmbedding)


def load_hf_config(source):
    """transformers' config object of `source`: a checkpoint directory, a config.json path, a dict of its
    fields, or a config object (returned as is). transformers' config class fills the defaults and
    normalises old field spellings (e.g. `rope_theta` at top level)."""
    from transformers import AutoConfig, PretrainedConfig
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        source = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    if isinstance(source, dict):
        fields = dict(source)
        if "model_type" not in fields:
            raise ValueError("qwen3_5_config_from_hf: the config has no model_type")
        source = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if not isinstance(source, PretrainedConfig):
        raise TypeError(f"qwen3_5_config_from_hf: expected a path, dict or transformers config, "
                        f"got {type(source).__name__}")
    return source


def _refuse(field: str, value, why: str):
    raise ValueError(f"qwen3_5_config_from_hf: {field}={value!r}: {why}")


def _rotary(text) -> tuple[int, float, list[int]]:
    """(rotary_dim, theta, mrope_section) of transformers' `rope_parameters`."""
    rope = dict(text.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        _refuse("rope_parameters.rope_type", rope["rope_type"], "torchtitan's MRoPE is unscaled ('default') RoPE")
    factor = rope.get("partial_rotary_factor", 1.0)      # transformers' default where the field is absent
    rotary_dim = int(text.head_dim * factor)
    if rotary_dim != text.head_dim * factor or rotary_dim % 2:
        _refuse("rope_parameters.partial_rotary_factor", factor,
                f"head_dim {text.head_dim} x factor must be an even integer")
    section = list(rope.get("mrope_section", DEFAULT_MROPE_SECTION))
    # text positions use every frequency with the same position, so the section only matters for 3-D
    # (vision) positions; it must still describe the rotary half for MRoPE's interleaved cache
    if len(section) != 3 or sum(section) != rotary_dim // 2:
        _refuse("rope_parameters.mrope_section", section,
                f"needs 3 entries summing to rotary_dim/2 = {rotary_dim // 2}")
    return rotary_dim, float(rope["rope_theta"]), section


def _check_expressible(text) -> None:
    if text.model_type != "qwen3_5_text":
        why = ("MoE layers are not supported here yet (dense Qwen3.5 only)" if "moe" in text.model_type
               else "not a dense Qwen3.5 text config")
        _refuse("model_type", text.model_type, why)
    if text.hidden_act != "silu":
        _refuse("hidden_act", text.hidden_act, "torchtitan's feed-forward is SwiGLU (silu)")
    if text.attention_bias:
        _refuse("attention_bias", text.attention_bias, "torchtitan's Qwen3.5 attention projections have no bias")
    if text.attention_dropout:
        _refuse("attention_dropout", text.attention_dropout, "torchtitan's attention has no dropout")
    bad = sorted(set(text.layer_types) - set(LAYER_TYPES))
    if bad or len(text.layer_types) != text.num_hidden_layers:
        _refuse("layer_types", text.layer_types,
                f"needs num_hidden_layers ({text.num_hidden_layers}) entries from {LAYER_TYPES}")
    if text.linear_num_value_heads % text.linear_num_key_heads:
        _refuse("linear_num_value_heads", text.linear_num_value_heads,
                f"must be a multiple of linear_num_key_heads ({text.linear_num_key_heads})")


def _with_eps(config, eps: float):
    """`config` with every RMS norm's eps set (torchtitan's builders fix it at 1e-6; transformers uses
    `rms_norm_eps` for all of them, the GatedDeltaNet output norm included)."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, (OffsetRMSNorm.Config, RMSNormGated.Config)):
            changes[field.name] = dataclasses.replace(value, eps=eps)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[field.name] = _with_eps(value, eps)
    return dataclasses.replace(config, **changes) if changes else config


def qwen35_model_config(config) -> Qwen35Model.Config:
    """torchtitan's `Qwen35Model.Config` (no vision encoder) for transformers' `Qwen3_5TextConfig`, or the
    text model of a `Qwen3_5Config` (VLM)."""
    text = config.get_text_config()
    _check_expressible(text)
    q = tt_qwen3_5
    dim, vocab = text.hidden_size, text.vocab_size
    rotary_dim, theta, section = _rotary(text)
    # torchtitan's builder places attention every `full_attention_interval` layers. Built with interval 1
    # (every layer attention), each block has its layer's FFN, norms and depth-scaled init; the GatedDeltaNet
    # layers of `layer_types` (any pattern) then get their own config from torchtitan's per-layer builder.
    blocks = q._build_qwen35_layers(
        rope=MRoPE.Config(dim=rotary_dim, max_seq_len=text.max_position_embeddings, theta=theta,
                          mrope_section=section),
        attn_backend="flex", n_layers=text.num_hidden_layers, dim=dim, n_heads=text.num_attention_heads,
        n_kv_heads=text.num_key_value_heads, head_dim=text.head_dim, rotary_dim=rotary_dim,
        hidden_dim=text.intermediate_size, n_key_heads=text.linear_num_key_heads,
        n_value_heads=text.linear_num_value_heads, key_head_dim=text.linear_key_head_dim,
        value_head_dim=text.linear_value_head_dim, full_attention_interval=1)
    layers = []
    for layer_id, (block, kind) in enumerate(zip(blocks, text.layer_types)):
        if kind == "linear_attention":
            block = dataclasses.replace(block, attention=None, delta_net=q._qwen35_deltanet_config(
                dim=dim, n_key_heads=text.linear_num_key_heads, n_value_heads=text.linear_num_value_heads,
                key_head_dim=text.linear_key_head_dim, value_head_dim=text.linear_value_head_dim,
                layer_id=layer_id, conv_kernel_size=text.linear_conv_kernel_dim))
        layers.append(_with_eps(block, text.rms_norm_eps))
    return Qwen35Model.Config(
        vocab_size=vocab, dim=dim, norm=dataclasses.replace(q._offset_norm(dim), eps=text.rms_norm_eps),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=q._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=q._output_linear_init(dim)),
        # tied as transformers' model of this config (a VLM's own flag: the model its checkpoint was saved
        # from); torchtitan's Decoder ties lm_head to the embedding too
        enable_weight_tying=bool(config.tie_word_embeddings),
        layers=layers, vision_encoder=None)


def qwen3_5_config_from_hf(source, backend: str = "auto") -> Qwen35TextModel.Config:
    """torchtitan's Qwen3.5 text model config with fla_cp's CP modules for a transformers Qwen3.5 config
    (`load_hf_config`'s `source`). `backend`: the CP modules' kernels (`with_cp_layers`)."""
    return with_cp_layers(qwen35_model_config(load_hf_config(source)), backend=backend)


QWEN3_5_TYPES = ("qwen3_5", "qwen3_5_text")
GDN_TYPES = ("gated_deltanet", "gated_deltanet_cp")


def model_spec_from_hf(source, backend: str = "auto"):
    """The torchtitan ModelSpec (fla_cp's CP modules, parallelize_fn and checkpoint adapter) whose model has
    the architecture of a checkpoint's config (`load_hf_config`'s `source`): transformers' Qwen3.5 (text or
    VLM; the text model) or FLA's / fla_cp's GatedDeltaNet (pure or hybrid). Its weights load with
    `--checkpoint.initial_load_path <dir> --checkpoint.initial_load_in_hf`."""
    import fla_cp  # noqa: F401 - registers FLA's and fla_cp's GatedDeltaNet configs with AutoConfig
    from fla_cp.integrations.torchtitan.gated_deltanet import gdn_model_spec
    from fla_cp.integrations.torchtitan.qwen3_5 import qwen3_5_model_spec
    config = load_hf_config(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else config.model_type
    if config.model_type in QWEN3_5_TYPES:
        return qwen3_5_model_spec(qwen3_5_config_from_hf(config, backend), name=name)
    if config.model_type in GDN_TYPES:
        return gdn_model_spec(config, backend=backend, name=name)
    raise ValueError(f"--hf_config {name}: model_type {config.model_type!r} is not one fla_cp's torchtitan plugin "
                     f"builds (transformers' {QWEN3_5_TYPES}, FLA's {GDN_TYPES})")
