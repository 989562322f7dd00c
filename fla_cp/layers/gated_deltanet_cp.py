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
from fla_cp.layers.gated_delta_cp import GatedDeltaCPMixin
from fla_cp.ops.backends import merge_deprecated_backends


class GatedDeltaNetCP(GatedDeltaCPMixin, GatedDeltaNet):
    """FLA's GatedDeltaNet layer whose forward also runs on a CP shard (see module docstring).

    Takes FLA's constructor arguments plus the kernels it runs on:
        backend: the GDN operator's and the short conv's (`chunk_cp_gated_delta_rule(backend=...)`,
            `causal_conv(backend=...)`): "auto" (triton on CUDA, torch elsewhere), "triton" (our and
            FLA's Triton kernels) or "torch"; or a backend object (`fla_cp.ops.backends`) for the
            operator, the conv then running "auto".
        kernel_backend, conv_backend: deprecated (one release, FutureWarning): the former separate
            choices, folded into `backend` (conv's "fla" is "triton"); values other than "auto" must agree.
    Forcing "torch" on a GPU runs the pure-PyTorch path there: slower, but a second opinion.
    The CP forward itself is `fla_cp.layers.gated_delta_cp.GatedDeltaCPMixin` (shared with every family);
    this class supplies FLA's projections, gates, output norm and cache.
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
        last_state = self.cp_cache_state(past_key_values)
        if cp is not None:
            # before the first collective (the conv halo): bad or mismatched input must raise, not hang
            self.check_cp_call(hidden_states, cp, attention_mask, use_cache, last_state, verify_agreement)
        last_state = last_state or {}
        o, recurrent_state, conv_state = self.run_gated_delta(
            hidden_states, cp, attention_mask, cu_seqlens, conv_state=last_state.get('conv_state'),
            recurrent_state=last_state.get('recurrent_state'), use_cache=use_cache)
        if past_key_values is not None:
            if conv_state is not None:
                # FLA's layout: the (q, k, v) convs' states, [N, D_i, W] each
                conv_state = tuple(torch.split(conv_state, [self.key_dim, self.key_dim, self.value_dim], 1))
            update_layer_cache(
                module=self, past_key_values=past_key_values, recurrent_state=recurrent_state,
                conv_state=conv_state, offset=cp.total_len if cp is not None else hidden_states.shape[1])
        return o, None, past_key_values

    def cp_cache_state(self, past_key_values) -> dict | None:
        """This layer's cached states in the shared layout (`recurrent_state` `[N, HV, K, V]`, `conv_state`
        `[N, C, W]`: FLA's (q, k, v) conv states side by side), `{}` for a cache that holds nothing for this
        layer yet, None without a cache."""
        if past_key_values is None:
            return None
        state = get_layer_cache(module=self, past_key_values=past_key_values)
        if state is None:
            return {}
        state = dict(state)
        conv = state.get('conv_state')
        if conv is not None and self.use_short_conv:
            try:
                state['conv_state'] = torch.cat(conv, 1)
            except (TypeError, RuntimeError):
                pass        # left as it is: `_cache_error` names what it holds
        return state

    # ------------------------------------------------------------------ the family's pieces
    def gdn_sizes(self) -> tuple[int, int, int, int, int, int]:
        return (self.hidden_size, self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                self.conv_size if self.use_short_conv else 0)

    def _cp_project(self, hidden_states):
        """q|k|v projections side by side `[B, T, 2*H*K + HV*V]` (one conv over all their channels)."""
        x = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        return x, None

    def _cp_conv_params(self):
        """FLA's q/k/v convs' weights `[C, W]` and biases (None without conv_bias), their activation."""
        if not self.use_short_conv:
            return None
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = torch.cat([c.weight.squeeze(1) for c in convs], 0)
        bias = torch.cat([c.bias for c in convs], 0) if self.conv_bias else None
        return weight, bias, self.q_conv1d.activation

    def _cp_qkv_gates(self, conv_out, hidden_states, extras):
        if not self.use_short_conv:
            conv_out = F.silu(conv_out)
        q, k, v = torch.split(conv_out, [self.key_dim, self.key_dim, self.value_dim], -1)
        q, k = (rearrange(x, '... (h d) -> ... h d', d=self.head_k_dim) for x in (q, k))
        v = rearrange(v, '... (h d) -> ... h d', d=self.head_v_dim)
        g = gdn_gate(self.a_proj(hidden_states), self.A_log, self.dt_bias)
        beta = self.b_proj(hidden_states).float().sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return q, k, v, g, beta.to(hidden_states.dtype)

    def _cp_output(self, o, hidden_states, extras):
        if self.use_gate:
            gate = rearrange(self.g_proj(hidden_states), '... (h d) -> ... h d', d=self.head_v_dim)
            o = rms_norm_gated(self.o_norm, o, gate)
        else:
            o = rms_norm(self.o_norm, o)
        return self.o_proj(rearrange(o, 'b t h d -> b t (h d)'))
