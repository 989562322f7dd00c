"""Model presets for the scripts: `--model_config tiny|small|base|<path>`.

A preset is a dict of GatedDeltaNetConfig fields; `<path>` is a JSON file of such fields or a
directory with a `config.json` (e.g. a checkpoint). FLA's fused Triton norm / SwiGLU / cross-entropy
are switched off so the same config runs on CPU; `vocab_size` and the special token ids always come
from the tokenizer, and the CP launch choices (`cp_size`, `cp_layout`) from the command line, never
from the file. `resolved_model_config` is the full config a spec stands for, to compare two specs.
"""
from __future__ import annotations

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
        fields = dict(PRESETS[spec])
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
