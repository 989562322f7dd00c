"""HF checkpoint adapters: torchtitan's Qwen3.5 text model (`Qwen35TextModel`, qwen3_5.py) and fla_cp's
GatedDeltaNet (gated_deltanet.py, FLA's checkpoint names).

Qwen3.5:

torchtitan's `Qwen35StateDictAdapter` converts the VLM's names (`model.language_model.*`, `model.visual.*`)
and the fused tensors (GatedDeltaNet `in_proj_qkv` / `conv1d`, MoE `gate_up_proj`). The text model needs
three changes on top, all here:

- names: transformers' `Qwen3_5ForCausalLM` writes `model.*`, its `Qwen3_5ForConditionalGeneration`
  `model.language_model.*` plus a vision tower (`model.visual.*`) and possibly an MTP head (`mtp.*`).
  `from_hf` takes either and drops what the text model lacks; `to_hf` writes the text names, which
  `Qwen3_5ForCausalLM` loads.
- tied embeddings: a tied checkpoint has no `lm_head.weight`; `from_hf` takes it from the embedding.
- torchtitan's checkpointer (`--checkpoint.initial_load_in_hf`) builds its read template with `to_hf` (the
  text names) and `dcp.load`s it strictly, then calls `from_hf`. `get_hf_storage_reader` returns a reader that
  serves the text names from a VLM file and `lm_head.weight` from the embedding of a tied one, so the same
  template reads both kinds of checkpoint (vision and MTP tensors are never requested).
"""
from __future__ import annotations

import dataclasses
import re

from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.models.qwen3_5.state_dict_adapter import Qwen35StateDictAdapter
from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.tools.logging import logger

VLM_PREFIX = "model.language_model."
TEXT_PREFIX = "model."
# weights of the VLM that the text model has no place for: the vision tower, the multi-token-prediction head
NOT_TEXT = ("model.visual.", "mtp.")
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def text_name(hf_key: str) -> str:
    """A VLM checkpoint key under `Qwen3_5ForCausalLM`'s name (`model.language_model.X` -> `model.X`)."""
    return TEXT_PREFIX + hf_key[len(VLM_PREFIX):] if hf_key.startswith(VLM_PREFIX) else hf_key


def vlm_name(hf_key: str) -> str:
    """A text checkpoint key under the VLM's name, the one torchtitan's adapter maps (`model.X` ->
    `model.language_model.X`)."""
    if hf_key.startswith(TEXT_PREFIX) and not hf_key.startswith((VLM_PREFIX, *NOT_TEXT)):
        return VLM_PREFIX + hf_key[len(TEXT_PREFIX):]
    return hf_key


class TextCheckpointReader(HuggingFaceStorageReader):
    """torch's HF safetensors reader that also answers to the text model's names: `model.X` reads a VLM
    file's `model.language_model.X`, and `lm_head.weight` reads the embedding where the file has none
    (tied). Every rank reads the metadata (`dcp.load`), so every rank knows the aliases."""

    def read_metadata(self):
        metadata = super().read_metadata()
        keys = set(metadata.state_dict_metadata)
        self.file_key = {text_name(k): k for k in keys if k.startswith(VLM_PREFIX) and text_name(k) not in keys}
        if LM_HEAD not in keys:
            embed = next((k for k in (EMBED, vlm_name(EMBED)) if k in keys), None)
            if embed is not None:
                self.file_key[LM_HEAD] = embed
        stored = {}
        for index, info in metadata.storage_data.items():
            stored.setdefault(index.fqn, []).append((index, info))
        for name, key in self.file_key.items():
            metadata.state_dict_metadata[name] = metadata.state_dict_metadata[key]
            for index, info in stored[key]:
                metadata.storage_data[dataclasses.replace(index, fqn=name)] = info
        return metadata

    # torch's per-tensor read (a private method; were it renamed, an alias would fail loudly in safetensors'
    # get_slice, never read the wrong tensor)
    def _process_read_request(self, f, req, planner) -> None:
        key = self.file_key.get(req.storage_index.fqn)
        if key is not None:         # the file's own name; the destination (req.dest_index) stays the template's
            req = dataclasses.replace(req, storage_index=dataclasses.replace(req.storage_index, fqn=key))
        super()._process_read_request(f, req, planner)


