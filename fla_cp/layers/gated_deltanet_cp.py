"""GatedDeltaNet with context parallelism, parameter-compatible with FLA's `GatedDeltaNet`.

`GatedDeltaNetCP` *is* an `fla.layers.GatedDeltaNet` (it subclasses it and keeps its constructor), so
parameter names, shapes and initialisation are FLA's by construction and FLA state dicts load
unchanged. Only `forward` differs:

    o, _, cache = layer(hidden_states_local, cp_context=ctx)        # ctx from fla_cp.ops.build_cp_context

- `hidden_states_local` is this rank's `[B, T_loc, D]` slice (`ctx.shard(x, dim=1)`); the output is
  the same slice of what one device computes on the whole sequence (states cross ranks inside
  `chunk_cp_gated_delta_rule`, conv halos inside `conv_halo`).
- `cp_context=None`: an ordinary single-device layer (any device). `cu_seqlens` then gives packed
  local boundaries (B == 1); with a context, boundaries come from `ctx.cu_seqlens` (global).
- `attention_mask` `[B, T]` (1 = token, 0 = padding; left or right padding) gives FLA's per-token
  results: padded positions are made *neutral* instead of being removed — their conv input is zero,
  their decay is 1 (g = 0) and their write strength is 0 (beta = 0), so the state and the conv window
  of the first real token are exactly those of an unpadded sequence, and their outputs are zero.
  This keeps a dense CP split valid for padded rows. The mask must hold only 0/1 and each row's
  tokens must be one contiguous run (left, right or both-sided padding): a hole (`[1, 1, 0, 1, 1]`) is
  not padding — FLA would join the pieces, here the conv window would see the zeros — so it raises
  ValueError (not at decode steps without CP, whose mask is the growing global one). Under CP the
  mask may be global `[B, T]` (every rank checks whole rows; preferred) or this rank's `[B, T_loc]`:
  then each rank can only check its own tokens, and a hole spanning ranks (e.g. a row whose tokens
  end on one rank and start again on the next) is not detected — that would take a collective.
- `backend` (constructor keyword, not a parameter or buffer): the kernels of the GDN operator
  (`chunk_cp_gated_delta_rule(backend=...)`) and of the short conv (`causal_conv` of
  `fla_cp.layers.short_conv_cp`), one choice. "auto" (default) runs Triton on CUDA — FLA's chunk kernels and ours, and
  FLA's fused `causal_conv1d` as FLA's layer does (the CP halo / decode cache is its per-sequence
  `initial_state`) — and the pure-PyTorch path elsewhere; "triton" / "torch" force one (off CUDA
  "triton" needs Triton's interpreter, for tests). The decode step has no separate path: it is this
  conv with the cache as initial state (FLA's single-token `causal_conv1d_update` is not used).
  `kernel_backend` / `conv_backend`, the former separate choices, are deprecated aliases.
- `past_key_values`/`use_cache`: FLA's `Cache`; the recurrent state is stored as `[N, HV, K, V]`
  (fla_cp's layout, not FLA's `state_v_first`) and the conv state as FLA's `(q, k, v)` tuple of
  `[N, D, W]` (N: rows, or packed sequences). Under CP the final states of every sequence are
  gathered to all ranks, so the cache is replicated: a later call may run without CP (a decode step,
  every rank in full) or with CP again (a multi-token continuation: each sequence starts from its
  cached recurrent state, the operator's `initial_state`, and conv windows reaching before its start
  read its cached inputs, appended to the halo; no extra collective). A CP continuation may pass the
  mask as generate does, `[B, past + T]` (checked whole, its last T columns used); a packed one needs
  the cache to hold one state per sequence of its `cu_seqlens`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from fla.layers import GatedDeltaNet
from fla.layers.utils import get_layer_cache, update_layer_cache

from fla_cp.layers.functional import gdn_gate, rms_norm, rms_norm_gated
from fla_cp.layers.short_conv_cp import causal_conv, conv_halo, resolve_conv_backend, window_index_of
from fla_cp import checks
from fla_cp.ops import chunk_cp_gated_delta_rule, comm
from fla_cp.ops.backends import merge_deprecated_backends


class GatedDeltaNetCP(GatedDeltaNet):
    """FLA's GatedDeltaNet layer whose forward also runs on a CP shard (see module docstring).

    Takes FLA's constructor arguments plus the kernels it runs on:
        backend: the GDN operator's and the short conv's (`chunk_cp_gated_delta_rule(backend=...)`,
            `causal_conv(backend=...)`): "auto" (triton on CUDA, torch elsewhere), "triton" (our and
            FLA's Triton kernels) or "torch"; or a backend object (`fla_cp.ops.backends`) for the
            operator, the conv then running "auto".
        kernel_backend, conv_backend: deprecated (one release, FutureWarning): the former separate
            choices, folded into `backend` (conv's "fla" is "triton"); values other than "auto" must agree.
    Forcing "torch" on a GPU runs the pure-PyTorch path there: slower, but a second opinion.
    """

    def __init__(self, *args, backend="auto", kernel_backend=None, conv_backend=None, **kwargs):
        backend = merge_deprecated_backends(backend, kernel_backend, conv_backend, who=type(self).__name__,
                                            objects=True)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        cp_context=None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        verify_agreement: bool = True,
        **kwargs,
    ):
        cp = cp_context
        last_state = get_layer_cache(module=self, past_key_values=past_key_values)
        if cp is not None:
            # before the first collective (the conv halo): bad or mismatched input must raise, not hang
            self.check_cp_call(hidden_states, cp, attention_mask, use_cache, last_state, verify_agreement)
        B, T, _ = hidden_states.shape
        if cp is None and cu_seqlens is not None and not torch.is_tensor(cu_seqlens):
            # a list of ints, as build_cp_context takes under CP
            cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.long, device=hidden_states.device)
        if cp is None and cu_seqlens is not None and B != 1:
            raise ValueError(f"cu_seqlens requires batch size 1, got {B}")

        mask = self._local_mask(attention_mask, cp, cu_seqlens, T)
        if mask is not None:
            hidden_states = hidden_states * mask.unsqueeze(-1).to(hidden_states.dtype)

        row_bounds = self._row_segments(cp, cu_seqlens, T)
        flat_bounds = [(b * T + s, b * T + e) for b in range(B) for s, e in row_bounds]

        conv_state = None
        if self.use_short_conv:
            q, k, v, conv_state = self._short_conv(hidden_states, cp, flat_bounds, row_bounds, last_state, use_cache)
        else:
            q, k, v = (F.silu(p(hidden_states)) for p in (self.q_proj, self.k_proj, self.v_proj))

        q, k = (rearrange(x, '... (h d) -> ... h d', d=self.head_k_dim) for x in (q, k))
        v = rearrange(v, '... (h d) -> ... h d', d=self.head_v_dim)
        g = gdn_gate(self.a_proj(hidden_states), self.A_log, self.dt_bias)
        beta = self.b_proj(hidden_states).float().sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        beta = beta.to(hidden_states.dtype)
        if mask is not None:
            # neutral padding: S_t = S_{t-1} exactly (decay 1, no write; docs/DESIGN.md §8)
            g = g * mask.unsqueeze(-1)
            beta = beta * mask.unsqueeze(-1).to(beta.dtype)

        # a continuation (CP or not) starts every sequence from its cached state (replicated under CP)
        initial_state = last_state['recurrent_state'] if last_state is not None else None
        if cp is not None:
            o, recurrent_state = chunk_cp_gated_delta_rule(
                q, k, v, g, beta, cp_context=cp, initial_state=initial_state, output_final_state=bool(use_cache),
                use_qk_l2norm_in_kernel=True, backend=self.backend, verify_agreement=False)
        else:
            o, recurrent_state = chunk_cp_gated_delta_rule(
                q, k, v, g, beta, cp_context=None, cu_seqlens=cu_seqlens, initial_state=initial_state,
                output_final_state=bool(use_cache), use_qk_l2norm_in_kernel=True, backend=self.backend)

        if past_key_values is not None:
            update_layer_cache(
                module=self, past_key_values=past_key_values, recurrent_state=recurrent_state,
                conv_state=conv_state, offset=cp.total_len if cp is not None else T)

        if self.use_gate:
            gate = rearrange(self.g_proj(hidden_states), '... (h d) -> ... h d', d=self.head_v_dim)
            o = rms_norm_gated(self.o_norm, o, gate)
        else:
            o = rms_norm(self.o_norm, o)
        o = self.o_proj(rearrange(o, 'b t h d -> b t (h d)'))
        if mask is not None:
            o = o * mask.unsqueeze(-1).to(o.dtype)
        return o, None, past_key_values

    # ------------------------------------------------------------------ CP checks
    def check_cp_call(self, hidden_states, cp, attention_mask=None, use_cache=False, last_state=None,
                      verify_agreement: bool = True):
        """Raise ValueError (naming the rank) on bad CP input; with `verify_agreement`, on every rank
        when any rank's input is bad or ranks disagree (one tiny all_gather, skipped for one rank).

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
        error = checks.layer_input_error(hidden_states, self.hidden_size, cp)
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
        """Why this layer's cache can't continue N sequences (a CP continuation or a replicated step), or None."""
        what = f"one per packed sequence (N={N})" if packed else f"one per row (B={N})"
        state = last_state.get('recurrent_state')
        want = (N, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        if state is not None and (not torch.is_tensor(state) or tuple(state.shape) != want):
            got = tuple(state.shape) if torch.is_tensor(state) else type(state).__name__
            return (f"a continuation needs the cache to hold {what} recurrent states {list(want)}, got {got}"
                    + ("; a packed continuation continues each sequence of its cu_seqlens from its own cached "
                       "state (the cache of a packed prefill with as many sequences)" if packed else ""))
        conv = last_state.get('conv_state') if self.use_short_conv else None
        if conv is not None:
            shapes = [tuple(c.shape) if torch.is_tensor(c) else None for c in conv]
            if len(shapes) != 3 or any(sh is None or sh[0] != N or sh[-1] != self.conv_size for sh in shapes):
                return (f"a continuation needs the cache to hold {what} conv states [N, D, {self.conv_size}], "
                        f"got {shapes}")
        return None

    def cp_sizes(self) -> list[int]:
        """The layer's sizes that its collectives' shapes follow from (D, H, HV, K, V, conv width), for the
        agreement check (`fla_cp.checks.layer_fields`)."""
        return [self.hidden_size, self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                self.conv_size if self.use_short_conv else 0]

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

    def _short_conv(self, hidden_states, cp, flat_bounds, row_bounds, last_state, use_cache):
        """q, k, v after their short convs, run as one conv on the concatenated channels."""
        B, T, _ = hidden_states.shape
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        x = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        C, W = x.shape[-1], self.conv_size
        weight = torch.cat([c.weight.squeeze(1) for c in convs], 0)
        bias = torch.cat([c.bias for c in convs], 0) if self.conv_bias else None

        cached = None
        if last_state is not None and last_state.get('conv_state') is not None:
            # [N, C, W]: each sequence's last W inputs; what precedes the next token is the last W-1
            cached = torch.cat(last_state['conv_state'], 1)[..., 1:].transpose(1, 2)     # [N, W-1, C]
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
        # FLA's layer: the q/k/v convs' weights [D, W] and biases (None without conv_bias), their activation
        y, final = causal_conv(x.reshape(B * T, C), weight, bias, flat_bounds, init,
                               activation=self.q_conv1d.activation, output_final_state=bool(use_cache),
                               window_index=windows, backend=backend)
        q, k, v = torch.split(y.view(B, T, C), [self.key_dim, self.key_dim, self.value_dim], -1)

        conv_state = None
        if use_cache:
            if cp is not None:
                final = self._gather_seq_end_states(final, cp, B)
            conv_state = tuple(torch.split(final, [self.key_dim, self.key_dim, self.value_dim], 1))
        return q, k, v, conv_state

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
