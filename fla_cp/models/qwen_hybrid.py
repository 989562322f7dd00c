"""The CP plumbing shared by transformers' Qwen3.5 / Qwen3.5-MoE / Qwen3-Next text models.

A family's modeling file (`fla_cp/models/qwen3_5_cp/` ...) declares its CP classes as subclasses of
transformers' own (same parameter names: checkpoints load unchanged) and of these mixins:

- `QwenCPPreTrainedMixin`: the CP launch fields (`cp_size`, `cp_layout`, `backend`) as keywords of
  `from_pretrained` / `from_config`, kept on the config object but never written to config.json (a
  saved checkpoint is transformers' own); `device_mesh=` / `cp_group=` (`CPModelMixin`).
- `QwenCPTextModelMixin`: builds transformers' text model, then turns its token mixers into their CP
  subclasses (`cp_layer_classes`: the same modules, parameters untouched). Its `forward` splits the
  call (`CPModelMixin.cp_enter`: the check, the shard, the embedding), computes the RoPE positions of
  this rank's tokens (global, per document; or the given `position_ids`, sharded), and runs
  transformers' own forward on the local tokens with the padding masks given as transformers' per-layer
  mask mapping (which skips its mask creation: its recurrent mask slice would pick the wrong columns of
  a shard), so its output recording (hidden states, router logits) stays transformers'.
- `QwenCPForCausalLMMixin`: the CP causal-LM forward (`CPForCausalLMMixin`: global label shift and
  loss, local or gathered logits, generation) plus the MoE router's load-balancing loss from global
  statistics (`fla_cp.parallel.moe`).

Training forwards default to `use_cache=False` (transformers' config default, True, would build and
gather a cache every step); eval forwards keep transformers' default.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache

from fla_cp.layers.attention_cp import rope_positions
from fla_cp.models.gated_deltanet_cp.configuration_gated_deltanet_cp import check_cp_fields
from fla_cp.models.hf_compat import one_cache
from fla_cp.ops.chunk_cp import _single_process_context
from fla_cp.parallel import CPForCausalLMMixin, CPModelMixin

# the keywords that set how a model runs under CP (a launch choice, not saved), and their defaults
CP_DEFAULTS = {"cp_size": 1, "cp_layout": "contiguous", "backend": "auto"}


def with_cp_fields(config, **cp_kwargs):
    """`config` carrying the CP fields (a copy when any is given), validated; defaults where unset."""
    if cp_kwargs:
        config = copy.deepcopy(config)
    for name, default in CP_DEFAULTS.items():
        value = cp_kwargs.get(name, getattr(config, name, default))
        setattr(config, name, int(value) if name == "cp_size" and isinstance(value, (int, float)) else value)
    check_cp_fields(config.cp_size, config.cp_layout, config.backend)
    return config


def _pop_cp_kwargs(kwargs: dict) -> dict:
    return {name: kwargs.pop(name) for name in CP_DEFAULTS if name in kwargs}


class QwenCPPreTrainedMixin(CPModelMixin):
    """CP launch fields on transformers' config (module docstring); mixed in before transformers' class."""

    # transformers' flag for its own (torch) context parallelism, which refuses linear-attention layers:
    # this model's CP is exact for them
    _supports_context_parallel = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, plus `cp_size=`, `cp_layout=`, `backend=` and `device_mesh=`
        (dims ("dp", "cp")) or `cp_group=`. A VLM checkpoint's config (Qwen3.5's `text_config`) gives the
        text model, as transformers' own `*ForCausalLM` does. A checkpoint of another model type raises
        (transformers would only warn, then load what matches by name into a randomly initialised model)."""
        cp_kwargs = _pop_cp_kwargs(kwargs)
        config = kwargs.pop("config", None)
        if config is None:
            check_checkpoint_model_type(cls, pretrained_model_name_or_path,
                                        {k: kwargs[k] for k in _LOCATION_KWARGS if k in kwargs})
            config, kwargs = _load_config(cls.config_class, pretrained_model_name_or_path, kwargs)
        elif not isinstance(config, cls.config_class):
            config = _text_config_of(config, cls.config_class)
        kwargs["config"] = with_cp_fields(config, **cp_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """transformers' answer for the class this one subclasses. transformers decides by looking for
        `@use_experts_implementation` in the class's module source: never in ours, though the experts are
        transformers' own modules. Its answer is cached per class and inherited, so ours depended on which
        classes the process had built before (after transformers' MoE causal LM, ours asked its text model
        for "grouped_mm", which refused it: the load failed)."""
        base = next(c for c in cls.__mro__
                    if issubclass(c, PreTrainedModel) and c.__module__.startswith("transformers."))
        return base._can_set_experts_implementation()

    @classmethod
    def _from_config(cls, config, **kwargs):
        """transformers' hook behind `AutoModel*.from_config(config, cp_size=...)`."""
        config = with_cp_fields(_text_config_of(config, cls.config_class), **_pop_cp_kwargs(kwargs))
        return super()._from_config(config, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """transformers' `save_pretrained`, writing transformers' config.json (no CP launch fields)."""
        saved = {name: self.config.__dict__.pop(name) for name in CP_DEFAULTS if name in self.config.__dict__}
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.config.__dict__.update(saved)


# the `from_pretrained` keywords that say where config.json is (read from there, and kept for the weights)
_LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder",
                    "gguf_file")


def checkpoint_model_types(config_class) -> tuple[str, ...]:
    """The model_types of the checkpoints a CP model of `config_class` loads: its own, and those of the
    VLM configs (in the same transformers module) whose `text_config` it is (Qwen3.5's "qwen3_5")."""
    module = sys.modules[config_class.__module__]
    vlm = [obj.model_type for obj in vars(module).values()
           if isinstance(obj, type) and issubclass(obj, PretrainedConfig)
           and getattr(obj, "sub_configs", {}).get("text_config") is config_class]
    return (config_class.model_type, *sorted(vlm))


def check_checkpoint_model_type(cls, pretrained_model_name_or_path, location: dict) -> None:
    """ValueError unless the checkpoint's config.json is of a model type `cls` loads (`checkpoint_model_types`);
    also when it has none (transformers reads a directory without config.json as the config class's
    defaults: a full-size model)."""
    config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **location)
    found = config_dict.get("model_type")
    supported = checkpoint_model_types(cls.config_class)
    if found not in supported:
        what = f"is a checkpoint of model_type {found!r}" if found else "has no model_type (no config.json?)"
        raise ValueError(f"{cls.__name__}.from_pretrained: pretrained_model_name_or_path="
                         f"{str(pretrained_model_name_or_path)!r} {what}; {cls.__name__} loads model_type "
                         f"{' or '.join(repr(t) for t in supported)} checkpoints (AutoModelForCausalLM picks the "
                         f"class of a model type)")


