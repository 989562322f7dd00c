"""The CP plumbing of an HF model, written once for every model family.

A family's modeling file stays plain transformers/FLA code (its blocks, its base model that embeds and
runs the layers, its causal-LM head); it mixes these in and calls one hook:

    class MyCPPreTrainedModel(CPModelMixin, MyPreTrainedModel): ...
    class MyCPModel(MyCPPreTrainedModel):
        def __init__(self, config, device_mesh=None, cp_group=None):
            ...;  self.setup_cp(config, device_mesh, cp_group)
        def forward(self, input_ids=None, ..., cu_seqlens=None, inputs_are_sharded=False, cp_context=None,
                    _cp_loss=None):
            hidden_states, cp, cu_seqlens = self.cp_enter(input_ids, inputs_embeds, attention_mask=..., ...)
            for layer in self.layers: hidden_states = layer(hidden_states, cp_context=cp, ...)
            ...   # return the output with `out.cp_context = cp`
    class MyCPForCausalLM(CPForCausalLMMixin, MyCPPreTrainedModel, ...):   # `self.model`, `self.lm_head`

`CPModelMixin` holds the process groups (`cp_group`, `dp_group`, `cp_size`), which calls run CP
(`runs_replicated`), the split and sharding of the inputs and the forward's cross-rank check
(`cp_enter`, policy in `fla_cp.checks`). `CPForCausalLMMixin` holds the causal-LM forward (global label
shift, global loss, gathered logits), `generate` (settings check, RNG sharing) and the cache kwarg of
every transformers release. Layers plug into the check through three methods: `cp_sizes()`, `cp_cache_state(cache)` and
`_cp_input_error(hidden_states, cp, attention_mask, last_state)` (see `fla_cp.layers.GatedDeltaNetCP`).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from fla_cp import checks
from fla_cp.models.hf_compat import CACHE_KWARG, cache_field, generate_cache_kwargs, one_cache, output_cache
from fla_cp.ops import build_cp_context, comm
from fla_cp.parallel import loss as cp_loss
from fla_cp.parallel.mesh import groups_for_from_pretrained, resolve_cp_groups


class CPModelMixin:
    """Process groups, the split of a call's inputs and the forward's cross-rank check (module docstring)."""

    # ------------------------------------------------------------------ groups
    @classmethod
    def from_pretrained(cls, *args, device_mesh=None, cp_group=None, **kwargs):
        """HF `from_pretrained`, plus `device_mesh=` (dims ("dp", "cp")) or `cp_group=`."""
        with groups_for_from_pretrained(device_mesh, cp_group):
            return super().from_pretrained(*args, **kwargs)

    def setup_cp(self, config, device_mesh=None, cp_group=None) -> None:
        """Resolve this model's groups (see `fla_cp.parallel.mesh.resolve_cp_groups`)."""
        self.cp_group, self.dp_group = resolve_cp_groups(config, device_mesh, cp_group)
        self.cp_size = config.cp_size
        self._cp_agreed = checks.AgreedSignatures()

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

    # ------------------------------------------------------------------ the split
    def build_cp_context(self, seq_len: int | None = None, cu_seqlens=None):
        """The `CPContext` this model uses for a batch (collective over the CP group)."""
        if seq_len is None and cu_seqlens is None:
            raise ValueError("pass seq_len (dense) or cu_seqlens (packed)")
        if cu_seqlens is not None:
            return build_cp_context(self.cp_group, cu_seqlens=cu_seqlens, layout=self.config.cp_layout)
        return build_cp_context(self.cp_group, seq_len=seq_len, layout=self.config.cp_layout)

    def _num_cp_parts(self) -> int:
        return self.cp_size * (2 if self.config.cp_layout == "zigzag" else 1)

    def runs_replicated(self, num_tokens: int, inputs_are_sharded: bool = False, cp_context=None) -> bool:
        """Whether a forward of `num_tokens` new tokens (per row; packed: in total) skips the CP split and
        runs in full on every CP rank: when the inputs are the full batch (not pre-sharded, no explicit
        `cp_context`) and too short to give every CP part a token. That covers decode steps and short
        prompts or continuation chunks, with or without a cache; everything longer runs CP, a
        continuation from a cache included. Replicated results equal cp_size=1's, and their gradients
        are scaled so that `sync_gradients` yields the single-device gradient (`replicated_grad`).
        Every rank decides alike: the length, the flags and the context are in the agreement check
        (docs/DESIGN.md §9)."""
        return (self.cp_size > 1 and not inputs_are_sharded and cp_context is None
                and num_tokens < self._num_cp_parts())

    def _cp_split(self, input_ids, inputs_embeds, cu_seqlens, inputs_are_sharded, cp_context):
        """(the CP split of this call or None, this rank's error or None); None without CP (cp_size 1) and
        for calls that run replicated (`runs_replicated`). Never communicates: the split's agreement is
        part of the forward's check, so its errors are returned, not raised."""
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
            # the split needs the boundaries on the host: one read of a device tensor (pass a list or a CPU
            # tensor to avoid it), reused for the cache key
            cu = _host_boundaries(cu_seqlens)
            try:
                build = lambda: build_cp_context(  # noqa: E731
                    self.cp_group, cu_seqlens=cu, layout=layout, verify_agreement=False)
                return (self._memo_split(("packed", tuple(cu), layout), build) if _hashable(cu) else build()), None
            except ValueError as e:
                return None, _build_error(e)
        T = x.shape[1]
        total = T * (self.cp_size if inputs_are_sharded else 1)
        try:
            ctx = self._memo_split(("dense", total, layout), lambda: build_cp_context(
                self.cp_group, seq_len=total, layout=layout, verify_agreement=False))
        except ValueError as e:
            what = "this rank's shard" if inputs_are_sharded else "the sequence"
            return None, f"{name} has {T} tokens along dim 1 ({what}): {_build_error(e)}"
        n_parts = self._num_cp_parts()
        if inputs_are_sharded and any(p.end - p.start != T * self.cp_size // n_parts for p in ctx.parts):
            return None, (f"{name} has {T} tokens along dim 1: with inputs_are_sharded=True and a dense batch "
                          f"whose length is not a multiple of the number of CP parts, pass "
                          f"cp_context=model.build_cp_context(seq_len=T)")
        return ctx, None

    def _memo_split(self, key, build):
        """The same dense split for the same length (its index tables stay cached in the context across
        steps); packed splits by their boundaries. A small cache, newest kept."""
        memo = self.__dict__.setdefault("_cp_splits", {})
        if key not in memo:
            if len(memo) >= 8:
                memo.pop(next(iter(memo)))
            memo[key] = build()
        return memo[key]

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

    def _cp_layers(self) -> list:
        """One CP layer of each kind: class and sizes (their checks speak for every layer of that kind: a
        continuation's cache holds every layer's states from the same calls; a hybrid's windowed and full
        attention layers are two kinds). Found once: a model's layers are fixed."""
        found = self.__dict__.get("_cp_layer_kinds")
        if found is None:
            kinds = {}
            for m in self.modules():
                if m is not self and hasattr(m, "cp_sizes") and hasattr(m, "_cp_input_error"):
                    kinds.setdefault((type(m), tuple(m.cp_sizes())), m)
            found = self.__dict__["_cp_layer_kinds"] = list(kinds.values())
        return found

    def _cp_layer_order(self) -> int:
        """A checksum of which kind (`_cp_layers`' index) each CP layer is, in module order."""
        found = self.__dict__.get("_cp_layer_order_code")
        if found is None:
            kinds = [(type(m), tuple(m.cp_sizes())) for m in self._cp_layers()]
            order = [kinds.index((type(m), tuple(m.cp_sizes()))) for m in self.modules()
                     if m is not self and hasattr(m, "cp_sizes") and hasattr(m, "_cp_input_error")]
            found = self.__dict__["_cp_layer_order_code"] = checks.checksum([len(order), *order])
        return found

    # ------------------------------------------------------------------ the forward's entry
    def cp_enter(self, input_ids, inputs_embeds, *, attention_mask=None, cu_seqlens=None, past_key_values=None,
                 use_cache=False, inputs_are_sharded=False, cp_context=None, loss_args=None, extra_error=None):
        """(this rank's input hidden states `[B, T_loc, D]`, the call's `CPContext` or None, `cu_seqlens`
        as a tensor): the split, the sharded and embedded inputs, after the call's cross-rank check.

        Under CP (cp_size > 1) the check is the forward's only collective before the layers' (prefill or
        decode), and only when the call's signature is new (`fla_cp.checks`): it raises the same ValueError
        on every CP rank when any rank found bad input (this rank's split, its shard, its ids, labels,
        mask or cache) or the ranks disagree (decode vs prefill, split, batch, mask, labels, ...).
        `loss_args`: what the causal-LM head will do with the output (labels, ...), checked with it.
        `extra_error`: what the family's forward found wrong with its own inputs (raised on every rank).
        Policy and protocol: docs/DESIGN.md §13."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        inputs = input_ids if input_ids is not None else inputs_embeds
        if cu_seqlens is not None and not torch.is_tensor(cu_seqlens):
            # a list of ints (as build_cp_context takes), for every block, attention ones included
            try:
                cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.long, device=inputs.device)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                pass    # left as given: the split's checks report it (on every CP rank, not just this one)
        embeddings = self.get_input_embeddings()
        if self.cp_size == 1:
            self._cp_split(input_ids, inputs_embeds, cu_seqlens, inputs_are_sharded, cp_context)
            hidden_states = embeddings(input_ids) if inputs_embeds is None else inputs_embeds
            return hidden_states, None, cu_seqlens

        # No collective before the check: an error found on one rank must reach every rank.
        cp, error = self._cp_split(input_ids, inputs_embeds, cu_seqlens, inputs_are_sharded, cp_context)
        error = extra_error or error or self._shard_error(input_ids, inputs_embeds, cp, inputs_are_sharded)
        fields, loss_error = self._forward_fields(inputs, input_ids, inputs_embeds, cp, cp_context, attention_mask,
                                                  use_cache, past_key_values, inputs_are_sharded, cu_seqlens,
                                                  loss_args, content=False)
        error = error or loss_error
        signature = checks.signature_of(fields)
        if error is None and not self._cp_agreed.needs_check("forward", self.cp_group, signature):
            # steady state: the same signature as the last agreed call, no collective and no host sync but
            # the layers' local checks: free, except a padding mask's check for holes (every rank holding
            # the same global mask raises alike)
            if cp is not None and not inputs_are_sharded:
                input_ids = cp.shard(input_ids, dim=1) if input_ids is not None else None
                inputs_embeds = cp.shard(inputs_embeds, dim=1) if inputs_embeds is not None else None
            # (a replicated step holds the whole batch on every rank: a bad id raises alike on every rank)
            hidden_states = inputs_embeds if inputs_embeds is not None else \
                _embed_or_nan(embeddings, input_ids) if cp is not None else embeddings(input_ids)
            # (a rank-local mask [B, T_loc] differs by rank: its error would be raised on one rank alone)
            global_mask = cp is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 2
                                         and attention_mask.shape[1] >= cp.total_len)
            error = self._layer_input_error(hidden_states, cp, attention_mask, past_key_values, cu_seqlens,
                                            mask_content=global_mask)
            if error:
                raise ValueError(f"{type(self).__name__}: rank {_rank(self.cp_group)}: {error}")
            return hidden_states, cp, cu_seqlens

        hidden_states = None
        content_error = None
        if error is None and input_ids is not None:
            # bad ids would raise in the embedding on one rank only and leave the others waiting in the
            # check; the content code catches ranks passing different "same" global batches (not
            # comparable for shards). The embedding's size now: resize_token_embeddings changes it.
            content_error, code = checks.token_ids_check(input_ids, embeddings.num_embeddings)
            fields["input_ids (given, inputs_are_sharded, length along dim 1, content)"][3] = \
                code if not inputs_are_sharded else 0
        error = error or content_error
        if cp is not None and not inputs_are_sharded and error is None:
            input_ids = cp.shard(input_ids, dim=1) if input_ids is not None else None
            inputs_embeds = cp.shard(inputs_embeds, dim=1) if inputs_embeds is not None else None
        if error is None:
            hidden_states = embeddings(input_ids) if inputs_embeds is None else inputs_embeds
            error = self._layer_input_error(hidden_states, cp, attention_mask, past_key_values, cu_seqlens)
        full, loss_error = self._forward_fields(
            inputs, input_ids, inputs_embeds, cp, cp_context, attention_mask, use_cache, past_key_values,
            inputs_are_sharded, cu_seqlens, loss_args, content=True,
            ids_field=fields["input_ids (given, inputs_are_sharded, length along dim 1, content)"])
        error = error or loss_error
        checks.check_agreement(self.cp_group, error, full, what=type(self).__name__)
        self._cp_agreed.agreed("forward", self.cp_group, signature)
        return hidden_states, cp, cu_seqlens

    def _forward_fields(self, inputs, input_ids, inputs_embeds, cp, cp_context, attention_mask, use_cache,
                        past_key_values, inputs_are_sharded, cu_seqlens, loss_args, content: bool,
                        ids_field=None) -> tuple[dict, str | None]:
        """(the forward's agreement fields, this rank's loss-input error or None); without `content`, host
        metadata only: the call's signature."""
        # what the ranks pass must agree (the length unless shards of a given split, which may differ)
        same_len = not inputs_are_sharded or (cu_seqlens is None and cp_context is None)
        ids_field = ids_field or [input_ids is not None, bool(inputs_are_sharded),
                                  inputs.shape[1] if inputs.dim() > 1 and same_len else 0, 0]
        cache_len = _cache_length(past_key_values)
        new_tokens = cp.total_len if cp is not None else (inputs.shape[1] if inputs.dim() > 1 else 0)
        embeddings = self.get_input_embeddings()
        dtype = embeddings.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        hidden = (inputs.shape[0] if inputs.dim() > 0 else 0, dtype, inputs.device)
        fields = checks.model_fields(
            cache_len=cache_len, new_tokens=new_tokens, inputs_field=ids_field,
            records=checks.records_graph(inputs_embeds, *self.parameters()),
            num_layers=len(getattr(self, "layers", ())), vocab=embeddings.num_embeddings,
            recomputes=bool(getattr(self, "gradient_checkpointing", False) and self.training), content=content)
        layers = self._cp_layers()
        # every kind's sizes, then which kind each layer is, in order: ranks whose hybrids place attention
        # on different layers would pair one layer's K/V gather with another's state exchange
        sizes = [n for layer in layers for n in layer.cp_sizes()] + [self._cp_layer_order()]
        fields.update(checks.layer_fields(hidden, cp, attention_mask, use_cache, sizes, content=content))
        error = None
        if loss_args is not None:
            loss_fields, error = checks.loss_fields(**loss_args, inputs=inputs, content=content)
            fields.update(loss_fields)
        return fields, error

    def _layer_input_error(self, hidden_states, cp, attention_mask, past_key_values, cu_seqlens,
                           mask_content: bool = True) -> str | None:
        """The layers' own checks of this rank's input (one layer of each kind speaks for all); `mask_content`:
        also the padding mask's check for holes (a host sync)."""
        for layer in self._cp_layers():
            # the layer's cached states in its own layout; {}: a cache still empty for it (it will be written)
            last_state = layer.cp_cache_state(past_key_values)
            if cp is not None:
                error = layer._cp_input_error(hidden_states, cp, attention_mask, last_state, mask_content)
            elif last_state is not None and torch.is_tensor(hidden_states):
                # a replicated step (decode, short chunk): a cache that doesn't fit would raise in the layer
                # on this rank only, after the others had passed the check
                packed = torch.is_tensor(cu_seqlens) and cu_seqlens.dim() == 1
                error = layer._cache_error(last_state, cu_seqlens.numel() - 1 if packed else hidden_states.shape[0],
                                           packed)
            else:
                error = None
            if error:
                return error
        return None


class CPForCausalLMMixin:
    """The causal-LM forward, `generate` and generation inputs of a CP model with `self.model` (a model
    using `CPModelMixin.cp_enter`) and `self.lm_head`. Its process groups are its base model's."""

    @property
    def cp_group(self):
        return self.model.cp_group

    @property
    def dp_group(self):
        return self.model.dp_group

    @property
    def cp_size(self) -> int:
        return self.model.cp_size

    @property
    def _cp_agreed(self) -> checks.AgreedSignatures:
        return self.model._cp_agreed

    def cp_causal_lm_forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        cu_seqlens=None,
        inputs_are_sharded=False,
        gather_logits=False,
        shift_labels=None,
        cp_context=None,
        cache=None,
        **kwargs,
    ):
        """The forward of docs/models.md: this rank's logits (or the gathered global ones) and the global loss
        (docs/DESIGN.md §6)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = one_cache(cache, past_key_values, type(self).__name__)
        has_labels = labels is not None or shift_labels is not None
        keeps = logits_to_keep.numel() > 0 if torch.is_tensor(logits_to_keep) else bool(logits_to_keep)
        gathers = gather_logits or (not has_labels and keeps)
        loss_args = None
        if self.cp_size > 1:
            loss_args = dict(labels=labels, shift_labels=shift_labels, gathers=gathers,
                             num_items_in_batch=num_items_in_batch, vocab_size=self.lm_head.out_features,
                             sharded=inputs_are_sharded)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            past_key_values=past_key_values, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True, cu_seqlens=cu_seqlens, inputs_are_sharded=inputs_are_sharded,
            cp_context=cp_context, _cp_loss=loss_args, **kwargs)
        hidden_states, cp = outputs.last_hidden_state, outputs.cp_context
        # a call shorter than the CP split (decode steps too) runs in full on every CP rank: its
        # gradients are replicated
        replicated = self.cp_size > 1 and cp is None

        loss, logits, fused_linear = None, None, False
        if has_labels:
            if shift_labels is None:
                shift_labels = labels if inputs_are_sharded else cp_loss.shift_labels_globally(labels, cu_seqlens)
            if cp is not None and not inputs_are_sharded:
                shift_labels = cp.shard(shift_labels, dim=1)
            shift_labels = shift_labels.to(hidden_states.device)
            unusable = None
            if cp is not None:
                # out-of-range values on one rank's shard must not raise there alone (see usable_labels)
                shift_labels, unusable = cp_loss.usable_labels(shift_labels, self.lm_head.out_features)
            # FLA's fused linear + cross-entropy never forms the [T, V] logits (and returns none, as FLA);
            # with use_l2warp its penalty would be scaled by the loss's global mean, so the plain path runs
            use_l2warp = getattr(self.config, "use_l2warp", False)
            fused_linear = (getattr(self.config, "fuse_linear_cross_entropy", False) and not use_l2warp
                            and not replicated and cp_loss.fla_loss_kernels_run_on(hidden_states.device))
            if not fused_linear:
                logits = cp_loss.replicated_grad(self.lm_head(hidden_states), self.cp_size if replicated else 1)
            loss_sum = cp_loss.token_loss_sum(logits, shift_labels, hidden_states, self.lm_head,
                                      fuse_cross_entropy=getattr(self.config, "fuse_cross_entropy", False))
            loss = cp_loss.global_loss(loss_sum, shift_labels, cp, num_items_in_batch,
                                       l2warp_logits=logits if use_l2warp else None, unusable=unusable)

        # a family's extra loss over the global batch (a MoE router's load balancing): (value, weight) or None
        aux = self._cp_aux_loss(outputs, cp, attention_mask)
        if aux is not None:
            aux, weight = aux
            aux = cp_loss.replicated_grad(aux, self.cp_size if replicated else 1)
            if loss is not None:
                loss = loss + weight * aux.to(loss.device)

        if cp is not None and gathers:
            # generation wants the last positions, which live on the last rank: gather hidden states
            # (D per token, cheaper than V) and project everywhere. Every rank then holds the same
            # global logits and computes the same loss on them: the gather's backward sums the ranks'
            # (equal) gradients and `replicated_grad` divides by P, so after `sync_gradients` that
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
            logits = cp_loss.replicated_grad(self.lm_head(hidden_states), self.cp_size if replicated else 1)

        if not return_dict:
            output = (logits, output_cache(outputs), outputs.hidden_states)
            output = tuple(o for o in output if o is not None)
            return (loss,) + output if loss is not None else output
        if aux is not None:
            return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits,
                                             hidden_states=outputs.hidden_states,
                                             router_logits=outputs.get("router_logits"),
                                             **cache_field(output_cache(outputs)))
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **cache_field(output_cache(outputs)))

    def _cp_aux_loss(self, outputs, cp, attention_mask):
        """A family's auxiliary loss over the global batch, `(value, weight)`, added to the loss; None here."""
        return None

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
            fields, error = checks.generate_fields(prompt, kwargs, config)
            checks.check_agreement(self.cp_group, error, fields, what=f"{type(self).__name__}.generate")
            if kwargs.get("do_sample", getattr(config, "do_sample", False)):
                share_rng_state(self.cp_group, self.device)
        return super().generate(inputs, generation_config=generation_config, **kwargs)


