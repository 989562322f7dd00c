"""Gated DeltaNet language model with exact context parallelism (CP), loading FLA checkpoints unchanged.

Usage (under `torchrun --nproc-per-node=WORLD`, world = dp x cp; CP groups are consecutive ranks)::

    import fla_cp                     # maps `gated_deltanet_cp` AND FLA's `gated_deltanet` to these classes
    model = AutoModelForCausalLM.from_pretrained(path, cp_size=4)   # ours or an FLA GatedDeltaNet checkpoint
    #    (same parameter names, no conversion; without cp_size: cp_size=1, FLA's model's math; cp_size
    #    is never saved in config.json: pass it at every load; see models/gated_deltanet_cp/__init__.py)
    # or GatedDeltaNetCPForCausalLM.from_pretrained(path, cp_size=4)
    # or ...from_pretrained(path, device_mesh=init_cp_mesh(4))  /  (path, cp_group=my_group)
    # or GatedDeltaNetCPForCausalLM(config, device_mesh=None, cp_group=None)   (mesh from config.cp_size)

    out = model(input_ids=ids, labels=ids)                     # every CP rank passes the SAME full batch
    out.loss.backward()                                        # out.loss: global token mean, same on all CP ranks
    sync_gradients(model)                                      # .grad == single-device grad of the global batch
    optimizer.step()

Attributes: `model.cp_group`, `model.dp_group` (None when absent), `model.cp_size`.

Forward arguments beyond HF's:
    cu_seqlens          global boundaries `[N+1]` of a packed batch (B == 1); documents never exchange
                        state, conv windows or labels.
    attention_mask      `[B, T]` 0/1 padding mask (left or right padding); padded tokens are neutral (see
                        `fla_cp.layers.gated_deltanet_cp`). Put -100 in `labels` at pads, as with HF. A
                        row with a hole (`[1, 1, 0, 1, 1]`) raises ValueError (FLA would join the pieces).
    inputs_are_sharded  False (default): `input_ids`/`labels`/`attention_mask` are the full global batch
                        and the model shards them (like TransformerEngine's `get_batch_on_this_cp_rank`).
                        True: the caller passes this rank's shard, `ctx.shard(x, dim=1)` with
                        `ctx = model.build_cp_context(seq_len=T)` or `(cu_seqlens=cu)` (or pass
                        `cp_context=ctx`); `cu_seqlens` stays global. Labels can't be shifted locally (a
                        rank's last token predicts the next rank's first), so `labels` must then be the
                        *already shifted* labels, sharded the same way:
                        `labels=ctx.shard(shift_labels_globally(labels, cu_seqlens), dim=1)`.
    shift_labels        HF-style alternative to `labels`: labels already shifted (global, or local when
                        `inputs_are_sharded`).
    gather_logits       False: `out.logits` is this rank's `[B, T_loc, V]`; True: global `[B, T, V]`
                        (the final hidden states are all-gathered, differentiably, then projected).
                        Gathered logits are replicated: a loss computed on them counts once when every
                        CP rank computes the same loss and runs its backward (the backward is a
                        collective), i.e. after `sync_gradients` the gradient is the single-device
                        gradient of that loss (the mean of the ranks' losses). The same holds for the
                        logits (and `labels` loss) of replicated forwards (decode steps, short inputs,
                        see Generation), which every rank runs in full.
                        `out.hidden_states` (`output_hidden_states=True`) stay this rank's `[B, T_loc, D]`
                        either way; gather them with `model.build_cp_context(seq_len=T).unshard(h, dim=1)`.
    cp_context          a prebuilt `fla_cp.ops.CPContext` (saves rebuilding the split's host-side tables).

Loss: labels are shifted on the global sequence (`shift_labels_globally`: predict the next token, the
last token of every row / packed document gets -100), each rank sums the cross-entropy of its tokens,
and one all-reduce of (sum, count) over the CP group gives the global mean, identical on every CP rank.
The backward of that all-reduce is the identity, so each rank's parameter gradients are the *partial*
contribution of its tokens; their sum over the CP group is the single-device gradient. As with FLA,
the loss is NaN when every label is -100 (unless `num_items_in_batch` is given), and
`config.use_l2warp=True` adds FLA's `l2_warp` logit penalty (exactly: each rank applies it to its tokens).
The token losses use FLA's kernels as the config asks, on CUDA: `fuse_cross_entropy` (fused
cross-entropy, backward in place into the logits) or `fuse_linear_cross_entropy` (fused linear +
cross-entropy: the local logits are never formed and `out.logits` is None unless `gather_logits`; with
`use_l2warp` the plain path runs, so that the penalty keeps its global scale); torch's cross-entropy
elsewhere.

Checks: with cp_size > 1 every forward (prefill or decode) starts with one tiny all_gather over the CP
group that compares what the ranks are about to do (decode vs prefill and cache length, split, batch,
mask, labels, ...) and carries any rank's input error, so bad or mismatched input raises the same
ValueError on every rank instead of hanging a later collective.

Gradients: `sync_gradients(model)` sums `.grad` over the CP group and averages over the DP group (the
DP average is the mean of per-replica losses, as with DDP). `model` may be the user's own module holding
the CP model (a projector, soft prompts): all its parameters are reduced. Until then `inputs_embeds.grad`
and the gradients of every module upstream of the model are per-rank partial sums too (each rank's
tokens only). `copy.deepcopy(model)` (EMA, reference models) shares the process groups with the
original. With a data-parallel wrapper instead:
    - DDP: wrap with `process_group=` the flattened dp x cp group (the whole world for `init_cp_mesh`,
      or `mesh._flatten("dp_cp").get_group()`), and backpropagate `out.loss * model.cp_size`: DDP
      divides by dp*cp, the CP ranks' partial gradients must be summed, so the factor cp restores it.
    - FSDP2: `fully_shard(module, mesh=mesh._flatten("dp_cp"))` (1-D over dp x cp) with the same
      `loss * cp_size` scaling (or `module.set_gradient_divide_factor(dp)` and no scaling; on gloo,
      which has no PREMUL_SUM, add `module.set_force_sum_reduction_for_comms(True)`).

Caches are passed as `cache=` or `past_key_values=` (transformers >= 5.24 spells it `cache`, older
releases and FLA `past_key_values`; both work on every release, see `fla_cp/models/hf_compat.py`), and
the output holds it under the running transformers' name (`fla_cp.models.output_cache(out)` reads it).

Generation and caches: `model.generate(input_ids, max_new_tokens=..., do_sample=False)` on every rank of
a CP group with the same prompt: the prefill runs with CP; the recurrent and conv states of every layer
are gathered to all ranks (the cache is replicated), the last-position logits too, and decoding then
runs the cached single-token steps replicated on every rank: all ranks return the same tokens as
cp_size=1. Which forwards run CP is one rule (`runs_replicated`), with or without a cache: a call with
at least as many new tokens as CP parts (cp_size, 2 x cp_size for zigzag) runs CP; a shorter one
(decode steps, a BOS-only prompt, a short chunk) runs in full on every rank, exactly as cp_size=1 (its
loss is the same global mean, and its gradients count once after `sync_gradients`). So a multi-token
continuation from a non-empty cache (the next turn of a chat, `generate(..., cache=cache)`,
chunked prefill of a long prompt) runs CP too: every sequence starts from its cached recurrent state
and its conv window reads the cached inputs, so each rank computes and stores only its shard. Pass
`attention_mask` as generate does, `[B, past + T]` (or `[B, T]`); a packed continuation (`cu_seqlens`)
continues each of its N sequences from its own cached state, so the cache must hold N (from a packed
prefill of N sequences).
With `do_sample=True` every CP rank first takes CP rank 0's RNG state, so all sample the tokens one
device seeded like rank 0 would; a decode step fed different tokens on different ranks raises.

Gradient checkpointing (`gradient_checkpointing_enable()`) recomputes each block in backward, its
collectives included, the same way on every rank (the setting is part of the agreement check).

Limits: hybrid configs with attention layers (`attn`) and `attnres_block_size` raise under CP>1
(resp. always for attnres). Pre-sharded inputs (`inputs_are_sharded`, `cp_context=`) always run CP, so
their global length must give every CP part a token.
"""
from __future__ import annotations