def _load_config(config_class, pretrained_model_name_or_path, kwargs: dict):
    """(config, the keywords left for the model), as `AutoModelForCausalLM.from_pretrained` reads them:
    keywords naming a config field update it (`output_router_logits=True`), the location keywords stay
    for the weights, and an explicit dtype / quantization_config goes on to the model (transformers'
    `from_pretrained` given a config object hands every other keyword to the model's `__init__`)."""
    given = dict(kwargs)
    location = {k: kwargs.pop(k) for k in _LOCATION_KWARGS if k in kwargs}
    for key in ("dtype", "torch_dtype"):
        if kwargs.get(key) == "auto":       # not a config value
            kwargs.pop(key)
    kwargs.pop("quantization_config", None)
    config, kwargs = config_class.from_pretrained(pretrained_model_name_or_path, return_unused_kwargs=True,
                                                  **location, **kwargs)
    kwargs.update(location)
    for key in ("dtype", "torch_dtype", "quantization_config"):
        if given.get(key) is not None:
            kwargs[key] = given[key]
    return config, kwargs


def _text_config_of(config, config_class):
    """The text config a CP text model takes: `config` itself, or a VLM config's `text_config`."""
    if isinstance(config, config_class):
        return config
    text = getattr(config, "text_config", None)
    if isinstance(text, config_class):
        for name in CP_DEFAULTS:        # CP fields given on the outer config
            if hasattr(config, name) and not hasattr(text, name):
                setattr(text, name, getattr(config, name))
        return text
    raise TypeError(f"expected a {config_class.__name__} (or a config whose text_config is one), got "
                    f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r})")