class Qwen35TextStateDictAdapter(Qwen35StateDictAdapter):
    """torchtitan's Qwen3.5 adapter for the text model: reads transformers' text and VLM checkpoints, tied
    or not, and writes what `Qwen3_5ForCausalLM` loads (module docstring). MoE keys are torchtitan's."""

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        if self.fqn_to_index_mapping:
            # the index of a VLM checkpoint (torchtitan saves into the same files when it writes HF):
            # under the text names, without the tensors the text model lacks
            mapping = {text_name(k): i for k, i in self.fqn_to_index_mapping.items() if not k.startswith(NOT_TEXT)}
            if not getattr(model_config, "enable_weight_tying", False) and EMBED in mapping:
                mapping.setdefault(LM_HEAD, mapping[EMBED])    # an untied model writes lm_head (a tied file has none)
            self.fqn_to_index_mapping = mapping

    def to_hf(self, state_dict):
        """`Qwen3_5ForCausalLM`'s names; no `lm_head.weight` for a tied model (torchtitan's rule)."""
        return {text_name(k): v for k, v in super().to_hf(state_dict).items()}

    def from_hf(self, hf_state_dict):
        """From text (`model.*`) or VLM (`model.language_model.*`) names; vision and MTP weights are dropped,
        and a missing `lm_head.weight` (tied) is the embedding (torchtitan's adapter fills it)."""
        text_only = {vlm_name(k): v for k, v in hf_state_dict.items() if not k.startswith(NOT_TEXT)}
        return super().from_hf(text_only)

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> HuggingFaceStorageReader:
        if from_quantized:
            logger.warning("Loading from quantized checkpoint format is not supported for this model.")
        return TextCheckpointReader(path)


# ------------------------------------------------------------------------------ FLA GatedDeltaNet
# FLA name -> torchtitan name, per submodule of a block (the first name after it; the rest is kept)
_GDN_NAMES = {"q_proj": "in_proj_q", "k_proj": "in_proj_k", "v_proj": "in_proj_v", "g_proj": "in_proj_z",
              "a_proj": "in_proj_a", "b_proj": "in_proj_b", "q_conv1d": "conv_q", "k_conv1d": "conv_k",
              "v_conv1d": "conv_v", "o_norm": "norm", "o_proj": "out_proj", "A_log": "A_log", "dt_bias": "dt_bias"}
_ATTN_NAMES = {name: name for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
_MLP_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_NORM_NAMES = {"weight": "weight"}
_TOP_NAMES = {"model.embeddings.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(attn|mlp|attn_norm|mlp_norm)\.([^.]+)(.*)")
_TT_LAYER = re.compile(r"layers\.(\d+)\.(attn|mlp|attn_norm|mlp_norm)\.([^.]+)(.*)")


class GatedDeltaNetStateDictAdapter(StateDictAdapter):
    """FLA's GatedDeltaNet checkpoint keys (HF format: `model.embeddings.weight`, `model.layers.{i}.attn.*`,
    `...attn_norm`, `...mlp.gate_proj`, `model.norm.weight`, `lm_head.weight`) <-> this model's. Tensors are
    renamed only (no split or transpose). With tied embeddings a checkpoint holds the embedding alone, as
    HF's `save_pretrained` writes it: `to_hf` drops `lm_head.weight`, `from_hf` fills it from the embedding."""

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.gdn_layers = {i for i, layer in enumerate(model_config.layers) if layer.delta_net is not None}
        self.tied = model_config.enable_weight_tying

    def _rename(self, key: str, to_hf: bool) -> str:
        top = {tt: hf for hf, tt in _TOP_NAMES.items()} if to_hf else _TOP_NAMES
        if key in top:
            return top[key]
        match = (_TT_LAYER if to_hf else _HF_LAYER).fullmatch(key)
        if match is not None:
            layer, part, name, rest = match.groups()
            names = {"mlp": _MLP_NAMES, "attn_norm": _NORM_NAMES, "mlp_norm": _NORM_NAMES,
                     "attn": _GDN_NAMES if int(layer) in self.gdn_layers else _ATTN_NAMES}[part]
            if to_hf:
                names = {tt: hf for hf, tt in names.items()}
            if name in names:
                return f"{'model.layers' if to_hf else 'layers'}.{layer}.{part}.{names[name]}{rest}"
        raise ValueError(f"GatedDeltaNetStateDictAdapter: no {'FLA' if to_hf else 'torchtitan'} name for "
                         f"{key!r} (a checkpoint of another architecture or config?)")

    def to_hf(self, state_dict: dict) -> dict:
        hf = {}
        for key, value in state_dict.items():
            if self.tied and key == "lm_head.weight":
                if self.fqn_to_index_mapping:
                    self.fqn_to_index_mapping.pop("lm_head.weight", None)
                continue
            hf[self._rename(key, to_hf=True)] = value
        return hf

    def from_hf(self, hf_state_dict: dict) -> dict:
        state = {self._rename(key, to_hf=False): value for key, value in hf_state_dict.items()
                 if not (self.tied and key == "lm_head.weight")}
        if self.tied:
            state["lm_head.weight"] = state["tok_embeddings.weight"]
        return state
