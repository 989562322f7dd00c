"""Config of the CP model: FLA's `GatedDeltaNetConfig` plus how the sequence is split."""
from __future__ import annotations

import copy
import json

from fla.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetConfig
from transformers.utils import logging

from fla_cp.ops.backends import BACKENDS, merge_deprecated_backends

logger = logging.get_logger(__name__)

CP_LAYOUTS = ("contiguous", "zigzag")
# the names `backend` replaced (the operator's and the short conv's kernels, once two choices): taken by
# the constructor, `from_fla` and `from_pretrained` for one release (FutureWarning), mapped to `backend`;
# in a saved config.json (checkpoints saved before `backend`) they are mapped quietly
DEPRECATED_FIELDS = ("kernel_backend", "conv_backend")
# the fields this config adds to FLA's (cp_size, cp_layout, backend), then their deprecated aliases:
# the keywords `from_pretrained(..., **kwargs)` / `from_fla` take for them
CP_FIELDS = ("cp_size", "cp_layout", "backend") + DEPRECATED_FIELDS
_OWN_FIELDS = CP_FIELDS[:3]
# Fields never written to config.json. `cp_size` is a launch choice (how many ranks share one sequence),
# not a property of the weights: persisted, a checkpoint trained with CP=2 would need `cp_size=1` to load
# in one process and would load silently as dp2 x cp2 in a 4-rank world. The other CP fields are kept:
# `cp_layout` only matters when cp_size > 1 and is valid in any launch, and the backend ("auto" by
# default) is an explicit user choice that any launch can override with a keyword.
NOT_PERSISTED = ("cp_size",)


def check_cp_fields(cp_size, cp_layout, backend) -> None:
    if int(cp_size) < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    for name, value, allowed in (("cp_layout", cp_layout, CP_LAYOUTS), ("backend", backend, BACKENDS)):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _saved_backend(saved: dict) -> str:
    """`backend` from the deprecated fields of a saved config.json: the operator's choice, else the conv's
    ("fla" is "triton"); "auto" when neither chose. Quiet: the checkpoint, not the caller, holds them."""
    kernel, conv = saved.get("kernel_backend"), saved.get("conv_backend")
    conv = "triton" if conv == "fla" else conv
    for value in (kernel, conv):
        if isinstance(value, str) and value in BACKENDS and value != "auto":
            if value != conv and conv not in (None, "auto"):
                logger.warning(f"config.json holds kernel_backend={kernel!r} and "
                               f"conv_backend={saved['conv_backend']!r}, now one choice: loading as backend={value!r}")
            return value
    return "auto"