import contextvars
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache
from fla.models.cache_utils import Cache
from fla.models.gated_deltanet.modeling_gated_deltanet import GatedDeltaNetPreTrainedModel
from fla.models.generation_utils import FLAUnsupportedCacheGenerationMixin
from fla.models.modeling_utils import FLAForCausalLM, get_attention
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss, GatedMLP, RMSNorm
from fla.modules.l2warp import l2_warp
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from fla_cp.layers import GatedDeltaNetCP
from fla_cp.layers.functional import gated_mlp, rms_norm
from fla_cp.models.gated_deltanet_cp.configuration_gated_deltanet_cp import CP_FIELDS, GatedDeltaNetCPConfig
from fla_cp.models.hf_compat import CACHE_KWARG, cache_field, generate_cache_kwargs, one_cache, output_cache
from fla_cp.ops import build_cp_context, comm

IGNORE_INDEX = -100

# `from_pretrained` hands (device_mesh, cp_group) to `__init__` through this, because HF's own
# `from_pretrained` would take `device_mesh` for tensor parallelism.
_PENDING_GROUPS: contextvars.ContextVar = contextvars.ContextVar("fla_cp_pending_groups", default=(None, None))


# ---------------------------------------------------------------------------------- process groups
def init_cp_mesh(cp_size: int, device_type: str | None = None):
    """A `DeviceMesh` with dims ("dp", "cp") over the world: CP groups are consecutive ranks.

    Returns None when `cp_size == 1` and torch.distributed is not initialised (single process).
    """
    cp_size = int(cp_size)
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not (dist.is_available() and dist.is_initialized()):
        if cp_size > 1:
            raise ValueError(f"cp_size={cp_size} needs torch.distributed: launch with torchrun (or call "
                             f"torch.distributed.init_process_group first), or use cp_size=1")
        return None
    world = dist.get_world_size()
    if world % cp_size:
        raise ValueError(f"cp_size={cp_size} does not divide the world size {world} (world = dp x cp)")
    from torch.distributed.device_mesh import init_device_mesh
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))


