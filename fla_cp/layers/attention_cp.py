"""Softmax attention with context parallelism, parameter-compatible with FLA's `Attention` (`fla/layers/attn.py`).

    o, _, _ = layer(hidden_states_local, cp_context=ctx)        # ctx from fla_cp.ops.build_cp_context

`AttentionCP` is an `fla.layers.attn.Attention` subclass with FLA's submodules: `q_proj`, `k_proj`,
`v_proj` (bias with `qkv_bias`), `o_proj` (no bias), with `qk_norm` `q_norm`/`k_norm` (FLA's `RMSNorm`
over `head_dim`, fp32 weight) and `rotary` (FLA's `RotaryEmbedding(dim=head_dim, base=rope_theta)`, no
persistent buffer), so FLA state dicts load unchanged. Construction: FLA's `Attention.__init__` raises
ImportError when flash-attn is not importable (its guard `if flash_attn_func is None`), before creating
any submodule; then the same submodules are created here in the same order with the same arguments
(`_build_like_fla`: same names, shapes, dtypes and, under the same seed, the same values; the test compares
them with FLA's layer built with the guard bypassed). With flash-attn installed FLA's own `__init__` runs.

Forward, FLA's semantics on every path (what its flash-attn calls compute):
- projections, then `q_norm`/`k_norm` per head (when `qk_norm`), then RoPE, then causal softmax attention
  (scale `head_dim ** -0.5`, flash-attn's default), `o_proj`.
- RoPE positions: FLA's rotary (non-interleaved halves, angles `pos * inv_freq` in fp32, cos/sin tables
  rounded to q's dtype, rotation computed in fp32) with `pos` = the token's index in its row (dense; a
  padding mask does NOT shift positions without a cache: FLA passes `seqlen_offset=0`, so a left-padded
  row's first token sits at position = its number of pads) or in its document (packed `cu_seqlens`:
  positions restart at every document start). Under CP the positions are the GLOBAL ones of each local
  token (from the context's parts and its global `cu_seqlens`), never local indices.
  `max_position_embeddings` only sizes FLA's table (a position's angle does not depend on it): unused.
- window: FLA passes flash-attn `window_size=(W - 1, 0)`: a query at t sees keys t-W+1 .. t (W keys,
  itself included), which is `attention_cp(window_size=W)` exactly.
- `attention_mask` `[B, T]` (dense only; ignored with packed input, as FLA ignores it when `cu_seqlens` is
  given): FLA unpads the tokens, runs varlen flash-attn and pads the output back with zeros, so padded
  keys are never seen and padded rows output `o_proj(0) = 0`. `attention_cp` gives the same for any 0/1
  mask without a window; with a window FLA counts unpadded tokens and `attention_cp` stream positions,
  identical for left/right padding only, so a mask with a hole (`[1, 0, 1]`) raises ValueError with a
  window (without CP, or under CP when `verify_agreement`: a host sync). Values other than 0/1 raise
  (FLA's unpad would misread them).
- `backend`: constructor keyword, `attention_cp`'s kernels ("auto" picks by device and dtype).

KV caches (FLA's `Cache`, `attn_state` = (K, V) `[B, L, Hkv*D]` per layer, the last W with a window), as
FLA's forward uses them, with or without CP:
- a cache given (even an empty one) receives this call's K/V (FLA's `update`, which keeps the last W with
  a window), and RoPE positions start at the tokens seen so far minus each row's pads in the given mask
  (FLA's offset: a left-padded row's first real token sits at 0);
- a cache with content is continued: every query also sees the cached keys (masked by the mask's columns
  before this call's, when `attention_mask` spans the past as generate passes it, `[B, past + T]`).
- Under CP the cache is replicated, like the GDN layers' states: the call's K/V are all-gathered
  (differentiable) and every rank stores all of them; a continuation's queries read the cached keys on
  their own rank (`attention_cp(past_key_value=...)`, no exchange for the past).
- Not supported (ValueError): continuing a cache with packed input (FLA asserts the same); a rank-local
  mask with a cache (the positions count each row's pads over the whole row).
- With a window, a multi-token continuation sees the cached keys within the window (FLA's own code
  path there mixes up a truncated cache and the mask; a decode step is the same in both).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from fla.layers import attn as fla_attn
from fla.layers.attn import Attention
from fla.modules import RMSNorm, RotaryEmbedding

from fla.layers.utils import get_layer_cache

from fla_cp import checks
from fla_cp.layers.functional import rms_norm
from fla_cp.ops.attention import ATTENTION_BACKENDS, attention_cp
from fla_cp.ops.chunk_cp import _single_process_context


def flash_attn_available() -> bool:
    """Whether FLA's `Attention` can be built and run its own forward (flash-attn importable)."""
    return getattr(fla_attn, "flash_attn_func", None) is not None


