"""Model presets for the scripts: `--model_config <preset>|<path>` (`PRESETS`: tiny, small, base, the
hybrids hybrid-tiny, hybrid-small, hybrid-base, hybrid-small-swa, and transformers' Qwen3.5 / Qwen3.5-MoE /
Qwen3-Next: qwen3_5-tiny, qwen3_5-small, qwen3_5_moe-tiny, qwen3_next-tiny).

A preset is a dict of GatedDeltaNetConfig fields, or of a transformers config's fields with its
`model_type`; `<path>` is a JSON file of such fields or a directory with a `config.json` (e.g. a
checkpoint, transformers' own included). `build_config` makes the config object, `causal_lm_class`
the CP model class that takes it. FLA's fused Triton norm / SwiGLU / cross-entropy
are switched off so the same config runs on CPU; `vocab_size` and the special token ids always come
from the tokenizer, and the CP launch choices (`cp_size`, `cp_layout`) from the command line, never
from the file. `resolved_model_config` is the full config a spec stands for, to compare two specs.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

PRESETS: dict[str, dict] = {
    # for tests: a few seconds per step on CPU at T=256
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 32, "expand_v": 1.0,
             "hidden_ratio": 2},
    # the README's CPU main job: learns visibly within a few minutes on 2 cores
    "small": {"hidden_size": 256, "num_hidden_layers": 2, "num_heads": 4, "head_dim": 64, "expand_v": 1.0,
              "hidden_ratio": 4},
    # a GPU-sized model for memory benchmarks
    "base": {"hidden_size": 1024, "num_hidden_layers": 8, "num_heads": 4, "head_dim": 256, "expand_v": 2.0,
             "hidden_ratio": 4},
}


def _hybrid(gdn: str, attn, num_hidden_layers: int | None = None) -> dict:
    """The GDN preset `gdn` with softmax-attention layers (`attn`, FLA's format: one spec or a list)."""
    fields = dict(PRESETS[gdn], attn=attn)
    if num_hidden_layers is not None:
        fields["num_hidden_layers"] = num_hidden_layers
    return fields


def _every_fourth(num_layers: int) -> list[int]:
    """Layers 3, 7, ...: one softmax-attention layer in four (3:1 GDN:attention, as Qwen3.5 / Qwen3-Next)."""
    return [i for i in range(num_layers) if i % 4 == 3]


# Hybrids (GDN + softmax attention): the widths of the GDN preset of the same name, one attention layer in
# four. tiny and small have 2 layers, too few for 3:1: their hybrids have 4 (layer 3 is attention), base
# keeps its 8 (layers 3 and 7). Attention is GQA with head_dim = hidden_size / num_heads (FLA's Attention
# derives it so): tiny 2 q heads : 1 kv head x 32, small 4 : 2 x 64, base 8 : 2 x 128. `-swa`: half the
# attention layers use a sliding window of 512 tokens (layer 3 windowed, layer 7 full).
PRESETS.update({
    "hybrid-tiny": _hybrid("tiny", {"layers": _every_fourth(4), "num_heads": 2, "num_kv_heads": 1}, 4),
    "hybrid-small": _hybrid("small", {"layers": _every_fourth(4), "num_heads": 4, "num_kv_heads": 2}, 4),
    "hybrid-base": _hybrid("base", {"layers": _every_fourth(8), "num_heads": 8, "num_kv_heads": 2}),
    "hybrid-small-swa": _hybrid("small", [{"layers": [3], "num_heads": 4, "num_kv_heads": 2, "window_size": 512},
                                          {"layers": [7], "num_heads": 4, "num_kv_heads": 2}], 8),
})


# transformers' GDN hybrids (Qwen3.5 dense, Qwen3.5-MoE, Qwen3-Next): a preset names its model_type and
# holds that config's fields; layer_types default to transformers' (attention every 4th layer). GVA (value
# heads = 2 x key heads) and GQA attention with partial RoPE, as the released models.
_QWEN_TINY = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
_QWEN_SMALL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4)
_MOE_TINY = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
PRESETS.update({
    "qwen3_5-tiny": dict(_QWEN_TINY, model_type="qwen3_5_text"),
    "qwen3_5-small": dict(_QWEN_SMALL, model_type="qwen3_5_text"),
    "qwen3_5_moe-tiny": dict(_QWEN_TINY, **_MOE_TINY, model_type="qwen3_5_moe_text"),
    "qwen3_next-tiny": dict(_QWEN_TINY, **_MOE_TINY, model_type="qwen3_next"),
})
# model types that transformers' config classes build (the others are FLA GatedDeltaNet configs)
TRANSFORMERS_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "qwen3_5", "qwen3_5_moe")


