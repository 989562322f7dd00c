"""The CP forward of a Gated DeltaNet layer, written once for every model family.

FLA's `GatedDeltaNet` and transformers' Qwen3.5 / Qwen3-Next `*GatedDeltaNet` compute the same thing
with different projections, gates and output norms: project the tokens, run a causal depthwise short
conv over the concatenated q|k|v channels, split heads, run the gated delta rule, normalise and
project out. Under CP only the conv (its halo) and the rule (its states) cross ranks. `GatedDeltaCPMixin`
holds that part and the layer's CP checks; a family's layer subclasses its own module (so parameter
names stay its checkpoints') and supplies four hooks:

    _cp_project(h)                      -> (conv_in [B, T, C], extras)       # C = 2*H*K + HV*V
    _cp_conv_params()                   -> (weight [C, W], bias [C] | None, activation) or None (no conv)
    _cp_qkv_gates(conv_out, h, extras)  -> q, k [B, T, H, K], v [B, T, HV, V], g [B, T, HV] (fp32 log
                                           decay), beta [B, T, HV]
    _cp_output(o, h, extras)            -> [B, T, D]                         # o: [B, T, HV, V]

and `gdn_sizes()` -> (D, H, HV, K, V, W). `run_gated_delta(...)` returns the output and the final
states in one layout for every family (the recurrent state `[N, HV, K, V]`, the conv state `[N, C, W]`:
each sequence's last W conv inputs, oldest first; N = rows, or packed sequences); the family's
`forward` reads and writes them in its own cache class.

Padding (`attention_mask` `[B, T]`, 1 = token) is made *neutral* (docs/DESIGN.md §8): the pads' conv
inputs are zero, their decay is 1 (g = 0) and their write strength 0 (beta = 0), their outputs zero.
Left- or right-padded rows then give every real token exactly an unpadded row's result; a hole inside a
row raises (see `GatedDeltaNetCP`).
"""
from __future__ import annotations

import torch

from fla_cp import checks
from fla_cp.layers.short_conv_cp import causal_conv, conv_halo, resolve_conv_backend, window_index_of
from fla_cp.ops import chunk_cp_gated_delta_rule, comm


