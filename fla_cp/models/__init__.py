"""HF models with context parallelism; importing registers them with the Auto classes."""
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
