"""Gated DeltaNet with context parallelism, registered with the HF Auto classes on import.

Importing this package (`import fla_cp` does) maps, in `AutoModel` / `AutoModelForCausalLM`:
    - our config `GatedDeltaNetCPConfig` (model_type "gated_deltanet_cp") to our classes, and
    - FLA's `GatedDeltaNetConfig` (model_type "gated_deltanet", FLA's own checkpoints) to our classes
      too, replacing FLA's registration in this process. So

        AutoModelForCausalLM.from_pretrained(fla_checkpoint_dir, cp_size=4)

      loads an FLA GatedDeltaNet checkpoint as it is (same parameter names) into
      `GatedDeltaNetCPForCausalLM`, and so do `AutoModelForCausalLM.from_pretrained(fla_dir)` (no CP
      keyword: cp_size=1) and `AutoModelForCausalLM.from_config(fla_config)`. With cp_size=1 the model
      computes what FLA's `GatedDeltaNetForCausalLM` computes (and also runs on CPU). FLA's class stays
      available by name: `fla.models.GatedDeltaNetForCausalLM.from_pretrained(path)`; it also loads
      checkpoints saved by our model.

The config is converted by `GatedDeltaNetCPConfig.from_fla(fla_config, cp_size=...)`; a model saved by
ours writes model_type "gated_deltanet_cp" and no `cp_size` (a launch choice, see the config).
"""
from fla.models.gated_deltanet import GatedDeltaNetConfig
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
# FLA's config -> our classes (their `from_pretrained`/`_from_config` convert the config). Through the
# mapping's own `register`: the Auto classes' `register` insists that `model_class.config_class` is the
# config class. The import of `fla.models.gated_deltanet` above has run FLA's registration already, and
# a mapping holds one class per config class, so ours replaces it.
AutoModel._model_mapping.register(GatedDeltaNetConfig, GatedDeltaNetCPModel, exist_ok=True)
AutoModelForCausalLM._model_mapping.register(GatedDeltaNetConfig, GatedDeltaNetCPForCausalLM, exist_ok=True)

__all__ = ['GatedDeltaNetCPConfig', 'GatedDeltaNetCPForCausalLM', 'GatedDeltaNetCPModel', 'init_cp_mesh',
           'shift_labels_globally', 'sync_gradients']
