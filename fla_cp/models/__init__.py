"""HF models with context parallelism; importing registers them with the Auto classes.

FLA's GatedDeltaNet (pure and hybrid) always; transformers' Qwen3.5, Qwen3.5-MoE and Qwen3-Next text
models with transformers >= `QWEN_MIN_TRANSFORMERS` (`QWEN_FAMILIES_MISSING` says why they are missing
otherwise).
"""
import transformers
from packaging import version as _version

from fla_cp.models.gated_deltanet_cp import (
    GatedDeltaNetCPConfig,
    GatedDeltaNetCPForCausalLM,
    GatedDeltaNetCPModel,
    init_cp_mesh,
    shift_labels_globally,
    sync_gradients,
)
from fla_cp.models.hf_compat import output_cache

__all__ = ['GatedDeltaNetCPConfig', 'GatedDeltaNetCPForCausalLM', 'GatedDeltaNetCPModel', 'init_cp_mesh',
           'output_cache', 'shift_labels_globally', 'sync_gradients']

# The Qwen families build on transformers' modules, masks and cache classes as of this release (the
# first tested: earlier ones changed them, and their own Qwen models fail on CPU where FLA is installed,
# so nothing could be compared there).
QWEN_MIN_TRANSFORMERS = "5.25.0"
QWEN_FAMILIES_MISSING = None
if _version.parse(transformers.__version__) < _version.parse(QWEN_MIN_TRANSFORMERS):
    QWEN_FAMILIES_MISSING = (f"fla_cp's Qwen3.5 / Qwen3.5-MoE / Qwen3-Next CP models need transformers >= "
                             f"{QWEN_MIN_TRANSFORMERS}, found {transformers.__version__}")
else:
    from fla_cp.models.qwen3_5_cp import Qwen3_5CPForCausalLM, Qwen3_5CPTextModel
    from fla_cp.models.qwen3_5_moe_cp import Qwen3_5MoeCPForCausalLM, Qwen3_5MoeCPTextModel
    from fla_cp.models.qwen3_next_cp import Qwen3NextCPForCausalLM, Qwen3NextCPModel
    __all__ += ['Qwen3_5CPForCausalLM', 'Qwen3_5CPTextModel', 'Qwen3_5MoeCPForCausalLM', 'Qwen3_5MoeCPTextModel',
                'Qwen3NextCPForCausalLM', 'Qwen3NextCPModel']


def __getattr__(name: str):
    """A Qwen class asked for where the installed transformers is too old: say so (not a bare AttributeError)."""
    if name.startswith("Qwen") and QWEN_FAMILIES_MISSING:
        raise ImportError(QWEN_FAMILIES_MISSING)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
