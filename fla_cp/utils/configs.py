"""Model presets for the scripts: `--model_config <preset>|<path>` (`PRESETS`: tiny, small, base, and the
hybrids hybrid-tiny, hybrid-small, hybrid-base, hybrid-small-swa).

A preset is a dict of GatedDeltaNetConfig fields; `<path>` is a JSON file of such fields or a
directory with a `config.json` (e.g. a checkpoint). FLA's fused Triton norm / SwiGLU / cross-entropy
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


def model_config_kwargs(spec: str, vocab_size: int, **overrides) -> dict:
    """GatedDeltaNetCPConfig keyword arguments for a preset name or a JSON / config directory path."""
    if spec in PRESETS:
        fields = copy.deepcopy(PRESETS[spec])      # a hybrid's `attn` is a dict / list: not shared
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--model_config {spec!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file")
        fields = json.loads(path.read_text())
        for key in ("architectures", "model_type", "transformers_version", "auto_map", "dtype", "torch_dtype",
                    *LAUNCH_FIELDS, *TOKENIZER_FIELDS):
            fields.pop(key, None)
    fields.update(CPU_SAFE)
    fields["vocab_size"] = vocab_size
    fields.update(overrides)
    return fields


def resolved_model_config(spec: str, vocab_size: int) -> dict:
    """Every field of the config `spec` builds (defaults filled in), without the launch choices and
    version stamps: equal for two specs exactly when they describe the same model (a preset and a
    checkpoint saved from it, a JSON file listing the preset's fields)."""
    from fla_cp.models import GatedDeltaNetCPConfig
    fields = GatedDeltaNetCPConfig(**model_config_kwargs(spec, vocab_size)).to_dict()
    for key in (*LAUNCH_FIELDS, "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return json.loads(json.dumps(fields))        # as it reads back from JSON