class QwenCPTextModelMixin(QwenCPPreTrainedMixin):
    """transformers' text model with CP token mixers and a CP forward (module docstring). The family sets
    `cp_layer_classes`: {decoder attribute ("linear_attn", "self_attn"): its CP subclass}."""

    cp_layer_classes: dict = {}

    def __init__(self, config, device_mesh=None, cp_group=None):
        config = with_cp_fields(config)
        super().__init__(config)
        self.setup_cp(config, device_mesh, cp_group)
        backend = config.backend
        for layer in self.layers:
            for name, cls in self.cp_layer_classes.items():
                mixer = getattr(layer, name, None)
                if mixer is not None:
                    # the CP subclass adds no parameters: the module (built and initialised by transformers,
                    # as in its own model) becomes one, rather than being built twice
                    mixer.__class__ = cls
                    mixer.backend = backend if name == "linear_attn" or backend == "torch" else "auto"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, cu_seqlens=None, inputs_are_sharded: bool = False,
                cp_context=None, _cp_loss=None, return_dict=None, **kwargs):
        """This rank's final hidden states `[B, T_loc, D]` (docs/models.md); `output.cp_context` is the
        call's `CPContext` (None without CP, and for a call that runs replicated)."""
        cache = one_cache(cache, past_key_values, type(self).__name__)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # this family's own input errors and what they follow from go into the forward's cross-rank check
        # (`_forward_fields`): under CP one rank's bad input raises on every rank, never a hang
        error = self._family_input_error(input_ids, inputs_embeds, attention_mask, position_ids,
                                         inputs_are_sharded, kwargs)
        dropout = getattr(self.config, "attention_dropout", 0.0)
        if error is None and self.training and dropout:
            # transformers drops attention probabilities in training; attention_cp has no dropout: refused,
            # not silently trained without it
            error = (f"config.attention_dropout={dropout}: attention dropout is not supported (fla_cp's attention "
                     f"applies none); set it to 0.0 (transformers' default) or run in eval mode")
        self._cp_call_fields = [bool(kwargs.get("output_router_logits")),
                                *(tuple(position_ids.shape) if torch.is_tensor(position_ids) else (-1,))][:5]
        if error and self.cp_size == 1:
            raise ValueError(f"{type(self).__name__}: {error}")
        hidden_states, cp, cu_seqlens = self.cp_enter(
            input_ids, inputs_embeds, attention_mask=attention_mask, cu_seqlens=cu_seqlens, past_key_values=cache,
            use_cache=use_cache, inputs_are_sharded=inputs_are_sharded, cp_context=cp_context, loss_args=_cp_loss,
            extra_error=error)
        position_ids = self._cp_positions(position_ids, hidden_states, cp, cu_seqlens, cache, inputs_are_sharded)
        out = super().forward(
            inputs_embeds=hidden_states, attention_mask={"full_attention": attention_mask,
                                                         "linear_attention": attention_mask},
            position_ids=position_ids, cache=cache, use_cache=use_cache, cp_context=cp,
            cu_seqlens=cu_seqlens if cp is None else None,
            # the layers' own cross-rank check is `cp_enter`'s, done once for all of them: none per layer
            verify_agreement=False, **kwargs)
        out.cp_context = cp
        return out if return_dict is not False else out.to_tuple()

    @staticmethod
    def _family_input_error(input_ids, inputs_embeds, attention_mask, position_ids, inputs_are_sharded,
                            kwargs) -> str | None:
        """What is wrong with this call's own inputs (beyond `cp_enter`'s checks), or None. Local, free."""
        if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.dim() != 2):
            got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            return (f"attention_mask must be a [B, T] 0/1 padding mask (the layers build their causal / "
                    f"per-document masks), got {got}")
        for name in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
            if kwargs.get(name) is not None:
                return f"{name}: vision inputs are not supported (text models)"
        inputs = input_ids if input_ids is not None else inputs_embeds
        if position_ids is not None and torch.is_tensor(inputs) and inputs.dim() >= 2:
            T = inputs.shape[1]
            if not torch.is_tensor(position_ids) or position_ids.dim() not in (2, 3) or position_ids.shape[-1] != T:
                got = tuple(position_ids.shape) if torch.is_tensor(position_ids) else type(position_ids).__name__
                what = "this rank's shard" if inputs_are_sharded else "the call's tokens"
                return (f"position_ids has shape {got}, expected [B, {T}] (or [3 or 4, B, {T}]): one position "
                        f"per token of {what}")
        return None

    def _forward_fields(self, *args, **kwargs):
        """`CPModelMixin`'s agreement fields, plus the MoE router's: the causal LM's load-balancing loss
        all-reduces [E] statistics when the call records router logits; ranks differing in E, top-k, the
        MoE layers or the flag made that all-reduce fail in gloo, or hang, and a differing top-k or
        coefficient gave a loss of neither configuration."""
        fields, error = super()._forward_fields(*args, **kwargs)
        static = self.__dict__.get("_cp_router_sizes")
        if static is None:
            config = self.config
            moe_layers = sum(1 for layer in self.layers if hasattr(getattr(layer, "mlp", None), "experts"))
            static = self.__dict__["_cp_router_sizes"] = [
                getattr(config, "num_experts", 0) or 0, getattr(config, "num_experts_per_tok", 0) or 0, moe_layers,
                float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)]
        fields["MoE router (experts, per token, MoE layers, aux loss coefficient, router logits recorded)"] = \
            static + self._cp_call_fields[:1]
        fields["position_ids (shape; -1: none)"] = self._cp_call_fields[1:] + [0] * (5 - len(self._cp_call_fields))
        return fields, error

    def _cp_positions(self, position_ids, hidden_states, cp, cu_seqlens, cache, inputs_are_sharded):
        """RoPE positions of this rank's tokens `[B, T_loc]` (or the given ones' shard, `[..., B, T_loc]`):
        by default as transformers counts them, the cached tokens plus the index in the row, or in the
        document when packed (transformers' packed reference: one run per document)."""
        B, T = hidden_states.shape[:2]
        if position_ids is not None:
            if cp is not None and not inputs_are_sharded:
                # (its length is checked, on every rank: `_family_input_error`)
                position_ids = cp.shard(position_ids, dim=position_ids.dim() - 1)
            return position_ids
        ctx = cp
        if ctx is None:
            ctx, error = _single_process_context(T, cu_seqlens)
            if error:
                raise ValueError(f"{type(self).__name__}: {error}")
        past = int(cache.get_seq_length()) if cache is not None else 0
        return (rope_positions(ctx, hidden_states.device) + past).unsqueeze(0).expand(B, -1)