def preset_help() -> str:
    """The preset names for a `--model_config` help string."""
    return "|".join(PRESETS)

# The scripts pass these to the config themselves (--cp_size, --cp_layout): a checkpoint's config.json
# holds cp_layout, and a second value for it would be a TypeError, or would silently override the flag.
LAUNCH_FIELDS = ("cp_size", "cp_layout")
# The tokenizer in use decides these, as it decides vocab_size: a file's pad_token_id would become the
# embedding's padding_idx (out of range, or a byte whose row never trains).
TOKENIZER_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")

CPU_SAFE = {"fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False,
            "fuse_linear_cross_entropy": False, "use_cache": False}


def model_type_of(spec: str) -> str | None:
    """The transformers model_type `spec` builds (`TRANSFORMERS_TYPES`), or None for an FLA GatedDeltaNet."""
    model_type = _fields_of(spec).get("model_type")
    return model_type if model_type in TRANSFORMERS_TYPES else None


def _fields_of(spec: str) -> dict:
    if spec in PRESETS:
        return copy.deepcopy(PRESETS[spec])      # a hybrid's `attn` is a dict / list: not shared
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model_config {spec!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file")
    return json.loads(path.read_text())


def model_config_kwargs(spec: str, vocab_size: int, **overrides) -> dict:
    """Config keyword arguments for a preset name or a JSON / config directory path: GatedDeltaNetCPConfig's,
    or those of the transformers config of the spec's model_type (`model_type_of`)."""
    fields = _fields_of(spec)
    qwen = fields.get("model_type") in TRANSFORMERS_TYPES
    if qwen and isinstance(fields.get("text_config"), dict):
        fields = fields["text_config"]          # a VLM checkpoint's config: its text model
    for key in ("architectures", "model_type", "transformers_version", "auto_map", "dtype", "torch_dtype",
                *LAUNCH_FIELDS, *TOKENIZER_FIELDS):
        fields.pop(key, None)
    fields.update({"use_cache": False} if qwen else CPU_SAFE)
    fields["vocab_size"] = vocab_size
    fields.update(overrides)
    return fields


def build_config(spec: str, vocab_size: int, **cp_fields):
    """The config object `spec` stands for, with the CP launch fields (`cp_size`, `cp_layout`): a
    `GatedDeltaNetCPConfig`, or transformers' text config of a Qwen3.5 / Qwen3.5-MoE / Qwen3-Next spec
    carrying them (what `fla_cp`'s Qwen CP classes take)."""
    model_type = model_type_of(spec)
    fields = model_config_kwargs(spec, vocab_size)
    if model_type is None:
        from fla_cp.models import GatedDeltaNetCPConfig
        return GatedDeltaNetCPConfig(**fields, **cp_fields)
    from transformers import AutoConfig

    from fla_cp.models import QWEN_FAMILIES_MISSING
    from fla_cp.models.qwen_hybrid import with_cp_fields
    if QWEN_FAMILIES_MISSING:
        raise ImportError(f"--model_config {spec!r}: {QWEN_FAMILIES_MISSING}")
    text_type = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}.get(model_type, model_type)
    return with_cp_fields(AutoConfig.for_model(text_type, **fields), **cp_fields)


def causal_lm_class(config):
    """fla_cp's CP causal-LM class for a config from `build_config`."""
    import fla_cp  # noqa: F401  (registers the CP classes with the Auto mapping)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM._model_mapping[type(config)]


def resolved_model_config(spec: str, vocab_size: int) -> dict:
    """Every field of the config `spec` builds (defaults filled in), without the launch choices and
    version stamps: equal for two specs exactly when they describe the same model (a preset and a
    checkpoint saved from it, a JSON file listing the preset's fields)."""
    fields = build_config(spec, vocab_size).to_dict()
    for key in (*LAUNCH_FIELDS, "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return json.loads(json.dumps(fields))        # as it reads back from JSON