class AttentionCP(Attention):
    """FLA's softmax-attention layer whose forward also runs on a CP shard (see module docstring).

    Takes FLA's constructor arguments (`hidden_size`, `num_heads`, `num_kv_heads`, `qkv_bias`, `qk_norm`,
    `window_size`, `rope_theta`, `max_position_embeddings`, `layer_idx`) plus
        backend: `attention_cp`'s kernel, "auto" (default: flash-attn on CUDA for fp16/bf16 when installed,
            else SDPA on CUDA, else the fp32 "torch" math), "torch", "sdpa" or "flash".
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        if not isinstance(backend, str) or backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        error = _size_error(*args, **kwargs)
        if error:
            raise ValueError(f"{type(self).__name__}: {error}")
        if flash_attn_available():
            super().__init__(*args, **kwargs)
        else:
            self._build_like_fla(*args, **kwargs)
        if self.rotary.scale is not None:
            raise ValueError(f"{type(self).__name__}: XPos rotary scaling (scale_base) is not supported")
        self.backend = backend

    def _build_like_fla(self, hidden_size: int = 2048, num_heads: int = 32, num_kv_heads: int | None = None,
                        qkv_bias: bool = False, qk_norm: bool = False, window_size: int | None = None,
                        rope_theta: float | None = 10000., max_position_embeddings: int | None = None,
                        layer_idx: int = None):
        """FLA 0.6's `Attention.__init__` without its flash-attn guard: the same attributes, and the same
        submodules created in the same order (so the same seed gives the same values)."""
        nn.Module.__init__(self)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = self.num_heads if num_kv_heads is None else num_kv_heads
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be divisible by num_kv_heads"
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm

        self.window_size = window_size
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=self.qkv_bias)
        self.k_proj = nn.Linear(self.hidden_size, self.kv_dim, bias=self.qkv_bias)
        self.v_proj = nn.Linear(self.hidden_size, self.kv_dim, bias=self.qkv_bias)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, dtype=torch.float32)
            self.k_norm = RMSNorm(self.head_dim, dtype=torch.float32)

        self.rotary = RotaryEmbedding(dim=self.head_dim, base=self.rope_theta)

    # ------------------------------------------------------------------ forward
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
        # {}: a cache still empty for this layer: written below, and RoPE takes FLA's offset
        last_state = self.cp_cache_state(past_key_values)
        if cp is not None:
            # before the first collective (the op's K/V exchange): bad or mismatched input must raise, not hang
            self.check_cp_call(hidden_states, cp, attention_mask, use_cache, last_state, verify_agreement,
                               cu_seqlens=cu_seqlens)
            ctx = cp
        else:
            ctx, cu_seqlens = self._single_process_call(hidden_states, attention_mask, cu_seqlens, last_state)
        B, T, _ = hidden_states.shape
        packed = ctx.packed
        T_call = ctx.total_len                           # this call's tokens per row (all ranks)
        # FLA ignores the mask with cu_seqlens; a mask spanning the past too ([B, past + T], as generate
        # passes it) has this call's columns last
        mask = None if packed else attention_mask
        call_mask = mask[:, -T_call:] if mask is not None and mask.shape[1] > T_call else mask

        q = rearrange(self.q_proj(hidden_states), '... (h d) -> ... h d', d=self.head_dim)
        k = rearrange(self.k_proj(hidden_states), '... (h d) -> ... h d', d=self.head_dim)
        v = rearrange(self.v_proj(hidden_states), '... (h d) -> ... h d', d=self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(self.q_norm, q), rms_norm(self.k_norm, k)

        pos = rope_positions(ctx, hidden_states.device)
        if past_key_values is not None:
            # FLA's offset with a cache (even an empty one): the tokens seen so far, minus each row's pads
            # in the given mask, so that a left-padded row's first token sits at 0
            pos = pos + past_key_values.get_seq_length(self.layer_idx)
            if mask is not None:
                pos = pos[None, :] - (mask == 0).sum(-1, keepdim=True).to(pos.device)
        q, k = self._rope(q, pos), self._rope(k, pos)

        past_kv = past_mask = None
        cached = last_state.get('attn_state') if last_state is not None else None
        if cached is not None:
            # the keys right before this call (the last W with a window), replicated on every rank
            past_kv = tuple(rearrange(x, 'b l (h d) -> b l h d', d=self.head_dim) for x in cached)
            Lp = past_kv[0].shape[1]
            if mask is not None and mask.shape[1] >= T_call + Lp:
                past_mask = mask[:, mask.shape[1] - T_call - Lp:mask.shape[1] - T_call]

        o = attention_cp(q, k, v, cp, causal=True, window_size=self.window_size, scale=self.head_dim ** -0.5,
                         attention_mask=call_mask, cu_seqlens=cu_seqlens if cp is None else None,
                         backend=self.backend, verify_agreement=False, past_key_value=past_kv, past_mask=past_mask)

        if past_key_values is not None:
            # FLA writes this call's K/V into any cache it is given; under CP the cache is replicated: the
            # whole call's K/V on every rank (one differentiable all-gather, reduce-scatter in backward)
            if cp is not None and cp.world_size > 1:
                # one gather of K and V side by side (the same head dim here)
                k, v = cp.unshard(torch.cat([k, v], -2), dim=1, verify_agreement=False).chunk(2, -2)
            past_key_values.update(attn_state=(k.flatten(-2, -1), v.flatten(-2, -1)), layer_idx=self.layer_idx,
                                   offset=T_call, cache_kwargs=dict(window_size=self.window_size))
        o = self.o_proj(o.reshape(B, T, -1))
        return o, None, past_key_values

    def cp_cache_state(self, past_key_values) -> dict | None:
        """This layer's cached state (FLA's `attn_state`), `{}` for a cache still empty for it, None without one."""
        if past_key_values is None:
            return None
        return get_layer_cache(module=self, past_key_values=past_key_values) or {}

    def _single_process_call(self, hidden_states, attention_mask, cu_seqlens, last_state):
        """(the one-process context of a call without CP, cu_seqlens as a tensor), after its checks."""
        if not torch.is_tensor(hidden_states) or hidden_states.dim() != 3:
            got = tuple(hidden_states.shape) if torch.is_tensor(hidden_states) else type(hidden_states).__name__
            raise ValueError(f"{type(self).__name__}: hidden_states must be [B, T, D], got {got}")
        B, T, _ = hidden_states.shape
        if cu_seqlens is not None and not torch.is_tensor(cu_seqlens):
            cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.long, device=hidden_states.device)
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"{type(self).__name__}: cu_seqlens requires batch size 1, got {B}")
        ctx, error = _single_process_context(T, cu_seqlens)
        if error is None and ctx.total_len != T:
            error = f"cu_seqlens[-1]={ctx.total_len} does not match the input's {T} tokens"
        if error is None and last_state is not None:
            error = self._cache_error(last_state, ctx.num_seqs if ctx.packed else B, ctx.packed)
        if error is None and attention_mask is not None and cu_seqlens is None:
            error = self._mask_error(attention_mask, B, (T,), hidden_states.device, content=True,
                                     longer=last_state is not None)
        if error:
            raise ValueError(f"{type(self).__name__}: {error}")
        return ctx, cu_seqlens

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """FLA's rotary embedding of x `[B, T, H, D]` at positions `pos` `[T]` or per row `[B, T]` (any device).

        As `RotaryEmbedding._update_cos_sin_cache` + its kernel: angles `pos * inv_freq` in fp32 (the
        buffer's dtype with `pos_idx_in_fp32=False`), cos/sin rounded to x's dtype (FLA's table dtype), the
        rotation in fp32 (halves, or adjacent pairs when `interleaved`), the result in x's dtype; channels
        beyond the rotary dim pass unchanged. A negative position (a left-padded row's pads with a cache) is
        rotated by its angle: FLA's kernel leaves such rows unwritten; they are padding, never read."""
        rot = self.rotary
        if rot.pos_idx_in_fp32:
            inv_freq = rot.inv_freq if rot.inv_freq.dtype == torch.float32 else \
                rot._compute_inv_freq(device=x.device)
            t = pos.to(device=x.device, dtype=torch.float32)
        else:
            inv_freq, t = rot.inv_freq, pos.to(device=x.device, dtype=rot.inv_freq.dtype)
        freqs = t[..., None] * inv_freq.to(x.device)                        # torch.outer, as FLA
        cos = freqs.cos().to(x.dtype).float()[..., None, :]                 # [(B,) T, 1, R]
        sin = freqs.sin().to(x.dtype).float()[..., None, :]
        R = freqs.shape[-1]
        xr = x[..., :2 * R].float()
        if rot.interleaved:
            x0, x1 = xr[..., 0::2], xr[..., 1::2]
            y = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)
        else:
            x0, x1 = xr[..., :R], xr[..., R:]
            y = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
        y = y.to(x.dtype)
        return y if 2 * R == x.shape[-1] else torch.cat([y, x[..., 2 * R:]], -1)

    # ------------------------------------------------------------------ CP checks
    def check_cp_call(self, hidden_states, cp, attention_mask=None, use_cache=False, last_state=None,
                      verify_agreement: bool = True, cu_seqlens=None):
        """Raise ValueError (naming the rank) on bad CP input; with `verify_agreement`, on every rank when
        any rank's input is bad or ranks disagree (one tiny all_gather, skipped for one rank).

        As `GatedDeltaNetCP.check_cp_call`: a CP model makes one check for all its layers (from
        `_cp_input_error` and `cp_sizes`) and runs them with `verify_agreement=False`, vouching for the
        mask's content; then only the free local checks run here."""
        error = self._cp_input_error(hidden_states, cp, attention_mask, last_state, mask_content=verify_agreement)
        if error is None and cu_seqlens is not None:       # (hidden_states is [B, T_loc, D] here)
            error = cp.input_error(*hidden_states.shape[:2], "hidden_states", cu_seqlens=cu_seqlens)
        if verify_agreement and cp.world_size > 1:
            fields = checks.layer_fields(hidden_states, cp, attention_mask, use_cache, self.cp_sizes(),
                                         content=True)
            # the op's backward is collective: every rank must record a graph, or none
            fields["records a graph (grad mode on, input or parameters requiring grad)"] = \
                [checks.records_graph(hidden_states, *self.parameters())]
            checks.check_agreement(cp.group, error, fields, what=type(self).__name__)
        elif error:
            raise ValueError(f"{type(self).__name__}: rank {cp.rank}: {error}")

    def _cp_input_error(self, hidden_states, cp, attention_mask, last_state, mask_content: bool = True) -> str | None:
        """This rank's problem with a CP call, or None. Nothing here communicates; `mask_content` checks the
        padding mask's values (and holes, with a window): one host sync."""
        error = checks.layer_input_error(hidden_states, self.hidden_size, cp)
        if error:
            return error
        B, T, _ = hidden_states.shape
        if last_state is not None:
            error = self._cache_error(last_state, cp.num_seqs if cp.packed else B, cp.packed)
            if error:
                return error
        if attention_mask is not None and not cp.packed:
            local = torch.is_tensor(attention_mask) and attention_mask.dim() == 2 \
                and attention_mask.shape[1] < cp.total_len
            if local and last_state is not None:
                # (an empty cache too: it is filled with K/V rotated at positions shifted by the row's pads)
                return (f"attention_mask: with a cache (past_key_values, or use_cache=True, which eval mode "
                        f"defaults to) pass the global mask ([{B}, {cp.total_len}] or [{B}, past + "
                        f"{cp.total_len}]), not this rank's shard: RoPE positions then count each row's pads "
                        f"(FLA's offset); or pass use_cache=False without a cache")
            return self._mask_error(attention_mask, B, (cp.total_len, T), hidden_states.device, mask_content, local,
                                    longer=last_state is not None)
        return None

    def _cache_error(self, last_state, N: int, packed: bool) -> str | None:
        """Why this layer's cache can't serve a call with N rows (or N packed sequences), or None."""
        cached = last_state.get('attn_state')
        if cached is None:
            return None
        if packed:
            return ("past_key_values: a packed input (cu_seqlens) cannot continue an attention layer's KV cache "
                    "(its cache holds rows, not documents; FLA refuses it too): continue as a dense batch")
        want = self.num_kv_heads * self.head_dim
        shapes = [tuple(x.shape) if torch.is_tensor(x) else None for x in cached]
        if len(shapes) != 2 or any(sh is None or len(sh) != 3 or sh[0] != N or sh[2] != want for sh in shapes) \
                or shapes[0][1] != shapes[1][1]:
            return (f"past_key_values: a continuation needs this attention layer's cache to hold one K/V row per "
                    f"input row, [B={N}, L, Hkv*D={want}] each, got {shapes}")
        return None

    def _mask_error(self, attention_mask, B: int, lengths: tuple, device, content: bool, local: bool = False,
                    longer: bool = False):
        """`longer`: a continuation, whose mask may span the past too (`[B, past + T]`; this call's columns
        are the last T, the only ones checked for content)."""
        if (not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or attention_mask.shape[0] != B
                or not (attention_mask.shape[1] in lengths or longer and attention_mask.shape[1] > max(lengths))
                or attention_mask.is_complex()):
            got = (f"{attention_mask.dtype} of shape {tuple(attention_mask.shape)}" if torch.is_tensor(attention_mask)
                   else type(attention_mask).__name__)
            want = " or ".join(f"[{B}, {n}]" for n in dict.fromkeys(lengths))
            if longer:
                want += f" or [{B}, past + {max(lengths)}]"
            return f"attention_mask must be a [B, T] 0/1 padding mask ({want}), got {got}"
        if attention_mask.device != device:
            return f"attention_mask is on {attention_mask.device} but hidden_states is on {device}"
        if not content:
            return None
        if attention_mask.shape[1] > max(lengths):
            # the past's 0/1 values were checked when it was this call; only this call's columns are read for holes
            attention_mask = attention_mask[:, -max(lengths):]
        if self.window_size is not None:
            error = checks.padding_mask_error(attention_mask)
            if error and "hole" in error:
                error += (f" with window_size={self.window_size} (FLA counts the window in unpadded tokens, "
                          f"attention_cp in positions)")
        else:
            bad = (attention_mask != 0) & (attention_mask != 1)
            error = None
            if bool(bad.any()):
                b = int(bad.any(-1).nonzero()[0])
                values = sorted(set(attention_mask[b].tolist()))[:6]
                error = f"attention_mask must hold only 0/1; row {b} holds {values}"
        if error and local:
            error += " (positions within this rank's shard of the row)"
        return error

    def cp_sizes(self) -> list[int]:
        """The layer's sizes that its collectives' shapes follow from (D, H, Hkv, head_dim, window or 0),
        for the agreement check (`fla_cp.checks.layer_fields`)."""
        return [self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, int(self.window_size or 0)]


def _size_error(hidden_size: int = 2048, num_heads: int = 32, num_kv_heads: int | None = None,
                window_size: int | None = None, **_) -> str | None:
    """What FLA's constructor would assert (or silently truncate: head_dim = hidden_size // num_heads), as
    an error naming the argument; None when the sizes fit."""
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1
    if not positive_int(hidden_size) or not positive_int(num_heads):
        return f"hidden_size and num_heads must be ints >= 1, got {hidden_size!r} and {num_heads!r}"
    if hidden_size % num_heads:
        return f"num_heads={num_heads} does not divide hidden_size={hidden_size} (head_dim must be an integer)"
    if num_kv_heads is not None and (not positive_int(num_kv_heads) or num_heads % num_kv_heads):
        return f"num_kv_heads={num_kv_heads!r} must be an int >= 1 dividing num_heads={num_heads} (GQA groups)"
    if window_size is not None and not positive_int(window_size):
        return f"window_size must be None or an int >= 1 (keys a query sees, itself included), got {window_size!r}"
    return None


def rope_positions(cp, device) -> torch.Tensor:
    """RoPE position of each local token `[T_loc]` (int64): its global index in its document (packed) or
    row (dense), from the context's parts and global `cu_seqlens`; memoised per context and device."""
    def build():
        idx = torch.cat([torch.arange(s, e) for s, e in cp.local_ranges])
        cu = cp.cu_seqlens
        doc = torch.searchsorted(cu, idx, right=True) - 1
        return (idx - cu[doc]).to(device)
    return cp.memo(("rope_positions", str(device)), build)