def share_rng_state(group, device: torch.device) -> None:
    """Copy CP rank 0's RNG state to every CP rank (the generators sampling may draw from)."""
    torch.set_rng_state(comm.broadcast_from_first(torch.get_rng_state(), group))
    if device.type == "cuda":
        state = comm.broadcast_from_first(torch.cuda.get_rng_state(device), group)
        torch.cuda.set_rng_state(state, device)


def _embed_or_nan(embeddings, input_ids: torch.Tensor) -> torch.Tensor:
    """`embeddings(input_ids)`, with NaN where an id is outside the vocabulary, without a host sync: in
    steady state (no check) a bad id on one rank's shard must not raise there alone and leave the others
    waiting in the next collective; NaN reaches the output and the global loss on every rank instead.
    The full check (a new signature, or `FLA_CP_DEBUG=1`) names the rank and the ids."""
    vocab = embeddings.num_embeddings
    bad = (input_ids < 0) | (input_ids >= vocab)
    return embeddings(input_ids.clamp(0, vocab - 1)).masked_fill(bad.unsqueeze(-1), float("nan"))


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _host_boundaries(cu_seqlens):
    """Packed boundaries as a host list when they are a 1-D integer tensor (one read), else as given: the
    split's own checks word what is wrong with them."""
    if torch.is_tensor(cu_seqlens) and cu_seqlens.dim() == 1 and not cu_seqlens.is_floating_point():
        return cu_seqlens.tolist()
    return cu_seqlens


def _hashable(cu) -> bool:
    try:
        hash(tuple(cu))
        return True
    except TypeError:
        return False


def _cache_length(past_key_values) -> int:
    """Tokens already in the cache (0 without one): > 0 means a continuation or decode step."""
    if past_key_values is None or not hasattr(past_key_values, "get_seq_length"):
        return 0
    return int(past_key_values.get_seq_length())


def _build_error(e: ValueError) -> str:
    """`build_cp_context`'s message without its "build_cp_context: rank r: " prefix (the model's check
    names the rank)."""
    head, _, rest = str(e).partition(": rank ")
    return rest.partition(": ")[2] if head == "build_cp_context" and rest else str(e)
