"""Gated DeltaNet language model with exact context parallelism (CP), loading FLA checkpoints unchanged.

FLA's `GatedDeltaNetModel` / `GatedDeltaNetForCausalLM` (same classes' structure and parameter names)
with the mixer replaced by `fla_cp.layers.GatedDeltaNetCP`; all CP plumbing (process groups, the split
of the inputs, the cross-rank check, the global loss, generation) comes from `fla_cp.parallel`.

    import fla_cp    # maps `gated_deltanet_cp` and FLA's `gated_deltanet` to these classes
    model = AutoModelForCausalLM.from_pretrained(path, cp_size=4)      # every CP rank: the same full batch
    out = model(input_ids=ids, labels=ids)     # out.loss: the global token mean, the same on all CP ranks
    out.loss.backward(); sync_gradients(model); optimizer.step()

The forward's arguments beyond HF's (`cu_seqlens`, `attention_mask`, `inputs_are_sharded`, `shift_labels`,
`gather_logits`, `cp_context`), the loss and gradient conventions, caches, generation, checks and limits:
docs/models.md. The math: docs/DESIGN.md.
"""
from __future__ import annotations

import torch.nn as nn
from fla.models.cache_utils import Cache
from fla.models.gated_deltanet.modeling_gated_deltanet import GatedDeltaNetPreTrainedModel
from fla.models.generation_utils import FLAUnsupportedCacheGenerationMixin
from fla.models.configuration_utils import get_attention_spec
from fla.models.modeling_utils import FLAForCausalLM
from fla.modules import GatedMLP, RMSNorm
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from fla_cp.checks import IGNORE_INDEX  # noqa: F401  (re-exported)
from fla_cp.layers import AttentionCP, GatedDeltaNetCP
from fla_cp.layers.functional import gated_mlp, rms_norm
from fla_cp.models.gated_deltanet_cp.configuration_gated_deltanet_cp import CP_FIELDS, GatedDeltaNetCPConfig
from fla_cp.models.hf_compat import cache_field, one_cache
from fla_cp.parallel import CPForCausalLMMixin, CPModelMixin
from fla_cp.parallel.gradients import sync_gradients  # noqa: F401  (re-exported)
from fla_cp.parallel.loss import shift_labels_globally  # noqa: F401  (re-exported)
from fla_cp.parallel.mesh import init_cp_mesh  # noqa: F401  (re-exported)