def _resolve_groups(config, device_mesh, cp_group):
    """(cp_group, dp_group) from an explicit group, a mesh, or config.cp_size."""
    if device_mesh is not None and cp_group is not None:
        raise ValueError("pass either device_mesh or cp_group, not both")
    dp_group = None
    if cp_group is None:
        if device_mesh is None:
            device_mesh = init_cp_mesh(config.cp_size)
        if device_mesh is not None:
            if tuple(device_mesh.mesh_dim_names or ()) != ("dp", "cp"):
                raise ValueError(f"device_mesh must have dims ('dp', 'cp'), got {device_mesh.mesh_dim_names}")
            cp_group = device_mesh["cp"].get_group()
            if device_mesh["dp"].size() > 1:
                dp_group = device_mesh["dp"].get_group()
    size = dist.get_world_size(cp_group) if cp_group is not None else 1
    if config.cp_size not in (1, size):
        raise ValueError(f"config.cp_size={config.cp_size} but the CP group has {size} ranks")
    config.cp_size = size
    return cp_group, dp_group


def _check_supported(config):
    if getattr(config, "attnres_block_size", None) is not None:
        raise NotImplementedError("GatedDeltaNetCP models do not support attnres_block_size")
    if config.cp_size > 1 and config.attn is not None:
        raise ValueError("hybrid configs with attention layers (`attn`) are not supported with cp_size > 1 yet: "
                         "softmax attention has no CP path in fla_cp; use cp_size=1 or a pure GDN config")