class QwenCPForCausalLMMixin(QwenCPPreTrainedMixin, CPForCausalLMMixin):
    """The CP causal LM of a family (module docstring). The family sets `text_model_class`."""

    text_model_class = None

    def __init__(self, config, device_mesh=None, cp_group=None):
        config = with_cp_fields(config)
        # transformers' *ForCausalLM.__init__, with the CP text model in place of transformers' (built once)
        PreTrainedModel.__init__(self, config)
        self.model = self.text_model_class(config, device_mesh=device_mesh, cp_group=cp_group)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "num_experts", 0):
            self.router_aux_loss_coef = config.router_aux_loss_coef
            self.num_experts = config.num_experts
            self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, cu_seqlens=None,
                inputs_are_sharded: bool = False, gather_logits: bool = False, shift_labels=None, cp_context=None,
                num_items_in_batch=None, output_router_logits=None, return_dict=None, **kwargs):
        """Logits and the global loss under CP (docs/models.md), with the MoE load-balancing loss from the
        whole CP group's router statistics when `output_router_logits` (transformers' argument / config)."""
        if getattr(self.config, "num_experts", 0):
            if output_router_logits is None:
                output_router_logits = getattr(self.config, "output_router_logits", False)
            kwargs["output_router_logits"] = output_router_logits
        return self.cp_causal_lm_forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            past_key_values=past_key_values, labels=labels, use_cache=use_cache, return_dict=return_dict,
            logits_to_keep=logits_to_keep, num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens,
            inputs_are_sharded=inputs_are_sharded, gather_logits=gather_logits, shift_labels=shift_labels,
            cp_context=cp_context, cache=cache, position_ids=position_ids, **kwargs)

    def _cp_aux_loss(self, outputs, cp, attention_mask):
        """(the router's load-balancing loss over the global batch, its weight in the loss), or None: the
        counts, probabilities and rows of every CP rank are summed before the product (`fla_cp.parallel.moe`)."""
        router_logits = outputs.get("router_logits")
        if not getattr(self.config, "num_experts", 0) or not router_logits:
            return None
        from fla_cp.parallel.moe import load_balancing_loss_cp
        T = outputs.last_hidden_state.shape[1]
        mask = attention_mask
        if mask is not None and cp is not None and not cp.packed:
            mask = mask[:, -cp.total_len:]
            mask = cp.shard(mask, dim=1) if mask.shape[1] != T else mask
        elif mask is not None:
            mask = None if cp is not None else mask[:, -T:]
        aux = load_balancing_loss_cp(router_logits, self.num_experts, self.num_experts_per_tok, mask,
                                     group=cp.group if cp is not None else None)
        return aux, self.router_aux_loss_coef


def register_family(model_type: str, config_classes: tuple, causal_lm_class) -> None:
    """Map the family's configs to its CP causal LM in `AutoModelForCausalLM` (replacing transformers'
    class in this process: with cp_size 1 ours computes what it computes), and keep
    transformers' checkpoint conversions for them (transformers skips them for classes defined outside
    it unless their model_type is registered: e.g. Qwen3.5 VLM checkpoints' `model.language_model.*`, the
    MoE checkpoints' per-expert weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    # Not `AutoModel`: transformers' Qwen3.5 VLMs build their language model through it (vision
    # positions, visual embeddings): they keep transformers' text model. Ours is used by name.
    for config_class in config_classes:
        AutoModelForCausalLM._model_mapping.register(config_class, causal_lm_class, exist_ok=True)
    mapping = get_checkpoint_conversion_mapping(model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)