class GatedDeltaNetCPBlock(GradientCheckpointingLayer):
    """FLA's GatedDeltaNetBlock (same submodule names), with a CP mixer (GatedDeltaNetCP, or AttentionCP for
    a hybrid config's `attn` layers) and CPU-capable norms/MLP."""

    def __init__(self, config: GatedDeltaNetCPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn_norm = (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        spec = get_attention_spec(config.attn, layer_idx=layer_idx)
        if spec is not None:
            # a hybrid config's softmax-attention layer: FLA's `get_attention` arguments (FLA passes no qk_norm)
            try:
                self.attn = AttentionCP(
                    hidden_size=config.hidden_size, num_heads=spec['num_heads'], num_kv_heads=spec['num_kv_heads'],
                    qkv_bias=spec['qkv_bias'], window_size=spec['window_size'], rope_theta=spec['rope_theta'],
                    max_position_embeddings=config.max_position_embeddings, layer_idx=layer_idx,
                    backend="torch" if config.backend == "torch" else "auto")
            except ValueError as e:
                raise ValueError(f"config.attn (layer {layer_idx}): {e}") from None
        else:
            self.attn = GatedDeltaNetCP(
                hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
                num_heads=config.num_heads, num_v_heads=config.num_v_heads, mode=config.attn_mode,
                use_gate=config.use_gate, use_short_conv=config.use_short_conv,
                allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size, layer_idx=layer_idx,
                norm_eps=config.norm_eps, output_gate_activation=config.output_gate_activation,
                backend=config.backend)
        self.mlp_norm = (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(hidden_size=config.hidden_size, hidden_ratio=config.hidden_ratio,
                            intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
                            fuse_swiglu=config.fuse_swiglu)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                cp_context=None, cu_seqlens=None, verify_agreement=True, **kwargs):
        residual = hidden_states
        hidden_states = rms_norm(self.attn_norm, hidden_states)
        # GatedDeltaNetCP or AttentionCP: one calling convention
        hidden_states, _, past_key_values = self.attn(
            hidden_states, cp_context=cp_context, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
            past_key_values=past_key_values, use_cache=use_cache, verify_agreement=verify_agreement)
        hidden_states, residual = rms_norm(self.mlp_norm, hidden_states, residual, prenorm=True)
        hidden_states = residual + gated_mlp(self.mlp, hidden_states)
        return hidden_states, past_key_values


def _cp_config_in_kwargs(kwargs: dict) -> None:
    """Where `kwargs["config"]` is a config object, make it a `GatedDeltaNetCPConfig` (from FLA's
    `GatedDeltaNetConfig`: same fields) carrying the CP fields popped from `kwargs`: HF hands the kwargs
    left over next to a config object to `__init__`. Without a config object HF loads config.json with
    `GatedDeltaNetCPConfig.from_dict`, which takes the CP kwargs itself."""
    config = kwargs.get("config")
    if isinstance(config, PreTrainedConfig):
        cp_kwargs = {name: kwargs.pop(name) for name in CP_FIELDS if name in kwargs}
        if cp_kwargs or not isinstance(config, GatedDeltaNetCPConfig):
            kwargs["config"] = GatedDeltaNetCPConfig.from_fla(config, **cp_kwargs)


class GatedDeltaNetCPPreTrainedModel(CPModelMixin, GatedDeltaNetPreTrainedModel):
    # FLA's init (A_log / dt_bias for GatedDeltaNet, which GatedDeltaNetCP is) and HF plumbing.
    config_class = GatedDeltaNetCPConfig
    _no_split_modules = ['GatedDeltaNetCPBlock']

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """HF `from_pretrained` plus the CP config fields (`cp_size=`, `cp_layout=`, `backend=`),
        `device_mesh=` or `cp_group=`. `config=` may be FLA's `GatedDeltaNetConfig` (the Auto classes
        resolve an FLA checkpoint's config to it and pass it so)."""
        _cp_config_in_kwargs(kwargs)
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """HF's hook behind `AutoModel*.from_config(config)`: also accepts FLA's `GatedDeltaNetConfig`."""
        kwargs["config"] = config
        _cp_config_in_kwargs(kwargs)
        return super()._from_config(kwargs.pop("config"), **kwargs)

    def setup_cp(self, config, device_mesh=None, cp_group=None):
        if not isinstance(config, GatedDeltaNetCPConfig):
            raise TypeError(f"{type(self).__name__} needs a GatedDeltaNetCPConfig, got {type(config).__name__}: "
                            f"convert with GatedDeltaNetCPConfig.from_fla(config, cp_size=...)")
        super().setup_cp(config, device_mesh, cp_group)
        if getattr(config, "attnres_block_size", None) is not None:
            raise NotImplementedError("GatedDeltaNetCP models do not support attnres_block_size")


class GatedDeltaNetCPModel(GatedDeltaNetCPPreTrainedModel):

    def __init__(self, config: GatedDeltaNetCPConfig, device_mesh=None, cp_group=None):
        super().__init__(config)
        self.setup_cp(config, device_mesh, cp_group)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([GatedDeltaNetCPBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cu_seqlens=None,
        inputs_are_sharded: bool = False,
        cp_context=None,
        _cp_loss: dict | None = None,
        cache=None,
        **kwargs,
    ):
        """This rank's final hidden states `[B, T_loc, D]` (docs/models.md); the `CPContext` used is in
        `output.cp_context` (None without CP). `_cp_loss`: what the LM head will do with the output, for
        the forward's cross-rank check."""
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # transformers >= 5.24 spells it `cache`, earlier releases (and FLA) `past_key_values`
        past_key_values = one_cache(cache, past_key_values, type(self).__name__)
        if use_cache and not isinstance(past_key_values, Cache):
            past_key_values = Cache.from_legacy_cache(past_key_values)
        hidden_states, cp, cu_seqlens = self.cp_enter(
            input_ids, inputs_embeds, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
            past_key_values=past_key_values, use_cache=use_cache, inputs_are_sharded=inputs_are_sharded,
            cp_context=cp_context, loss_args=_cp_loss)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, past_key_values = layer(
                hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                use_cache=use_cache, cp_context=cp, cu_seqlens=None if cp is not None else cu_seqlens,
                verify_agreement=cp is None, **kwargs)
        hidden_states = rms_norm(self.norm, hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        out = BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                      **cache_field(past_key_values if use_cache else None))
        out.cp_context = cp
        return out if return_dict else out.to_tuple()


class GatedDeltaNetCPForCausalLM(CPForCausalLMMixin, GatedDeltaNetCPPreTrainedModel, FLAForCausalLM,
                                 FLAUnsupportedCacheGenerationMixin):

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: GatedDeltaNetCPConfig, device_mesh=None, cp_group=None):
        super().__init__(config)
        self.model = GatedDeltaNetCPModel(config, device_mesh=device_mesh, cp_group=cp_group)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None
        self.post_init()

    # as FLA's other models: the old name of `logits_to_keep` (else it would vanish into **kwargs)
    @deprecate_kwarg("num_logits_to_keep", version="4.50", new_name="logits_to_keep")
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, num_items_in_batch=None, cu_seqlens=None, inputs_are_sharded: bool = False,
                gather_logits: bool = False, shift_labels=None, cp_context=None, cache=None, **kwargs):
        """Logits and the global loss under CP (docs/models.md); `fla_cp.parallel.CPForCausalLMMixin`."""
        return self.cp_causal_lm_forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            past_key_values=past_key_values, labels=labels, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=return_dict, logits_to_keep=logits_to_keep,
            num_items_in_batch=num_items_in_batch, cu_seqlens=cu_seqlens, inputs_are_sharded=inputs_are_sharded,
            gather_logits=gather_logits, shift_labels=shift_labels, cp_context=cp_context, cache=cache, **kwargs)
