"""HF models with context parallelism; importing registers them with the Auto classes.

FLA's GatedDeltaNet (pure and hybrid) always; transformers' Qwen3.5, Qwen3.5-MoE and Qwen3-Next text
models where the installed transformers has them (`QWEN_FAMILIES_MISSING` names the reason otherwise).
"""
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

QWEN_FAMILIES_MISSING = None
try:
    from fla_cp.models.qwen3_5_cp import Qwen3_5CPForCausalLM, Qwen3_5CPTextModel
    from fla_cp.models.qwen3_5_moe_cp import Qwen3_5MoeCPForCausalLM, Qwen3_5MoeCPTextModel
    from fla_cp.models.qwen3_next_cp import Qwen3NextCPForCausalLM, Qwen3NextCPModel
    __all__ += ['Qwen3_5CPForCausalLM', 'Qwen3_5CPTextModel', 'Qwen3_5MoeCPForCausalLM', 'Qwen3_5MoeCPTextModel',
                'Qwen3NextCPForCausalLM', 'Qwen3NextCPModel']
except ImportError as e:     # a transformers release older than these models
    QWEN_FAMILIES_MISSING = f"the installed transformers has no Qwen3.5 / Qwen3-Next models ({e})"