# ------------------------------------------------------------------------------------------ labels
def shift_labels_globally(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets on the global sequence: `out[:, t] = labels[:, t+1]`; -100 at the last token
    of every row and, with packed `cu_seqlens`, of every document (never the next document's first)."""
    out = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    if cu_seqlens is not None:
        ends = torch.as_tensor(cu_seqlens, device=labels.device)[1:].long() - 1
        out[:, ends] = IGNORE_INDEX
    return out


def _fla_loss_kernels_run_on(device: torch.device) -> bool:
    """FLA's fused loss kernels are Triton kernels for CUDA (they refuse CPU tensors)."""
    return device.type == "cuda"


class _AllReduceIdentityBackward(torch.autograd.Function):
    """Sum over the CP group; backward passes the gradient through unchanged, so every rank keeps the
    partial gradient of its own tokens (summed over the group later by `sync_gradients`)."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _cache_length(past_key_values) -> int:
    """Tokens already in the cache (0 without one): > 0 means a decode step."""
    if past_key_values is None or not hasattr(past_key_values, "get_seq_length"):
        return 0
    return int(past_key_values.get_seq_length())


def _build_error(e: ValueError) -> str:
    """`build_cp_context`'s message without its "build_cp_context: rank r: " prefix (the model's check
    names the rank)."""
    head, _, rest = str(e).partition(": rank ")
    return rest.partition(": ")[2] if head == "build_cp_context" and rest else str(e)


def _replicated_grad(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """`t` unchanged; its gradient scaled by 1/world_size. For a tensor every CP rank computes in full
    (logits of gathered hidden states, decode steps): every rank backpropagates the same loss through it,
    `sync_gradients` sums the ranks' gradients, so each rank contributes 1/world_size of it."""
    if world_size > 1 and t.requires_grad:
        t.register_hook(lambda g: g / world_size)
    return t


# ------------------------------------------------------------------------------------------- model
class GatedDeltaNetCPBlock(GradientCheckpointingLayer):
    """FLA's GatedDeltaNetBlock (same submodule names), with CP-aware mixer and CPU-capable norms/MLP."""

    def __init__(self, config: GatedDeltaNetCPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn_norm = (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.attn = get_attention(config=config, layer_idx=layer_idx)
        if self.attn is None:
            self.attn = GatedDeltaNetCP(
                hidden_size=config.hidden_size, expand_v=config.expand_v, head_dim=config.head_dim,
                num_heads=config.num_heads, num_v_heads=config.num_v_heads, mode=config.attn_mode,
                use_gate=config.use_gate, use_short_conv=config.use_short_conv,
                allow_neg_eigval=config.allow_neg_eigval, conv_size=config.conv_size, layer_idx=layer_idx,
                norm_eps=config.norm_eps, output_gate_activation=config.output_gate_activation,
                kernel_backend=config.kernel_backend, conv_backend=config.conv_backend)
        self.mlp_norm = (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(hidden_size=config.hidden_size, hidden_ratio=config.hidden_ratio,
                            intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
                            fuse_swiglu=config.fuse_swiglu)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                cp_context=None, cu_seqlens=None, verify_agreement=True, **kwargs):
        residual = hidden_states
        hidden_states = rms_norm(self.attn_norm, hidden_states)
        if isinstance(self.attn, GatedDeltaNetCP):
            hidden_states, _, past_key_values = self.attn(
                hidden_states, cp_context=cp_context, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                past_key_values=past_key_values, use_cache=use_cache, verify_agreement=verify_agreement)
        else:  # softmax attention layer of a hybrid config (cp_size == 1 only)
            hidden_states, _, past_key_values = self.attn(
                hidden_states=hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                use_cache=use_cache, cu_seqlens=cu_seqlens, **kwargs)
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


class GatedDeltaNetCPPreTrainedModel(GatedDeltaNetPreTrainedModel):
    # FLA's init (A_log / dt_bias for GatedDeltaNet, which GatedDeltaNetCP is) and HF plumbing.
    config_class = GatedDeltaNetCPConfig
    _no_split_modules = ['GatedDeltaNetCPBlock']

    @classmethod
    def from_pretrained(cls, *args, device_mesh=None, cp_group=None, **kwargs):
        """HF `from_pretrained` plus the CP config fields (`cp_size=`, `cp_layout=`, `kernel_backend=`,
        `conv_backend=`), `device_mesh=` or `cp_group=`. `config=` may be FLA's `GatedDeltaNetConfig`
        (the Auto classes resolve an FLA checkpoint's config to it and pass it so)."""
        _cp_config_in_kwargs(kwargs)
        token = _PENDING_GROUPS.set((device_mesh, cp_group))
        try:
            return super().from_pretrained(*args, **kwargs)
        finally:
            _PENDING_GROUPS.reset(token)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """HF's hook behind `AutoModel*.from_config(config)`: also accepts FLA's `GatedDeltaNetConfig`."""
        kwargs["config"] = config
        _cp_config_in_kwargs(kwargs)
        return super()._from_config(kwargs.pop("config"), **kwargs)

    def __deepcopy__(self, memo):
        """A copy (an EMA or frozen reference model) shares this model's process groups: a group is a
        handle to a communicator, which can't be copied (nor pickled), and the copy runs in the same
        CP group. Everything else is copied as by the default deepcopy."""
        for name in ("cp_group", "dp_group"):
            group = self.__dict__.get(name)
            if group is not None:
                memo[id(group)] = group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    def _setup_cp(self, config, device_mesh, cp_group):
        if not isinstance(config, GatedDeltaNetCPConfig):
            raise TypeError(f"{type(self).__name__} needs a GatedDeltaNetCPConfig, got {type(config).__name__}: "
                            f"convert with GatedDeltaNetCPConfig.from_fla(config, cp_size=...)")
        if device_mesh is None and cp_group is None:
            device_mesh, cp_group = _PENDING_GROUPS.get()
        self.cp_group, self.dp_group = _resolve_groups(config, device_mesh, cp_group)
        self.cp_size = config.cp_size
        _check_supported(config)

    def build_cp_context(self, seq_len: int | None = None, cu_seqlens=None):
        """The `CPContext` this model uses for a batch (collective over the CP group)."""
        if seq_len is None and cu_seqlens is None:
            raise ValueError("pass seq_len (dense) or cu_seqlens (packed)")
        if cu_seqlens is not None:
            return build_cp_context(self.cp_group, cu_seqlens=cu_seqlens, layout=self.config.cp_layout)
        return build_cp_context(self.cp_group, seq_len=seq_len, layout=self.config.cp_layout)


class GatedDeltaNetCPModel(GatedDeltaNetCPPreTrainedModel):

    def __init__(self, config: GatedDeltaNetCPConfig, device_mesh=None, cp_group=None):
        super().__init__(config)
        self._setup_cp(config, device_mesh, cp_group)
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
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        inputs_are_sharded: bool = False,
        cp_context=None,
        _cp_check_extra: tuple[dict, str | None] | None = None,
        cache=None,
        **kwargs,
    ):
        """Returns this rank's final hidden states `[B, T_loc, D]` (see the module docstring).

        The `CPContext` used is returned in `output.cp_context` (None without CP). `_cp_check_extra`
        (fields, error) joins the caller's own agreement fields and local error to this forward's check.
        """
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        # transformers >= 5.24 spells it `cache`, earlier releases (and FLA) `past_key_values`
        past_key_values = one_cache(cache, past_key_values, type(self).__name__)
        if use_cache and not isinstance(past_key_values, Cache):
            past_key_values = Cache.from_legacy_cache(past_key_values)

        if cu_seqlens is not None and not torch.is_tensor(cu_seqlens):
            # a list of ints (as build_cp_context takes), for every block, attention ones included
            try:
                cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.long,
                                          device=(input_ids if input_ids is not None else inputs_embeds).device)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                pass    # left as given: the split's checks report it (on every CP rank, not just this one)
        # No collective before the check below: an error found on one rank must reach every rank.
        cp, error = self._cp_context_for(input_ids, inputs_embeds, cu_seqlens, inputs_are_sharded, cp_context)
        error = error or self._shard_error(input_ids, inputs_embeds, cp, inputs_are_sharded)
        inputs = input_ids if input_ids is not None else inputs_embeds
        # what the ranks pass must agree (the length unless shards of a given split, which may differ)
        same_len = not inputs_are_sharded or (cu_seqlens is None and cp_context is None)
        inputs_field = [input_ids is not None, bool(inputs_are_sharded),
                        inputs.shape[1] if inputs.dim() > 1 and same_len else 0, 0]
        if self.cp_size > 1 and error is None and input_ids is not None:
            # bad ids would raise in the embedding on one rank only and leave the others waiting in the
            # check; the content code catches ranks passing different "same" global batches
            # the embedding's size now, not config.vocab_size: resize_token_embeddings changes it
            error, code = _token_ids_check(input_ids, self.embeddings.num_embeddings)
            inputs_field[3] = code if not inputs_are_sharded else 0   # decode steps too: replicated
        if cp is not None and not inputs_are_sharded and error is None:
            input_ids = cp.shard(input_ids, dim=1) if input_ids is not None else None
            inputs_embeds = cp.shard(inputs_embeds, dim=1) if inputs_embeds is not None else None
        hidden_states = None
        if error is None:
            hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.cp_size > 1:
            # One agreement check for the whole forward, prefill or decode (every layer's collectives
            # follow from it); the split and the layers then skip theirs.
            self._check_cp_forward(hidden_states, cp, attention_mask, use_cache, past_key_values, error,
                                   _cp_check_extra, inputs_field, cu_seqlens)

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

    def _agreement_fields(self) -> dict[str, list[int]]:
        """Model-level settings every CP rank must share (beyond what the first layer checks)."""
        return {"layers, vocab": [len(self.layers), self.embeddings.num_embeddings],
                "gradient checkpointing (recomputes collectives in backward)":
                    [bool(self.gradient_checkpointing and self.training)]}

    def _check_cp_forward(self, hidden_states, cp, attention_mask, use_cache, past_key_values, error, extra,
                          inputs_field, cu_seqlens=None):
        """The forward's one collective before any other (cp_size > 1): raises the same ValueError on every
        CP rank when any rank found bad input (`error`, `extra`'s error, the first layer's input checks)
        or the ranks disagree (decode vs prefill, split, batch, mask, labels, ...). Decode steps run it
        too: a rank that decodes while the others prefill must not leave them waiting."""
        extra_fields, extra_error = extra or ({}, None)
        error = error or extra_error
        layer = self.layers[0].attn if len(self.layers) else None
        last_state = get_layer_cache(module=layer, past_key_values=past_key_values) if layer is not None else None
        if error is None and cp is not None and layer is not None:
            # (a continuation's cache: every layer's states come from the same prefill, one layer speaks for all)
            error = layer._cp_input_error(hidden_states, cp, attention_mask, last_state)
        elif error is None and last_state is not None and torch.is_tensor(hidden_states):
            # a replicated step (decode, short chunk): a cache that doesn't fit would raise in the layer on
            # this rank only, after the others had passed this check
            packed = torch.is_tensor(cu_seqlens) and cu_seqlens.dim() == 1
            error = layer._cache_error(last_state, cu_seqlens.numel() - 1 if packed else hidden_states.shape[0],
                                       packed)
        cache_len = _cache_length(past_key_values)
        new_tokens = cp.total_len if cp is not None else (
            hidden_states.shape[1] if torch.is_tensor(hidden_states) and hidden_states.dim() > 1 else 0)
        fields = {"continuation (cache length, new tokens)": [cache_len, new_tokens if cache_len else 0],
                  "input_ids (given, inputs_are_sharded, length along dim 1, content)": inputs_field,
                  # a rank under no_grad would leave the others alone in the backward's collectives
                  "records a graph (grad mode on, parameters or inputs requiring grad)":
                      [comm.records_graph(hidden_states, *self.parameters())],
                  **self._agreement_fields()}
        if layer is not None:
            fields.update(layer.agreement_fields(hidden_states, cp, attention_mask, use_cache))
        else:
            fields["cp_context"] = cp.fingerprint() if cp is not None else [0] * 5
        comm.check_agreement(self.cp_group, error, {**fields, **extra_fields}, what=type(self).__name__)

    @staticmethod
    def _shard_error(input_ids, inputs_embeds, cp, inputs_are_sharded) -> str | None:
        """This rank's inputs don't fit the CP split (checked before any rank shards or communicates)."""
        if cp is None:
            return None
        name, x = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        want = cp.local_len if inputs_are_sharded else cp.total_len
        if x.dim() < 2 or x.shape[1] != want:
            what = "this rank's shard of" if inputs_are_sharded else "the global"
            return f"{name} has shape {tuple(x.shape)}, expected {want} tokens ({what} sequence) along dim 1"
        return None

    def _num_cp_parts(self) -> int:
        return self.cp_size * (2 if self.config.cp_layout == "zigzag" else 1)

    def runs_replicated(self, num_tokens: int, inputs_are_sharded: bool = False, cp_context=None) -> bool:
        """Whether a forward of `num_tokens` new tokens (per row; packed: in total) skips the CP split and
        runs in full on every CP rank: when the inputs are the full batch (not pre-sharded, no explicit
        `cp_context`) and too short to give every CP part a token. That covers decode steps and short
        prompts or continuation chunks, with or without a cache; everything longer runs CP, a
        continuation from a cache included. Replicated results equal cp_size=1's, and their gradients
        are scaled so that `sync_gradients` yields the single-device gradient (see `_replicated_grad`).
        Every rank decides alike: the length, the flags and the context are in the agreement check."""
        return (self.cp_size > 1 and not inputs_are_sharded and cp_context is None
                and num_tokens < self._num_cp_parts())

    def _cp_context_for(self, input_ids, inputs_embeds, cu_seqlens, inputs_are_sharded, cp_context):
        """(the CP split of this call or None, this rank's error or None); None without CP (cp_size 1) and
        for calls that run replicated (`runs_replicated`). Never communicates: the split's agreement is
        part of the forward's one check (`_check_cp_forward`), so its errors are returned, not raised."""
        if self.cp_size == 1:
            if inputs_are_sharded:
                raise ValueError("inputs_are_sharded=True needs cp_size > 1")
            return None, None
        name, x = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        if x.dim() < 2:
            return None, f"{name} must be [B, T{', D' if name == 'inputs_embeds' else ''}], got {tuple(x.shape)}"
        if self.runs_replicated(x.shape[1], inputs_are_sharded, cp_context):
            return None, None
        if cp_context is not None:
            if cp_context.world_size != self.cp_size:
                return None, (f"cp_context spans {cp_context.world_size} ranks but the model's CP group has "
                              f"{self.cp_size}")
            return cp_context, None
        layout = self.config.cp_layout
        if cu_seqlens is not None:
            try:
                return build_cp_context(self.cp_group, cu_seqlens=cu_seqlens, layout=layout,
                                        verify_agreement=False), None
            except ValueError as e:
                return None, _build_error(e)
        T = x.shape[1]
        try:
            ctx = build_cp_context(self.cp_group, seq_len=T * (self.cp_size if inputs_are_sharded else 1),
                                   layout=layout, verify_agreement=False)
        except ValueError as e:
            what = "this rank's shard" if inputs_are_sharded else "the sequence"
            return None, f"{name} has {T} tokens along dim 1 ({what}): {_build_error(e)}"
        n_parts = self._num_cp_parts()
        if inputs_are_sharded and any(p.end - p.start != T * self.cp_size // n_parts for p in ctx.parts):
            return None, (f"{name} has {T} tokens along dim 1: with inputs_are_sharded=True and a dense batch "
                          f"whose length is not a multiple of the number of CP parts, pass "
                          f"cp_context=model.build_cp_context(seq_len=T)")
        return ctx, None


def _token_ids_check(input_ids: torch.Tensor, vocab_size: int) -> tuple[str | None, int]:
    """(why `input_ids` can't be embedded, or None; its content code). One host sync."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        return f"input_ids must be an integer tensor, got {input_ids.dtype}", 0
    if input_ids.numel() == 0:
        return None, 0
    x = input_ids.long()
    lo, hi, code = torch.stack([x.min(), x.max(), comm.content_sum(x)]).tolist()
    if lo < 0 or hi >= vocab_size:
        return f"input_ids holds ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})", 0
    return None, code


def _labels_check(name: str, y, inputs, vocab_size: int, content: bool) -> tuple[str | None, int]:
    """(why `labels`/`shift_labels` can't go into the loss, or None; its content code when `content`)."""
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool \
            or y.dim() != 2:
        got = f"{y.dtype} of shape {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
        return f"{name} must be an integer [B, T] tensor, got {got}", 0
    if inputs is not None and tuple(y.shape) != tuple(inputs.shape[:2]):
        return f"{name} has shape {tuple(y.shape)}; it must match the inputs' [B, T] = {list(inputs.shape[:2])}", 0
    bad = ((y != IGNORE_INDEX) & ((y < 0) | (y >= vocab_size))).any().long()
    bad, code = torch.stack([bad, comm.content_sum(y) if content else torch.zeros_like(bad)]).tolist()
    if bad:
        return f"{name} holds values outside [0, {vocab_size}) other than {IGNORE_INDEX}", 0
    return None, code


class GatedDeltaNetCPForCausalLM(GatedDeltaNetCPPreTrainedModel, FLAForCausalLM, FLAUnsupportedCacheGenerationMixin):

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: GatedDeltaNetCPConfig, device_mesh=None, cp_group=None):
        super().__init__(config)
        self.model = GatedDeltaNetCPModel(config, device_mesh=device_mesh, cp_group=cp_group)
        self.cp_group, self.dp_group, self.cp_size = self.model.cp_group, self.model.dp_group, self.model.cp_size
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None
        self.post_init()

    # as FLA's other models: the old name of `logits_to_keep` (else it would vanish into **kwargs)
    @deprecate_kwarg("num_logits_to_keep", version="4.50", new_name="logits_to_keep")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        inputs_are_sharded: bool = False,
        gather_logits: bool = False,
        shift_labels: torch.LongTensor | None = None,
        cp_context=None,
        cache=None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = one_cache(cache, past_key_values, type(self).__name__)
        has_labels = labels is not None or shift_labels is not None
        keeps = logits_to_keep.numel() > 0 if torch.is_tensor(logits_to_keep) else bool(logits_to_keep)
        gathers = gather_logits or (not has_labels and keeps)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            past_key_values=past_key_values, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True, cu_seqlens=cu_seqlens, inputs_are_sharded=inputs_are_sharded,
            cp_context=cp_context, _cp_check_extra=self._cp_check_extra(
                input_ids, inputs_embeds, labels, shift_labels, gathers, num_items_in_batch, inputs_are_sharded),
            **kwargs)
        hidden_states, cp = outputs.last_hidden_state, outputs.cp_context
        # a call shorter than the CP split (decode steps too) runs in full on every CP rank: its
        # gradients are replicated
        replicated = self.cp_size > 1 and cp is None

        loss, logits, fused_linear = None, None, False
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                shift_labels = labels if inputs_are_sharded else shift_labels_globally(labels, cu_seqlens)
            if cp is not None and not inputs_are_sharded:
                shift_labels = cp.shard(shift_labels, dim=1)
            # FLA's fused linear + cross-entropy never forms the [T, V] logits (and returns none, as FLA);
            # with use_l2warp its penalty would be scaled by the loss's global mean, so the plain path runs
            fused_linear = (self.config.fuse_linear_cross_entropy and not self.config.use_l2warp
                            and not replicated and _fla_loss_kernels_run_on(hidden_states.device))
            if not fused_linear:
                logits = self.lm_head(hidden_states)
                if replicated:
                    _replicated_grad(logits, self.cp_size)
            loss = self._loss(logits, shift_labels.to(hidden_states.device), cp, num_items_in_batch,
                              hidden_states=hidden_states)

        if cp is not None and gathers:
            # generation wants the last positions, which live on the last rank: gather hidden states
            # (D per token, cheaper than V) and project everywhere. Every rank then holds the same
            # global logits and computes the same loss on them: the gather's backward sums the ranks'
            # (equal) gradients and `_replicated_grad` divides by P, so after `sync_gradients` that
            # loss counts once (lm_head, applied on every rank, gets 1/P of its gradient per rank too).
            # (the forward's check has compared the split, batch, dtype and grad mode: no second check)
            hidden_states = cp.unshard(hidden_states, dim=1, verify_agreement=False)
            replicated, logits = True, None
        if logits is None and not (fused_linear and not gathers):
            # (else the loss's logits are the ones to return: no second projection)
            if loss is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
            elif loss is None and torch.is_tensor(logits_to_keep):
                hidden_states = hidden_states[:, logits_to_keep]
            logits = self.lm_head(hidden_states)
            if replicated:
                _replicated_grad(logits, self.cp_size)

        if not return_dict:
            output = (logits, output_cache(outputs), outputs.hidden_states)
            output = tuple(o for o in output if o is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **cache_field(output_cache(outputs)))

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, logits_to_keep=None,
                                      cache_position=None, next_sequence_length=None, **kwargs):
        """FLA's `prepare_inputs_for_generation` (what its mixin adds: `cache_position`, `logits_to_keep`),
        taking the cache under either name and handing it to transformers under the name this release
        passes to `forward` (FLA's mixin passes `past_key_values`, which transformers >= 5.24 renames
        with a warning at every step)."""
        if cache_position is not None and next_sequence_length is None:
            next_sequence_length = len(cache_position)
        if logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs[CACHE_KWARG] = one_cache(cache, past_key_values, f"{type(self).__name__}.generate")
        return GenerationMixin.prepare_inputs_for_generation(
            self, input_ids, next_sequence_length=next_sequence_length, **kwargs)

    # settings that decide how many decode steps each rank runs, or which tokens it picks
    _GENERATE_FIELDS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "num_beams",
                        "temperature", "top_k", "top_p", "eos_token_id")

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """HF `generate`; under CP every rank must pass the same prompt and settings (checked first, in
        one tiny collective: a rank that stopped decoding early would leave the others waiting).

        Sampling (`do_sample=True`) under CP draws from CP rank 0's random stream on every rank: rank 0's
        RNG state (CPU, and the model's CUDA device) is copied to the others first, so every rank picks
        the tokens one device with rank 0's state would pick, and all CP ranks leave with that state."""
        kwargs = generate_cache_kwargs(kwargs, f"{type(self).__name__}.generate")
        if self.cp_size > 1:
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            config = generation_config or self.generation_config
            fields, error = {}, None
            try:
                fields["prompt (shape, content)"] = [*prompt.shape[:2], comm.content_code(prompt)] \
                    if torch.is_tensor(prompt) and prompt.dim() == 2 and not prompt.is_floating_point() else [0, 0, 0]
                for name in self._GENERATE_FIELDS:
                    value = kwargs.get(name, getattr(config, name, None))
                    value = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
                    fields[name] = [value is not None, float(value) if isinstance(value, (int, float)) else 0.0]
            except (TypeError, ValueError, RuntimeError) as e:
                error = f"generate settings: {type(e).__name__}: {e}"
                fields = {"prompt (shape, content)": [0, 0, 0], **{n: [0, 0.0] for n in self._GENERATE_FIELDS}}
            comm.check_agreement(self.cp_group, error, fields, what=f"{type(self).__name__}.generate")
            if kwargs.get("do_sample", getattr(config, "do_sample", False)):
                self._share_rng_state()
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def _share_rng_state(self):
        """Copy CP rank 0's RNG state to every CP rank (the generators sampling may draw from)."""
        torch.set_rng_state(comm.broadcast_from_first(torch.get_rng_state(), self.cp_group))
        if self.device.type == "cuda":
            state = comm.broadcast_from_first(torch.cuda.get_rng_state(self.device), self.cp_group)
            torch.cuda.set_rng_state(state, self.device)

    def _cp_check_extra(self, input_ids, inputs_embeds, labels, shift_labels, gathers, num_items_in_batch,
                        inputs_are_sharded):
        """What the loss and logits add to the forward's CP agreement check: (fields, local error).

        Under CP the labels must be usable on every rank before any rank starts the loss all-reduce, and
        global labels must be the same on every rank (a content code; sharded ones differ by design).
        Nothing to check without CP (the forward then makes no agreement check)."""
        if self.cp_size == 1:
            return {}, None
        items = 0.0
        if num_items_in_batch is not None:
            items = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        fields = {"labels given, shift_labels given, logits gathered":
                  [labels is not None, shift_labels is not None, bool(gathers)],
                  "num_items_in_batch (given, value)": [num_items_in_batch is not None, items],
                  "labels content": [0]}
        inputs = input_ids if input_ids is not None else inputs_embeds
        for name, y in (("labels", labels), ("shift_labels", shift_labels)):
            if y is None:
                continue
            # lm_head's size now (resize_token_embeddings changes it)
            error, code = _labels_check(name, y, inputs, self.lm_head.out_features, content=not inputs_are_sharded)
            if error:
                return fields, error
            fields["labels content"] = [code]
        return fields, None

    def _token_loss_sum(self, logits, shift_labels, hidden_states) -> torch.Tensor:
        """Sum of this rank's token losses (fp32), with the loss kernels the config asks for where they
        run (FLA's, on CUDA) and torch's cross-entropy elsewhere (the same value):
            logits None              FLA's fused linear + cross-entropy on `hidden_states` and lm_head
            config.fuse_cross_entropy FLA's fused cross-entropy; as in FLA, its backward overwrites the
                                     logits with their gradient (inplace_backward)"""
        if logits is None:
            return FusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
                hidden_states, shift_labels, self.lm_head.weight, self.lm_head.bias)
        if self.config.fuse_cross_entropy and _fla_loss_kernels_run_on(logits.device):
            return FusedCrossEntropyLoss(ignore_index=IGNORE_INDEX, inplace_backward=True, reduction="sum")(
                logits.flatten(0, -2), shift_labels.flatten()).float()
        return F.cross_entropy(logits.flatten(0, -2).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction='sum')

    def _loss(self, logits, shift_labels, cp, num_items_in_batch, hidden_states=None):
        """Global token-mean cross-entropy (or global sum / num_items_in_batch), same on all CP ranks.

        As FLA's: NaN when every label is -100 (torch's mean of nothing), and with `config.use_l2warp`
        FLA's `l2_warp` (a gradient on every position's max logit, scaled by 1/(B*T) of the global
        batch): each rank applies it to its own tokens, so the ranks' partial gradients sum to FLA's.
        """
        loss_sum = self._token_loss_sum(logits, shift_labels, hidden_states)
        count = (shift_labels != IGNORE_INDEX).sum().to(loss_sum)
        stats = torch.stack([loss_sum, count])
        if cp is not None and cp.world_size > 1:
            stats = _AllReduceIdentityBackward.apply(stats, cp.group)
        loss = stats[0] if num_items_in_batch is not None else stats[0] / stats[1].detach()
        if getattr(self.config, "use_l2warp", False):
            total_len = cp.total_len if cp is not None else logits.shape[1]
            # FLA's factor is 1e-4 / (B * T) of the logits it sees: here the global T, not T_loc
            loss = l2_warp(loss, logits, 1e-4 * logits.shape[1] / total_len)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss


