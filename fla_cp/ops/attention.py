"""`attention_cp`: softmax attention with the sequence split over a CP group, exactly (DESIGN.md §10).

Semantics are one device's causal softmax attention over the global stream: per document when the
context is packed (a query never sees another document's keys, wherever the documents cross ranks),
optionally with a sliding window and a padding mask. Two exchanges, both inside one autograd Function
that saves only this rank's q/k/v and recomputes in backward:

- full attention (`window_size=None`), Llama-3 style: all-gather K/V (`_Unshard`'s all_gather_varlen);
  each local part attends to the keys from the start of its first document to its own end (to the end
  of its last document when not causal). Backward re-gathers K/V and reduce-scatters dK/dV, so each
  rank receives the gradient of its own keys. The gathered `[B, T, Hkv, D]` tensors live only inside
  the forward and the backward, never between them.
- sliding window `W`: each part needs only the `W - 1` keys/values before it (only its first segment
  can continue a document from an earlier part): the conv halo's mechanism (`gathered_part_tails`,
  `halo_rows` in `fla_cp/ops/halo.py`), so communication is O(W), not O(T). Backward
  re-gathers the tails and reduce-scatters their gradient to their owners. The halo gather hands every
  rank every part's tail (`P * n_parts * (W - 1)` rows); when that is at least the stream's `T` rows
  (windows wider than the parts) the K/V of all ranks are gathered instead, as for full attention
  (`_gathers_all`): a window never moves more than full attention.

K, V and the key padding mask travel as one `[B, T_loc, Hkv*D + Hkv*Dv (+1)]` payload (the mask as a
0/1 column in K's dtype: exact), so every exchange is one collective.

Kernels, per local part (`backend`; `fla_cp/ops/attention_kernels.py`):
- "torch": a plain fp32 (fp64 for fp64) matmul-softmax with an explicit boolean mask built from global
  positions and document ids; any device; quadratic memory in the part's queries x keys. The CPU default.
- "sdpa": torch's `scaled_dot_product_attention` with the same boolean mask (not `is_causal`, which is
  top-left aligned when a part's keys start before its queries); in q's dtype. The CUDA default
  without flash-attn, or for fp32.
- "flash": flash-attn's varlen function (FLA's kernel), one varlen sequence per (row, document) of a
  part, bottom-right causal alignment, window `(W - 1, 0)`; CUDA, fp16/bf16; no mask tensor. Exact
  where padding leaves no hole inside a window (left/right padding; the layer refuses holes with a
  window); otherwise it raises ValueError (on the rank that has the hole: call `attention_cp` with
  hole-free masks, or "sdpa"). The CUDA default for fp16/bf16 when flash-attn is installed.
"auto" picks as above. The backward re-runs the part's kernel under autograd, so every kernel saves
only the local q/k/v.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

from fla_cp import checks
from fla_cp.ops import comm
from fla_cp.ops.chunk_cp import _autocast_off, _single_process_context
from fla_cp.ops.context import CPContext, _Unshard
from fla_cp.ops.attention_kernels import KERNELS, attend_flash, attend_sdpa, flash_layout, resolve_attention_kernel
from fla_cp.ops.halo import gathered_part_tails, halo_rows

ATTENTION_BACKENDS = KERNELS
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------- the plan
@dataclass
class _PartPlan:
    """One local part: its query rows, and the keys it attends to.

    full (the K/V of all ranks gathered): keys are global rows `[k0, k1)` of the gathered payload.
    halo (a window): keys are `halo` rows of the gathered tails (or none) followed by the part's own rows.
    Both preceded by the `past` cached keys of a continuation (dense: every row's own), if any.
    `qpos`/`kpos` (global positions; a cached key at -past..-1) and `qdoc`/`kdoc` (document ids; -1: a
    halo row outside the stream) give the structure: on the host for kernels that take lengths (flash),
    and on the device (`device_ids`) for the boolean mask the others take, built per call
    (`_part_mask`): kept between steps it would cost O(T_loc x T) memory per context."""
    full: bool
    q0: int
    n: int
    k0: int
    k1: int
    halo: torch.Tensor | None
    qpos: torch.Tensor
    kpos: torch.Tensor
    qdoc: torch.Tensor
    kdoc: torch.Tensor
    device_ids: tuple
    flash: object = None        # attention_kernels.FlashLayout, built on first use


def _allowed(qpos, kpos, qdoc, kdoc, causal: bool, window: int | None) -> torch.Tensor:
    """`[n, m]`: the query at global position qpos (document qdoc) may see the key at kpos (kdoc): same
    document, causal, window. A key of document -1 (the halo's zero rows outside the stream) is never seen."""
    ok = (qdoc[:, None] == kdoc[None, :]) & (kdoc[None, :] >= 0)
    if causal:
        ok &= kpos[None, :] <= qpos[:, None]
    if window is not None:
        ok &= qpos[:, None] - kpos[None, :] < window
    return ok


def _docs(cu: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Document id of each global position; positions outside the stream get -1."""
    doc = torch.searchsorted(cu, pos, right=True) - 1
    return torch.where((pos < 0) | (pos >= cu[-1]), torch.full_like(doc, -1), doc)


def _plan(cp: CPContext, causal: bool, window: int | None, halo_len: int, past: int, device) -> list[_PartPlan]:
    """Per local part, built once per context and settings (`CPContext.memo`): index vectors, O(n + m).
    `halo_len` 0 with a window: the K/V of all ranks are gathered (`_gathers_all`). `past`: cached keys
    before the call (dense only: they continue every row's one document, at positions -past..-1)."""
    full = _gathers_all(cp, window)

    def build():
        cu = cp.cu_seqlens
        rows = halo_rows(cp, halo_len, True, False) if halo_len else None
        plans, q0 = [], 0
        for j in cp.local_parts:
            p = cp.parts[j]
            n = p.end - p.start
            qpos = torch.arange(p.start, p.end)
            if full:
                k0 = int(cu[p.first_seq])
                if window is not None:          # (causal) only the window's keys
                    k0 = max(k0, p.start - window + 1)
                k1 = p.end if causal else int(cu[p.last_seq + 1])
                kpos, halo = torch.arange(k0, k1), None
            else:
                k0, k1, halo = p.start, p.end, None
                kpos = qpos
                if rows is not None and p.from_prev:
                    i = next(i for i, s in enumerate(cp.segments) if s.part == j)   # the part's first segment
                    halo = rows[i].to(device)
                    kpos = torch.cat([torch.arange(p.start - halo_len, p.start), qpos])
            qdoc, kdoc = _docs(cu, qpos), _docs(cu, kpos)
            if past:
                kpos = torch.cat([torch.arange(-past, 0), kpos])
                kdoc = torch.cat([torch.zeros(past, dtype=kdoc.dtype), kdoc])
            device_ids = tuple(x.to(device) for x in (qpos, kpos, qdoc, kdoc))
            plans.append(_PartPlan(full, q0, n, k0, k1, halo, qpos, kpos, qdoc, kdoc, device_ids))
            q0 += n
        return plans
    return cp.memo(("attention_plan", causal, window, halo_len, past, str(device)), build)


def _part_mask(pp: _PartPlan, causal: bool, window) -> torch.Tensor:
    """The part's `[n, m]` boolean structure on its device, built per call from the memoised index vectors."""
    return _allowed(*pp.device_ids, causal, window)


# ---------------------------------------------------------------------------- compute
def _attend(q, kv, allowed, key_valid, query_valid, Hkv, D, Dv, scale, cdt):
    """Softmax attention of q `[B, n, H, D]` over the keys/values packed in kv `[B, m, C]`, in `cdt`
    (fp32, or fp64 for fp64 inputs). A row that may see no key outputs 0 (no NaN); padded query rows
    (`query_valid` False) output 0. Returns `[B, n, H, Dv]` in `cdt`."""
    B, n, H, _ = q.shape
    m, r = kv.shape[1], H // Hkv
    k = kv[..., :Hkv * D].reshape(B, m, Hkv, D).to(cdt)
    v = kv[..., Hkv * D:Hkv * (D + Dv)].reshape(B, m, Hkv, Dv).to(cdt)
    s = torch.einsum("bngrd,bmgd->bgrnm", q.to(cdt).reshape(B, n, Hkv, r, D), k) * scale
    mask = allowed[None, None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(s - top)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(cdt).tiny)   # an empty row: 0 / tiny = 0
    o = torch.einsum("bgrnm,bmgd->bngrd", p, v).reshape(B, n, H, Dv)
    if query_valid is not None:
        o = o * query_valid[:, :, None, None].to(cdt)
    return o


def _run_parts(q, kv, plans, src, past, mask_col, Hkv, D, Dv, scale, cdt, kernel="torch", causal=True, window=None):
    """Every local part's output, concatenated in local order. `src` holds the keys: the gathered global
    payload (full) or the gathered tails plus one zero row (window), then `kv` the local payload; `past`
    the cached keys' payload `[B, Lp, C]` that precede every part's keys, or None. `kernel`: "torch"
    (`_attend`, in `cdt`), "sdpa" or "flash" (`attention_kernels`, in q's dtype)."""
    outs = []
    for pp in plans:
        qp = q[:, pp.q0:pp.q0 + pp.n]
        if pp.full:
            keys = src[:, pp.k0:pp.k1]
        else:
            own = kv[:, pp.q0:pp.q0 + pp.n]
            keys = own if pp.halo is None else torch.cat([src[:, pp.halo], own], 1)
        if past is not None:
            keys = torch.cat([past, keys], 1)
        key_valid = keys[..., -1] > 0.5 if mask_col else None
        query_valid = kv[:, pp.q0:pp.q0 + pp.n, -1] > 0.5 if mask_col else None
        if kernel == "torch":
            outs.append(_attend(qp, keys, _part_mask(pp, causal, window), key_valid, query_valid, Hkv, D, Dv,
                                scale, cdt))
            continue
        B, m = keys.shape[:2]
        k = keys[..., :Hkv * D].reshape(B, m, Hkv, D)
        v = keys[..., Hkv * D:Hkv * (D + Dv)].reshape(B, m, Hkv, Dv)
        if kernel == "sdpa":
            outs.append(attend_sdpa(qp, k, v, _part_mask(pp, causal, window), key_valid, query_valid, scale))
        else:
            if pp.flash is None:       # the host index work, once per plan
                pp.flash = flash_layout(pp.qpos, pp.kpos, pp.qdoc, pp.kdoc, causal, window)
            outs.append(attend_flash(qp, k, v, pp.qpos, pp.kpos, pp.qdoc, pp.kdoc, key_valid, query_valid, causal,
                                     window, scale, layout=pp.flash))
    return torch.cat(outs, 1)


# ---------------------------------------------------------------------------- exchanges
def _gather_all(kv: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """`[B, T_loc, C]` -> `[B, T, C]` in global order (all_gather_varlen; not recorded by autograd)."""
    with torch.no_grad():
        return _Unshard.apply(kv, cp, 1, False)


def _scatter_all(grad: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """The reverse: each rank receives the sum over ranks of the gradient of its own rows
    (reduce_scatter_varlen; `_Unshard`'s backward)."""
    return _Unshard.backward(SimpleNamespace(cp=cp, dim=1, mean=False), grad.contiguous())[0]


def _gather_halo(kv: torch.Tensor, cp: CPContext, halo_len: int) -> torch.Tensor:
    """Every part's last `halo_len` payload rows (left-padded with zeros), plus one zero row:
    `[B, P*nlp*halo_len + 1, C]` (one all_gather, O(W))."""
    with torch.no_grad():
        tails = gathered_part_tails(kv, cp, halo_len)
    return torch.cat([tails, tails.new_zeros(tails.shape[0], 1, tails.shape[2])], 1)


def _scatter_halo(grad: torch.Tensor, cp: CPContext, halo_len: int, local_len: int) -> torch.Tensor:
    """Gradient of the gathered tails `[B, P*nlp*halo_len (+1), C]` -> this rank's rows `[B, T_loc, C]`
    (one reduce-scatter: each rank receives the summed gradient of its own tails)."""
    B, C = grad.shape[0], grad.shape[2]
    nlp = len(cp.local_parts)
    g = grad[:, :cp.world_size * nlp * halo_len].reshape(B, cp.world_size, nlp * halo_len, C)
    mine = comm.reduce_scatter_varlen([g[:, r].transpose(0, 1).contiguous() for r in range(cp.world_size)], cp.group)
    mine = mine.transpose(0, 1).reshape(B, nlp, halo_len, C)
    out = grad.new_zeros(B, local_len, C)
    offset = 0
    for slot, j in enumerate(cp.local_parts):
        n = cp.parts[j].end - cp.parts[j].start
        h = min(n, halo_len)
        out[:, offset + n - h:offset + n] += mine[:, slot, halo_len - h:]
        offset += n
    return out


# ---------------------------------------------------------------------------- autograd
class AttentionCPFunction(torch.autograd.Function):
    """Saves only this rank's q and K/V payload; K/V from other ranks are re-gathered in backward."""

    @staticmethod
    @_autocast_off
    def forward(ctx, q, k, v, key_mask, k_past, v_past, past_mask, cp: CPContext, causal: bool, window,
                scale: float, kernel: str):
        D, Hkv, Dv = q.shape[3], v.shape[2], v.shape[3]
        mask_col = key_mask is not None or past_mask is not None
        kv, past = _payloads(k, v, key_mask, k_past, v_past, past_mask, mask_col)
        halo_len = _halo_len(cp, window)
        plans = _plan(cp, causal, window, halo_len, _past_len(k_past), q.device)
        src = _exchange(kv, cp, window, halo_len)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        o = _run_parts(q, kv, plans, src, past, mask_col, Hkv, D, Dv, scale, cdt, kernel, causal, window)
        ctx.save_for_backward(q, k, v, key_mask, k_past, v_past, past_mask)
        ctx.cp, ctx.causal, ctx.window, ctx.scale, ctx.kernel = cp, causal, window, scale, kernel
        return o.to(q.dtype)

    @staticmethod
    @once_differentiable
    @_autocast_off
    def backward(ctx, do):
        q, k, v, key_mask, k_past, v_past, past_mask = ctx.saved_tensors
        cp, window = ctx.cp, ctx.window
        T, D, Hkv, Dv = q.shape[1], q.shape[3], v.shape[2], v.shape[3]
        halo_len = _halo_len(cp, window)
        plans = _plan(cp, ctx.causal, window, halo_len, _past_len(k_past), q.device)
        mask_col = key_mask is not None or past_mask is not None
        kv, past = _payloads(k, v, key_mask, k_past, v_past, past_mask, mask_col)
        src = _exchange(kv, cp, window, halo_len)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            q_ = q.detach().requires_grad_()
            kv_ = kv.detach().requires_grad_()
            past_ = past.detach().requires_grad_() if past is not None else None
            if src is not None:
                src = src.detach().requires_grad_()
            o = _run_parts(q_, kv_, plans, src, past_, mask_col, Hkv, D, Dv, ctx.scale, cdt, ctx.kernel, ctx.causal,
                           window)
            leaves = [x for x in (q_, kv_, src, past_) if x is not None]
            grads = list(torch.autograd.grad(o, leaves, do.to(o.dtype), allow_unused=True))
        # sdpa / flash give gradients in q's dtype: the ranks' shares are summed in fp32
        grads = [g.to(cdt) if g is not None else None for g in grads]
        d_past = grads.pop() if past_ is not None else None
        dq, dkv = grads[0], grads[1]
        dkv = torch.zeros_like(kv_, dtype=cdt) if dkv is None else dkv
        if src is not None:
            # every rank must join the reduce-scatter, whether or not its keys were read
            d_src = grads[2] if grads[2] is not None else torch.zeros_like(src, dtype=cdt)
            full = _gathers_all(cp, window)
            if full and cp.world_size > 1:
                dkv = dkv + _scatter_all(d_src, cp)
            elif full:                          # one rank: the "gathered" payload is the local one
                dkv = dkv + d_src
            else:
                dkv = dkv + _scatter_halo(d_src, cp, halo_len, T)
        dk = dkv[..., :Hkv * D].reshape(k.shape).to(k.dtype)
        dv = dkv[..., Hkv * D:Hkv * (D + Dv)].reshape(v.shape).to(v.dtype)
        dk_past = dv_past = None
        if past_ is not None:
            # the cached keys are replicated: this rank's queries' share of their gradient (partial, as
            # for the GDN op's initial_state: the sum over the group is one device's)
            d_past = torch.zeros_like(past_, dtype=cdt) if d_past is None else d_past
            dk_past = d_past[..., :Hkv * D].reshape(k_past.shape).to(k_past.dtype)
            dv_past = d_past[..., Hkv * D:Hkv * (D + Dv)].reshape(v_past.shape).to(v_past.dtype)
        return dq.to(q.dtype), dk, dv, None, dk_past, dv_past, None, None, None, None, None, None


def _payload(k, v, key_mask, mask_col: bool) -> torch.Tensor:
    """K, V (and the 0/1 key mask as one column, all ones when None) side by side:
    `[B, T, Hkv*D + Hkv*Dv (+1)]`."""
    B, T = k.shape[:2]
    cols = [k.reshape(B, T, -1), v.reshape(B, T, -1)]
    if mask_col:
        cols.append(key_mask.to(k.dtype)[..., None] if key_mask is not None else k.new_ones(B, T, 1))
    return torch.cat(cols, -1)


def _payloads(k, v, key_mask, k_past, v_past, past_mask, mask_col: bool):
    """(this call's local payload, the cached keys' payload or None), with the same columns."""
    past = _payload(k_past, v_past, past_mask, mask_col) if k_past is not None else None
    return _payload(k, v, key_mask, mask_col), past


def _past_len(k_past) -> int:
    return 0 if k_past is None else k_past.shape[1]


def _needed_halo(cp: CPContext, window) -> int:
    """Keys a windowed part needs from before it (0: none)."""
    if window is None or not any(p.from_prev for p in cp.parts):
        return 0
    return min(window - 1, cp.total_len - 1)


def _gathers_all(cp: CPContext, window) -> bool:
    """Whether the call all-gathers every rank's K/V: full attention, or a window whose halo exchange
    would move at least as much (every rank receives every part's `W - 1` tails: `P * n_parts * (W - 1)`
    rows, vs the `T` rows of the whole stream)."""
    if window is None:
        return True
    halo = _needed_halo(cp, window)
    return halo > 0 and cp.world_size * len(cp.local_parts) * halo >= cp.total_len


def _halo_len(cp: CPContext, window) -> int:
    """Rows of the halo exchange (0: none, or the K/V of all ranks are gathered instead)."""
    return 0 if _gathers_all(cp, window) else _needed_halo(cp, window)


def _exchange(kv, cp: CPContext, window, halo_len):
    """The forward's (and backward's re-run) one collective: all K/V (full attention, or a window
    wider than the parts) or the halo (window)."""
    if _gathers_all(cp, window):
        # one rank: the local payload is the whole stream (global rows == local rows)
        return _gather_all(kv, cp) if cp.world_size > 1 else kv
    return _gather_halo(kv, cp, halo_len) if halo_len else None


# ---------------------------------------------------------------------------- entry
def _local_error(q, k, v, cp: CPContext, causal, window, scale, attention_mask, cu_seqlens, backend,
                 single: bool, past_key_value=None, past_mask=None) -> str | None:
    """First problem with this rank's arguments, or None; nothing here communicates or raises."""
    for name, x in {"q": q, "k": k, "v": v}.items():
        if not torch.is_tensor(x):
            return f"{name} must be a tensor, got {type(x).__name__}"
        if x.ndim != 4:
            return f"{name} must be 4-D [B, T_loc, heads, head_dim], got shape {tuple(x.shape)}"
        if x.dtype not in _DTYPES:
            return f"{name} must be a floating tensor, got {x.dtype}"
        if x.device != q.device:
            return f"{name} is on {x.device} but q is on {q.device}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    B, T, H, D = q.shape
    Hkv, Dv = v.shape[2], v.shape[3]
    if min(H, D, Hkv, Dv) < 1:
        return f"head counts and dims must be >= 1, got H={H}, D={D} (q) and Hkv={Hkv}, Dv={Dv} (v)"
    if tuple(k.shape) != (B, T, Hkv, D):
        return f"k has shape {tuple(k.shape)}; expected [B, T_loc, Hkv, D] = [{B}, {T}, {Hkv}, {D}]"
    if tuple(v.shape[:3]) != (B, T, Hkv):
        return f"v has shape {tuple(v.shape)}; expected [B, T_loc, Hkv, Dv] = [{B}, {T}, {Hkv}, Dv]"
    if H % Hkv:
        return f"q has H={H} heads, not a multiple of Hkv={Hkv} (GQA needs H % Hkv == 0)"
    if not isinstance(causal, (bool, int)) or isinstance(causal, int) and causal not in (0, 1):
        return f"causal must be a bool, got {causal!r}"
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            return f"window_size must be None or an int >= 1, got {window!r}"
        if not causal:
            return "window_size needs causal=True (a non-causal window would need keys after the part)"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        return f"scale must be a finite number or None, got {scale!r}"
    if not isinstance(backend, str) or backend not in ATTENTION_BACKENDS:
        return f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}"
    error = cp.input_error(B, T, "q", single, cu_seqlens)
    if error:
        return error
    if attention_mask is not None:
        m = attention_mask
        if not torch.is_tensor(m):
            return f"attention_mask must be a tensor, got {type(m).__name__}"
        if m.is_complex() or m.ndim != 2 or m.shape[0] != B or m.shape[1] not in (cp.total_len, T):
            return (f"attention_mask must be [B, T] = [{B}, {cp.total_len}] (global) or [B, T_loc] = "
                    f"[{B}, {T}] (this rank's), got {m.dtype} of shape {tuple(m.shape)}")
        if m.device != q.device:
            return f"attention_mask is on {m.device} but q is on {q.device}"
    if past_key_value is not None:
        return _past_error(past_key_value, past_mask, q, k, v, cp, causal)
    if past_mask is not None:
        return "past_mask needs past_key_value"
    return None


def _past_error(past_key_value, past_mask, q, k, v, cp: CPContext, causal) -> str | None:
    """Problems with a continuation's cached keys (checked after q, k, v)."""
    if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2 or \
            not all(torch.is_tensor(x) for x in past_key_value):
        return "past_key_value must be a pair of tensors (k_past, v_past)"
    if cp.packed:
        return ("past_key_value (a continuation) needs dense input: packed documents (cu_seqlens) cannot continue "
                "cached keys")
    if not causal:
        return "past_key_value needs causal=True"
    kp, vp = past_key_value
    B, _, _, D = q.shape
    Hkv, Dv = v.shape[2], v.shape[3]
    if kp.ndim != 4 or vp.ndim != 4 or (kp.shape[0], kp.shape[2], kp.shape[3]) != (B, Hkv, D) \
            or tuple(vp.shape) != (B, kp.shape[1], Hkv, Dv):
        return (f"past_key_value must be k_past [B, Lp, Hkv, D] = [{B}, Lp, {Hkv}, {D}] and v_past "
                f"[B, Lp, Hkv, Dv] = [{B}, Lp, {Hkv}, {Dv}], got {tuple(kp.shape)} and {tuple(vp.shape)}")
    if kp.dtype != q.dtype or vp.dtype != q.dtype or kp.device != q.device or vp.device != q.device:
        return f"past_key_value must have q's dtype and device ({q.dtype}, {q.device})"
    if past_mask is not None and (not torch.is_tensor(past_mask) or past_mask.is_complex()
                                  or tuple(past_mask.shape) != (B, kp.shape[1]) or past_mask.device != q.device):
        got = (f"{tuple(past_mask.shape)} on {past_mask.device}" if torch.is_tensor(past_mask)
               else type(past_mask).__name__)
        return f"past_mask must be [B, Lp] = [{B}, {kp.shape[1]}] on q's device, got {got}"
    return None


def attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_context: CPContext | None = None,
    *,
    causal: bool = True,
    window_size: int | None = None,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    verify_agreement: bool = True,
    past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    past_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Softmax attention over a sequence split across the ranks of a CP group; exact.

    Args:
        q: this rank's queries `[B, T_loc, H, D]` (from `cp_context.shard`).
        k, v: this rank's keys `[B, T_loc, Hkv, D]` and values `[B, T_loc, Hkv, Dv]`; GQA when
            Hkv < H (query head i uses key head i // (H // Hkv)).
        cp_context: from `build_cp_context`; None runs plain single-process attention (then
            `cu_seqlens` may give packed boundaries, B == 1).
        causal: a query sees keys at or before its position (of its own document). `causal=False`
            sees its whole document; it is refused with a window.
        window_size: W: a query at position t sees keys t-W+1 .. t of its document (positions, pads
            included); None is unlimited.
        scale: defaults to D ** -0.5.
        attention_mask: 0/1 (nonzero = token) padding mask, global `[B, T]` or this rank's
            `[B, T_loc]`; dense only in spirit (any pattern works): padded keys are never attended to
            and padded query rows output 0. A row that sees no key outputs 0, never NaN.
        backend: "auto" | "torch" | "sdpa" | "flash": the kernel of each local part (module docstring);
            "auto": flash-attn on CUDA for fp16/bf16 when installed, else SDPA on CUDA, else "torch".
        verify_agreement: check first (one tiny all_gather) that every rank passes the same shapes,
            dtype, causal, window, scale, mask presence and context, and that all or none record a
            graph; a mismatch raises ValueError on every rank. False skips that collective.
        past_key_value: a continuation's cached keys and values `(k_past [B, Lp, Hkv, D], v_past
            [B, Lp, Hkv, Dv])`, the same on every rank (replicated, as a KV cache under CP is): the Lp
            positions right before this call's first token, in every row's one document (dense input
            only, causal). With a window only the last W-1 of them can be seen.
        past_mask: `[B, Lp]` 0/1 padding of the cached keys (None: all valid).

    Returns:
        o `[B, T_loc, H, Dv]` in q's dtype. Softmax in fp32 (fp64 for fp64 inputs); autocast does not
        reach inside. Local q, k, v get exactly their single-device gradients; the replicated
        `past_key_value` gets this rank's share (the sum over the group is one device's gradient). The
        backward is collective (every rank must backpropagate through o). Double backward raises.
    """
    cp, single = cp_context, cp_context is None
    if single:
        T = q.shape[1] if torch.is_tensor(q) and q.ndim >= 2 else 0
        cp, error = _single_process_context(T, cu_seqlens)
        if error:
            raise ValueError(f"attention_cp: {error}")
    elif not isinstance(cp, CPContext):
        raise TypeError(f"attention_cp: cp_context must be a CPContext from build_cp_context, "
                        f"got {type(cp).__name__}")
    try:
        error = _local_error(q, k, v, cp, causal, window_size, scale, attention_mask, cu_seqlens, backend, single,
                             past_key_value, past_mask)
        if error is None and scale is None:
            scale = q.shape[-1] ** -0.5
        kernel = resolve_attention_kernel(backend, q, head_dim_v=v.shape[-1]) if error is None else None
    except Exception as e:  # noqa: BLE001 - whatever fails here must reach the other ranks, not strand them
        error = f"{type(e).__name__}: {e}"
    if not verify_agreement or cp.world_size == 1:
        if error:
            raise ValueError(f"attention_cp: {'' if single else f'rank {cp.rank}: '}{error}")
    else:
        checks.check_agreement(cp.group, error, checks.attention_fields(
            cp, error is None, q, k, v, causal, window_size, scale, attention_mask is not None,
            past=(past_key_value[0].shape[1], past_mask is not None) if past_key_value is not None else None),
            what="attention_cp")

    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask != 0
        if key_mask.shape[1] != q.shape[1]:
            key_mask = cp.shard(key_mask, dim=1)
    window = None if window_size is None else int(window_size)
    k_past, v_past = past_key_value if past_key_value is not None else (None, None)
    if past_mask is not None:
        past_mask = past_mask != 0
    return AttentionCPFunction.apply(q, k, v, key_mask, k_past, v_past, past_mask, cp, bool(causal), window,
                                     float(scale), kernel)