class GatedDeltaCPMixin:
    """CP forward pieces and checks shared by the GDN layers of every family (module docstring).

    The subclass sets `self.backend` (the operator's and the conv's kernels: "auto", "triton", "torch",
    or a backend object for the operator)."""

    # ------------------------------------------------------------------ hooks (the family's layer)
    def gdn_sizes(self) -> tuple[int, int, int, int, int, int]:
        """(hidden size D, q/k heads H, value heads HV, head dims K, V, conv width W or 0)."""
        raise NotImplementedError

    def _cp_project(self, hidden_states):
        raise NotImplementedError

    def _cp_conv_params(self):
        raise NotImplementedError

    def _cp_qkv_gates(self, conv_out, hidden_states, extras):
        raise NotImplementedError

    def _cp_output(self, o, hidden_states, extras):
        raise NotImplementedError

    # ------------------------------------------------------------------ the forward
    def run_gated_delta(self, hidden_states, cp=None, attention_mask=None, cu_seqlens=None,
                        conv_state=None, recurrent_state=None, use_cache=False):
        """(output `[B, T, D]`, final recurrent state or None, final conv state `[N, C, W]` or None).

        `hidden_states`: this rank's `[B, T_loc, D]` under CP (`cp` a `CPContext`), else the whole call
        (`cu_seqlens`: packed local boundaries, B == 1). `conv_state` / `recurrent_state`: a cached
        continuation's states (replicated under CP), in the module docstring's layouts. The caller has
        run the CP checks (`check_cp_call`, or the CP model's one check for every layer)."""
        B, T, _ = hidden_states.shape
        if cp is None and cu_seqlens is not None and not torch.is_tensor(cu_seqlens):
            # a list of ints, as build_cp_context takes under CP
            cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.long, device=hidden_states.device)
        if cp is None and cu_seqlens is not None and B != 1:
            raise ValueError(f"cu_seqlens requires batch size 1, got {B}")
        mask = self._local_mask(attention_mask, cp, cu_seqlens, T)
        if mask is not None:
            hidden_states = hidden_states * mask.unsqueeze(-1).to(hidden_states.dtype)

        conv_in, extras = self._cp_project(hidden_states)
        conv_params = self._cp_conv_params()
        final_conv = None
        if conv_params is not None:
            conv_out, final_conv = self._conv_cp(conv_in, *conv_params, cp, cu_seqlens, conv_state, use_cache)
        else:
            conv_out = conv_in
        q, k, v, g, beta = self._cp_qkv_gates(conv_out, hidden_states, extras)
        if mask is not None:
            # neutral padding: S_t = S_{t-1} exactly (decay 1, no write; docs/DESIGN.md §8)
            g = g * mask.unsqueeze(-1)
            beta = beta * mask.unsqueeze(-1).to(beta.dtype)

        # a continuation (CP or not) starts every sequence from its cached state (replicated under CP)
        if cp is not None:
            o, final_state = chunk_cp_gated_delta_rule(
                q, k, v, g, beta, cp_context=cp, initial_state=recurrent_state, output_final_state=bool(use_cache),
                use_qk_l2norm_in_kernel=True, backend=self.backend, verify_agreement=False)
        else:
            o, final_state = chunk_cp_gated_delta_rule(
                q, k, v, g, beta, cp_context=None, cu_seqlens=cu_seqlens, initial_state=recurrent_state,
                output_final_state=bool(use_cache), use_qk_l2norm_in_kernel=True, backend=self.backend)

        o = self._cp_output(o, hidden_states, extras)
        if mask is not None:
            o = o * mask.unsqueeze(-1).to(o.dtype)
        return o, final_state, final_conv

    def _conv_cp(self, x, weight, bias, activation, cp, cu_seqlens, conv_state, use_cache):
        """(the short conv of `x` `[B, T, C]` with weight `[C, W]`, each sequence's last W inputs `[N, C, W]`
        when `use_cache`), its windows reaching into earlier ranks (the halo, one collective) and into a
        cached continuation's last inputs."""
        B, T, C = x.shape
        W = weight.shape[-1]
        row_bounds = self._row_segments(cp, cu_seqlens, T)
        flat_bounds = [(b * T + s, b * T + e) for b in range(B) for s, e in row_bounds]
        # [N, C, W]: each sequence's last W inputs; what precedes the next token is the last W-1
        cached = conv_state[..., 1:].transpose(1, 2) if conv_state is not None else None    # [N, W-1, C]
        init = cached
        if cp is not None:
            # the halo (one collective) with the cached inputs before each sequence's start
            halo = conv_halo(x, cp, W, cache=cached)
            init = halo.reshape(B * len(row_bounds), W - 1, C) if halo is not None else None
        elif cached is not None and cached.shape[0] != len(flat_bounds):
            raise ValueError(f"conv cache holds {cached.shape[0]} sequences, input has {len(flat_bounds)}")

        # a backend object is the operator's alone: the conv then runs "auto"
        name = self.backend if isinstance(self.backend, str) else "auto"
        backend = resolve_conv_backend(name, x, who=f"{type(self).__name__}(backend={name!r})")
        windows = None
        if cp is not None and backend == "torch":   # the same for every layer of this forward
            windows = cp.memo(("conv_windows", B, W, init is not None, str(x.device)),
                              lambda: window_index_of(flat_bounds, B * T, W, init is not None).to(x.device))
        y, final = causal_conv(x.reshape(B * T, C), weight, bias, flat_bounds, init, activation=activation,
                               output_final_state=bool(use_cache), window_index=windows, backend=backend)
        if use_cache and cp is not None:
            final = self._gather_seq_end_states(final, cp, B)
        return y.view(B, T, C), final

    # ------------------------------------------------------------------ CP checks
    def check_cp_call(self, hidden_states, cp, attention_mask=None, use_cache=False, last_state=None,
                      verify_agreement: bool = True):
        """Raise ValueError (naming the rank) on bad CP input; with `verify_agreement`, on every rank
        when any rank's input is bad or ranks disagree (one tiny all_gather, skipped for one rank).
        `last_state`: the layer's cached states (`cp_cache_state`), `{}` for an empty cache, or None.

        The CP model makes one such check for all its layers (`fla_cp.parallel`, from `_cp_input_error` and
        `cp_sizes`) and runs the layers with `verify_agreement=False`: then the caller vouches for the mask's
        content too (its check for holes is a host sync), and only the free local checks run here.
        """
        error = self._cp_input_error(hidden_states, cp, attention_mask, last_state, mask_content=verify_agreement)
        if verify_agreement and cp.world_size > 1:
            fields = checks.layer_fields(hidden_states, cp, attention_mask, use_cache, self.cp_sizes(),
                                         content=True)
            checks.check_agreement(cp.group, error, fields, what=type(self).__name__)
        elif error:
            raise ValueError(f"{type(self).__name__}: rank {cp.rank}: {error}")

    def _cp_input_error(self, hidden_states, cp, attention_mask, last_state, mask_content: bool = True) -> str | None:
        """This rank's problem with a CP call, or None. Nothing here communicates; `mask_content` checks the
        padding mask for holes (one host sync)."""
        error = checks.layer_input_error(hidden_states, self.gdn_sizes()[0], cp)
        if error:
            return error
        B, T, _ = hidden_states.shape
        if last_state is not None:
            error = self._cache_error(last_state, cp.num_seqs if cp.packed else B, cp.packed)
            if error:
                return error
        if attention_mask is not None and not cp.packed:
            # with a cache, generate's mask spans the past too: [B, past + T] (its last T columns are this call's)
            longer = last_state is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > cp.total_len
            if (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                    or not (attention_mask.shape[1] in (T, cp.total_len) or longer)):
                return (f"attention_mask must be a [B, T] 0/1 padding mask, global [{B}, {cp.total_len}] or "
                        f"this rank's [{B}, {T}] (or [{B}, past + {cp.total_len}] after a cache), got "
                        f"{tuple(attention_mask.shape)}")
            # a longer mask: only this call's columns, as one process reads them (a hole in the past, e.g.
            # a right-padded prefill, is already in the cache)
            if not mask_content:
                return None
            error = checks.padding_mask_error(attention_mask[:, -cp.total_len:] if longer else attention_mask)
            if error and attention_mask.shape[1] < cp.total_len:
                error += " (positions within this rank's shard of the row)"
            return error
        return None

    def _cache_error(self, last_state, N: int, packed: bool) -> str | None:
        """Why this layer's cached states (`cp_cache_state`'s dict) can't continue N sequences (a CP
        continuation or a replicated step), or None."""
        _, _, HV, K, V, W = self.gdn_sizes()
        what = f"one per packed sequence (N={N})" if packed else f"one per row (B={N})"
        state = last_state.get('recurrent_state')
        want = (N, HV, K, V)
        if state is not None and (not torch.is_tensor(state) or tuple(state.shape) != want):
            got = tuple(state.shape) if torch.is_tensor(state) else type(state).__name__
            return (f"a continuation needs the cache to hold {what} recurrent states {list(want)}, got {got}"
                    + ("; a packed continuation continues each sequence of its cu_seqlens from its own cached "
                       "state (the cache of a packed prefill with as many sequences)" if packed else ""))
        conv = last_state.get('conv_state') if W else None
        if conv is not None and (not torch.is_tensor(conv) or conv.dim() != 3 or conv.shape[0] != N
                                 or conv.shape[-1] != W):
            got = tuple(conv.shape) if torch.is_tensor(conv) else type(conv).__name__
            return f"a continuation needs the cache to hold {what} conv states [N, C, {W}], got {got}"
        return None

    def cp_sizes(self) -> list[int]:
        """The layer's sizes that its collectives' shapes follow from (D, H, HV, K, V, conv width), for the
        agreement check (`fla_cp.checks.layer_fields`)."""
        return list(self.gdn_sizes())

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _local_mask(attention_mask, cp, cu_seqlens, T):
        """The padding mask of this call's tokens as float `[B, T]`, or None (packed input ignores it)."""
        if attention_mask is None or cu_seqlens is not None or (cp is not None and cp.packed):
            return None
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [batch_size, seq_len] 0/1 padding mask")
        if cp is not None and attention_mask.shape[-1] > cp.total_len:
            # a CP continuation given generate's [B, past + T] mask: this call's tokens are the last T
            attention_mask = attention_mask[:, -cp.total_len:]
        if cp is not None and attention_mask.shape[-1] == cp.total_len and cp.total_len != T:
            attention_mask = cp.shard(attention_mask, dim=1)
        elif attention_mask.shape[-1] != T:
            # decoding: FLA reads the mask's last q_len columns
            attention_mask = attention_mask[:, -T:]
        elif cp is None:
            # a prefill without CP (under CP the caller's check covers the mask: check_cp_call, or the CP
            # model's, fla_cp.parallel.model.CPModelMixin.cp_enter)
            error = checks.padding_mask_error(attention_mask)
            if error:
                raise ValueError(f"GatedDeltaNetCP: {error}")
        return attention_mask.float()

    @staticmethod
    def _row_segments(cp, cu_seqlens, T) -> list[tuple[int, int]]:
        """Sequence pieces of one row of local tokens, `(start, end)`."""
        if cp is not None:
            return [(s.start, s.end) for s in cp.segments]
        if cu_seqlens is not None:
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T:
                raise ValueError(f"cu_seqlens must span the {T} input tokens, got {cu[:4]}...{cu[-1:]}")
            return list(zip(cu[:-1], cu[1:]))
        return [(0, T)]

    @staticmethod
    def _gather_seq_end_states(final: torch.Tensor, cp, B: int) -> torch.Tensor:
        """Per-sequence conv states `[N, C, W]` on every rank, from the ranks holding sequence ends.

        `final` holds one state per local segment (`[B * S_loc, C, W]`); the segment that ends a
        sequence owns its true state (its window already includes the halo). One all-reduce.
        """
        S = len(cp.segments)
        n_rows = B if not cp.packed else cp.num_seqs
        dest, src = [], []      # (sequence, row of `final`) for each sequence that ends on this rank
        for i, s in enumerate(cp.segments):
            if s.ends_seq:
                pairs = [(s.seq, i)] if cp.packed else [(b, b * S + i) for b in range(B)]
                dest += [d for d, _ in pairs]
                src += [r for _, r in pairs]
        as_index = lambda rows: torch.tensor(rows, dtype=torch.long, device=final.device)  # noqa: E731
        # index_add, not item assignment: the result joins the graph on every rank, also on one that ends
        # no sequence, so that every rank takes part in the all-reduce's backward
        out = final.new_zeros(n_rows, *final.shape[1:])
        out = out.index_add(0, as_index(dest), final.index_select(0, as_index(src)))
        # differentiable, as the recurrent final state is: a continuation trained through an undetached
        # cache (backprop through time) sends its conv windows' gradient back to the owning rank's inputs
        return comm.all_reduce_sum_differentiable(out, cp.group) if cp.world_size > 1 else out
