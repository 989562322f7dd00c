from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_cp.models.gated_deltanet_cp.configuration_gated_deltanet_cp import GatedDeltaNetCPConfig
from fla_cp.models.gated_deltanet_cp.modeling_gated_deltanet_cp import (
    GatedDeltaNetCPForCausalLM,
    GatedDeltaNetCPModel,
    init_cp_mesh,
    shift_labels_globally,
    sync_gradients,
)

AutoConfig.register(GatedDeltaNetCPConfig.model_type, GatedDeltaNetCPConfig, exist_ok=True)
AutoModel.register(GatedDeltaNetCPConfig, GatedDeltaNetCPModel, exist_ok=True)
AutoModelForCausalLM.register(GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, exist_ok=True)

__all__ = ['GatedDeltaNetCPConfig', 'GatedDeltaNetCPForCausalLM', 'GatedDeltaNetCPModel', 'init_cp_mesh',
           'shift_labels_globally', 'sync_gradients']