class GatedDeltaNetCPConfig(GatedDeltaNetConfig):
    """Every field of FLA's `GatedDeltaNetConfig`, plus:

    Args:
        cp_size: ranks per context-parallel group (1 = no CP). World size = dp x cp_size. Not saved by
            `save_pretrained` (a launch choice): pass it to `from_pretrained(..., cp_size=N)`. A `cp_size`
            in a loaded config.json (checkpoints saved before it stopped being written) is ignored.
        cp_layout: "contiguous" (rank r holds slice r) or "zigzag" (2P parts, r holds r and 2P-1-r).
        backend: the kernels of every layer's GDN operator and short conv: "auto" (Triton on CUDA:
            FLA's chunk kernels and `causal_conv1d`, and ours; PyTorch elsewhere), "triton" or "torch".
            Saved by `save_pretrained`; `from_pretrained(path, backend="torch")` overrides it.
        kernel_backend, conv_backend: deprecated aliases of `backend` (one release, FutureWarning; the
            conv's "fla" is "triton"); values other than "auto" must agree.

    `GatedDeltaNetCPConfig.from_fla(fla_config, cp_size=...)` converts FLA's config.
    """
    model_type = 'gated_deltanet_cp'

    def __init__(self, cp_size: int = 1, cp_layout: str = "contiguous", backend: str = "auto",
                 kernel_backend: str | None = None, conv_backend: str | None = None, **kwargs):
        backend = merge_deprecated_backends(backend, kernel_backend, conv_backend, who=type(self).__name__)
        check_cp_fields(cp_size, cp_layout, backend)
        # an FLA checkpoint's config.json says model_type="gated_deltanet"; ours is saved as ours
        kwargs.pop("model_type", None)
        self.cp_size = int(cp_size)
        self.cp_layout = cp_layout
        self.backend = backend
        super().__init__(**kwargs)

    @classmethod
    def from_fla(cls, config: GatedDeltaNetConfig, **cp_kwargs) -> GatedDeltaNetCPConfig:
        """This config from FLA's `GatedDeltaNetConfig` (or a copy of one of ours), with the CP fields
        (`cp_size`, `cp_layout`, `backend`; the deprecated `kernel_backend`, `conv_backend`) of
        `cp_kwargs` applied."""
        unknown = set(cp_kwargs) - set(CP_FIELDS)
        if unknown:
            raise TypeError(f"unexpected CP fields {sorted(unknown)}; expected some of {CP_FIELDS}")
        cp_kwargs = cls._map_deprecated(cp_kwargs, f"{cls.__name__}.from_fla")
        if isinstance(config, cls):
            new = copy.deepcopy(config)
            fields = {name: getattr(new, name) for name in _OWN_FIELDS}
            fields.update(cp_kwargs)
            check_cp_fields(**fields)
            fields["cp_size"] = int(fields["cp_size"])
            for name, value in fields.items():
                setattr(new, name, value)
            return new
        if not isinstance(config, GatedDeltaNetConfig):
            raise TypeError(f"{cls.__name__}.from_fla needs FLA's GatedDeltaNetConfig (or a {cls.__name__}), "
                            f"got {type(config).__name__}")
        # everything FLA's config holds, attributes loaded from its config.json included
        return cls.from_dict(config.to_dict(), **cp_kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """HF's `from_dict` (the loader of every config.json), where `config_dict` is a *saved* config: a
        `cp_size` in it (legacy checkpoints) is ignored; the CP fields passed as keywords win and are
        validated like constructor arguments."""
        config_dict = dict(config_dict)
        saved = config_dict.pop("cp_size", None)
        if saved not in (None, 1) and "cp_size" not in kwargs:
            logger.warning(f"ignoring cp_size={saved} saved in the config: the CP size is a launch choice; pass "
                           f"cp_size= to from_pretrained (default 1)")
        legacy = {name: config_dict.pop(name) for name in DEPRECATED_FIELDS if name in config_dict}
        if legacy and "backend" not in config_dict:
            config_dict["backend"] = _saved_backend(legacy)
        kwargs = cls._map_deprecated(kwargs, f"{cls.__name__}.from_pretrained")
        for name in _OWN_FIELDS:
            if name in kwargs:
                config_dict[name] = kwargs.pop(name)
        return super().from_dict(config_dict, **kwargs)

    @staticmethod
    def _map_deprecated(kwargs: dict, who: str) -> dict:
        """`kwargs` with the deprecated `kernel_backend` / `conv_backend` folded into `backend`
        (FutureWarning naming it; ValueError when they disagree)."""
        if not any(name in kwargs for name in DEPRECATED_FIELDS):
            return kwargs
        kwargs = dict(kwargs)
        deprecated = {name: kwargs.pop(name) for name in DEPRECATED_FIELDS if name in kwargs}
        kwargs["backend"] = merge_deprecated_backends(kwargs.get("backend", "auto"), **deprecated, who=who,
                                                      stacklevel=5)
        return kwargs

    @classmethod
    def from_json_file(cls, json_file):
        return cls.from_dict(cls._dict_from_json_file(json_file))

    def to_json_file(self, json_file_path, use_diff: bool = True):
        """HF's `to_json_file` (what `save_pretrained` writes) without the `NOT_PERSISTED` fields.

        `to_dict()` and `repr` keep them: only the file is a property of the checkpoint."""
        config_dict = json.loads(self.to_json_string(use_diff=use_diff))
        for name in NOT_PERSISTED:
            config_dict.pop(name, None)
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