# --------------------------------------------------------------------------------------- gradients
def sync_gradients(model: nn.Module) -> None:
    """Make `.grad` the single-device gradient of the global batch on every rank.

    `model` is a CP model or any module holding one (a user's wrapper with its own layers, DDP-like
    wrappers): *every* parameter under `model` is reduced, over the CP group of the CP model(s) found
    among `model.modules()` (summed: each rank holds its tokens' partial gradient) and averaged over
    their DP group when there is one. Call after `loss.backward()` on every rank; every rank must have
    gradients for the same parameters (checked first: otherwise every rank raises). One tiny agreement
    all_gather and one flattened all-reduce per group.

    Until then, gradients that reach anything upstream of the CP model are per-rank partial sums too:
    `inputs_embeds.grad` (the model shards the embeddings, so a rank's gradient is zero outside its
    tokens) and the parameters of modules that compute those inputs (a projector, soft prompts); a
    module applied to the model's local outputs likewise. Summing over the CP group makes them exact.
    What the wrapper computes identically on every CP rank outside the model (e.g. a weight penalty
    added to the loss) is summed cp_size times: scale such a term by `1 / cp_size`. The model's own
    replicated computations (gathered logits, replicated forwards) already carry that factor.
    """
    cp_group, dp_group = _groups_of(model)
    params = list(model.parameters())
    has_grad = [p.grad is not None for p in params]
    grads = [p.grad for p, has in zip(params, has_grad) if has]
    # the flattened buffers must line up: a rank missing one gradient would abort gloo, or sum one
    # parameter's gradient into another's of the same size (one tiny all_gather per group)
    which = {"parameters with a gradient (count, which)":
             [len(grads), comm.content_code(torch.tensor(has_grad, dtype=torch.long))]}
    for group in (cp_group, dp_group):
        if group is not None and dist.get_world_size(group) > 1:
            comm.check_agreement(group, None, which, what="sync_gradients")
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)                   # a fresh buffer: reduced in place
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        comm.all_reduce_sum_(flat, cp_group)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        comm.all_reduce_sum_(flat, dp_group).div_(dist.get_world_size(dp_group))
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _groups_of(model: nn.Module):
    """(cp_group, dp_group) of the CP model(s) inside `model`: they must all share them. Raises when
    torch.distributed runs more than one process and `model` holds no CP model (nothing would say
    which group to reduce over, and silently skipping it leaves every rank with partial gradients)."""
    found = {(id(m.cp_group), id(m.dp_group)): (m.cp_group, m.dp_group)
             for m in model.modules() if isinstance(m, GatedDeltaNetCPPreTrainedModel) and hasattr(m, "cp_group")}
    if len(found) > 1:
        raise ValueError(f"sync_gradients: {type(model).__name__} holds CP models with different process groups; "
                         f"call sync_gradients on each of them separately")
    if not found:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(f"sync_gradients: no GatedDeltaNetCP model found in {type(model).__name__} (searched "
                             f"model.modules()), so no CP / DP group to reduce the gradients over")
        return None, None
    return next(iter(found.values()))
