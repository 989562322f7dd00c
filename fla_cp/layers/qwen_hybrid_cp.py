"""CP forwards of transformers' Qwen3.5 / Qwen3.5-MoE / Qwen3-Next token mixers.

The three families share their GDN math and their gated attention (docs/notes/qwen3_5_and_qwen3_next.md);
only the GDN's input projections differ (Qwen3.5: separate `in_proj_qkv/z/b/a`; Qwen3-Next: fused,
per-key-head-grouped `in_proj_qkvz/ba`). A family's CP layer subclasses transformers' module (same
parameters, same init) and one of these mixins, which replace `forward`:

- `QwenGatedDeltaNetCPMixin`: the GDN through `GatedDeltaCPMixin` (conv halo over transformers'
  `[q | k | v]` conv channels, the CP operator with in-kernel l2norm, gates as transformers computes
  them: `beta = sigmoid(b)`, `g = -exp(A_log) * softplus(a + dt_bias)` in fp32), transformers' own
  `RMSNormGated` and `out_proj`; `_cp_project` is Qwen3.5's projections (Qwen3-Next overrides it).
  States live in transformers' `DynamicCache` (`LinearAttentionLayer`: `conv_states[0]` `[B, C, W]` = the last W conv
  inputs, `recurrent_states[0]` `[B, HV, K, V]`), our layouts exactly.
- `QwenGatedAttentionCPMixin`: transformers' q/gate split, q/k RMSNorm and (partial) RoPE on this
  rank's tokens at the positions the model gives (global, per document), then `attention_cp`
  (K/V all-gather), the sigmoid output gate and `o_proj`. Keys and values live in the `DynamicCache`
  (`[B, Hkv, S, D]`, after norm and RoPE, as transformers stores them; replicated under CP).

Padding: the GDN makes pads neutral (fla_cp's convention, `GatedDeltaCPMixin`). transformers only
zeroes the pads' hidden states; outputs at real tokens agree for left and right padding, and the
left-padded states agree; a right-padded prefill's final state differs (transformers decays it over
the pads), and a hole inside a row raises here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fla_cp import checks
from fla_cp.layers.gated_delta_cp import GatedDeltaCPMixin
from fla_cp.ops import attention_cp
from fla_cp.ops.chunk_cp import _single_process_context


class QwenGatedDeltaNetCPMixin(GatedDeltaCPMixin):
    """transformers' `*GatedDeltaNet.forward` under CP (module docstring). `_cp_project` is Qwen3.5's (and
    Qwen3.5-MoE's) separate projections; Qwen3-Next's layer overrides it."""

    backend = "auto"        # set from the model config's `backend` by the model

    def forward(self, hidden_states, cache=None, attention_mask=None, cp_context=None, cu_seqlens=None,
                verify_agreement: bool = True, **kwargs):
        """`hidden_states` `[B, T(_loc), D]` -> `[B, T(_loc), D]`; writes this call's final states into
        `cache` (transformers' `DynamicCache`) when one is given, as transformers does."""
        cp = cp_context
        last_state = self.cp_cache_state(cache)
        if cp is not None:
            self.check_cp_call(hidden_states, cp, attention_mask, cache is not None, last_state, verify_agreement)
        state = last_state or {}
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"{type(self).__name__}: attention_mask must be a [B, T] 0/1 padding mask, got "
                             f"{tuple(attention_mask.shape)}")
        o, recurrent_state, conv_state = self.run_gated_delta(
            hidden_states, cp, attention_mask, None if cp is not None else cu_seqlens,
            conv_state=state.get('conv_state'), recurrent_state=state.get('recurrent_state'),
            use_cache=cache is not None)
        if cache is not None:
            self._write_cache(cache, conv_state, recurrent_state,
                              cp.total_len if cp is not None else hidden_states.shape[1])
        return o

    # ------------------------------------------------------------------ transformers' cache
    def cp_cache_state(self, cache) -> dict | None:
        """This layer's states in the shared layout, `{}` before the cache holds any, None without a cache."""
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        if not getattr(layer, "has_previous_state", {}).get(0, False):
            return {}
        return {'conv_state': layer.conv_states[0], 'recurrent_state': layer.recurrent_states[0]}

    def _write_cache(self, cache, conv_state, recurrent_state, n_tokens: int) -> None:
        """Store the final states (assigned, not copied in place: a cache kept in the graph then trains
        through the next chunk, as with fla_cp's other layers) and count the tokens as transformers does
        (`get_seq_length` of a hybrid reads its first linear layer's count)."""
        layer = cache.layers[self.layer_idx]
        if not layer.is_conv_states_initialized[0]:
            layer.lazy_initialization(conv_states=conv_state)
        if not layer.is_recurrent_states_initialized[0]:
            layer.lazy_initialization(recurrent_states=recurrent_state)
        layer.conv_states[0] = conv_state
        layer.recurrent_states[0] = recurrent_state
        layer.has_previous_state[0] = True
        layer.cumulative_length_linear.add_(n_tokens)

    # ------------------------------------------------------------------ the family's pieces
    def gdn_sizes(self) -> tuple[int, int, int, int, int, int]:
        return (self.hidden_size, self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                self.conv_kernel_size)

    def _cp_project(self, hidden_states):
        """Qwen3.5: conv channels `[q | k | v]` of `in_proj_qkv`; extras (z `[B, T, HV, V]`, b, a)."""
        B, T, _ = hidden_states.shape
        z = self.in_proj_z(hidden_states).reshape(B, T, -1, self.head_v_dim)
        return self.in_proj_qkv(hidden_states), (z, self.in_proj_b(hidden_states), self.in_proj_a(hidden_states))

    def _cp_conv_params(self):
        # transformers' conv1d: depthwise [C, 1, W], no bias, the config's activation (silu)
        return self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation

    def _cp_qkv_gates(self, conv_out, hidden_states, extras):
        B, T, _ = conv_out.shape
        _, b, a = extras
        q, k, v = torch.split(conv_out, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, -1, self.head_k_dim)
        k = k.reshape(B, T, -1, self.head_k_dim)
        v = v.reshape(B, T, -1, self.head_v_dim)
        beta = b.sigmoid()
        # as transformers: in fp32 (in fp16 A might be -inf otherwise)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return q, k, v, g, beta

    def _cp_output(self, o, hidden_states, extras):
        z = extras[0]
        B, T = o.shape[:2]
        o = self.norm(o.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(o.reshape(B, T, -1))


class QwenGatedAttentionCPMixin:
    """transformers' Qwen3.5 / Qwen3-Next `*Attention.forward` under CP (module docstring). The family
    sets `_apply_rotary` (its module's `apply_rotary_pos_emb`, partial rotary included)."""

    backend = "auto"        # attention_cp's kernel; set by the model ("torch" when the config says so)
    _apply_rotary = None

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, cp_context=None,
                cu_seqlens=None, verify_agreement: bool = True, **kwargs):
        """`hidden_states` `[B, T(_loc), D]`, `position_embeddings` (cos, sin) of this rank's tokens ->
        (`[B, T(_loc), D]`, None)."""
        cp = cp_context
        last_state = self.cp_cache_state(cache)
        if cp is not None:
            error = self._cp_input_error(hidden_states, cp, attention_mask, last_state)
            if error:
                raise ValueError(f"{type(self).__name__}: rank {cp.rank}: {error}")
            ctx = cp
        else:
            B, T = hidden_states.shape[:2]
            ctx, error = _single_process_context(T, cu_seqlens)
            if error is None and last_state:
                error = self._cache_error(last_state, B, ctx.packed)
            if error:
                raise ValueError(f"{type(self).__name__}: {error}")
        B, T = hidden_states.shape[:2]
        T_call = ctx.total_len
        mask = None if ctx.packed else attention_mask
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"{type(self).__name__}: attention_mask must be a [B, T] 0/1 padding mask, got "
                             f"{tuple(mask.shape)}")
        call_mask = mask[:, -T_call:] if mask is not None and mask.shape[1] > T_call else mask

        # transformers' projections: q and its gate interleaved per head, q/k RMSNorm before RoPE
        q, gate = torch.chunk(self.q_proj(hidden_states).view(B, T, -1, self.head_dim * 2), 2, dim=-1)
        gate = gate.reshape(B, T, -1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(hidden_states).view(B, T, -1, self.head_dim))
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
        cos, sin = position_embeddings
        q, k = type(self)._apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)            # [B, T, H(kv), D]

        past_kv = past_mask = None
        if last_state:
            # every key before this call, replicated on every rank: [B, Hkv, S, D] -> [B, S, Hkv, D]
            past_kv = (last_state['keys'].transpose(1, 2), last_state['values'].transpose(1, 2))
            Lp = past_kv[0].shape[1]
            if mask is not None and mask.shape[1] >= T_call + Lp:
                past_mask = mask[:, mask.shape[1] - T_call - Lp:mask.shape[1] - T_call]
        o = attention_cp(q, k, v, cp, causal=True, window_size=None, scale=self.scaling, attention_mask=call_mask,
                         cu_seqlens=cu_seqlens if cp is None else None, backend=self.backend,
                         verify_agreement=False, past_key_value=past_kv, past_mask=past_mask)
        if cache is not None:
            # the cache is replicated: the whole call's K/V on every rank (one differentiable all-gather of
            # K and V side by side; reduce-scatter in backward)
            if cp is not None and cp.world_size > 1:
                k, v = cp.unshard(torch.cat([k, v], -2), dim=1, verify_agreement=False).chunk(2, -2)
            cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        o = o.reshape(B, T, -1) * torch.sigmoid(gate)
        return self.o_proj(o), None

    # ------------------------------------------------------------------ cache and checks
    def cp_cache_state(self, cache) -> dict | None:
        """{'keys', 'values'} `[B, Hkv, S, D]` cached before this call, `{}` when none yet, None without a cache."""
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        keys = getattr(layer, "keys", None)
        if not getattr(layer, "is_initialized", False) or keys is None or keys.numel() == 0:
            return {}
        return {'keys': layer.keys, 'values': layer.values}

    def cp_sizes(self) -> list[int]:
        """What the K/V exchange's shapes follow from: D, H, Hkv, head dim, window (none)."""
        return [self.config.hidden_size, self.config.num_attention_heads, self.config.num_key_value_heads,
                self.head_dim, 0]

    def _cp_input_error(self, hidden_states, cp, attention_mask, last_state, mask_content: bool = True) -> str | None:
        error = checks.layer_input_error(hidden_states, self.config.hidden_size, cp)
        if error:
            return error
        B = hidden_states.shape[0]
        if last_state:
            error = self._cache_error(last_state, cp.num_seqs if cp.packed else B, cp.packed)
            if error:
                return error
        if attention_mask is not None and not cp.packed:
            if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
                return f"attention_mask must be a [B, T] 0/1 padding mask ([{B}, {cp.total_len}]), got {got}"
            if attention_mask.shape[1] < cp.total_len and last_state:
                return (f"attention_mask: with cached keys pass the global mask ([{B}, past + {cp.total_len}]), "
                        f"not this rank's shard: the cached pads must stay masked")
        return None

    def _cache_error(self, last_state, N: int, packed: bool) -> str | None:
        keys = last_state['keys']
        if packed:
            return ("a packed continuation of an attention layer's cache is not supported (transformers' cache "
                    "holds one key sequence per row); continue a packed prefill without cu_seqlens per document")
        want = (N, self.config.num_key_value_heads, self.head_dim)
        if keys.dim() != 4 or (keys.shape[0], keys.shape[1], keys.shape[3]) != want:
            return f"a continuation needs cached keys [{N}, {want[1]}, S, {want[2]}] (one row per row), got " \
                   f"{tuple(keys.shape)}"
        return None
