"""Attention kernels for one local part of `attention_cp`: flash-attn's varlen function and torch SDPA.

Both compute what `fla_cp.ops.attention._attend` computes, softmax attention of the part's queries
q `[B, n, H, D]` over its keys k `[B, m, Hkv, D]` / values v `[B, m, Hkv, Dv]` (GQA: query head h reads
key head h // (H // Hkv)), restricted by

    allowed[i, j] = qdoc[i] == kdoc[j] and kdoc[j] >= 0              (same document; -1: outside the stream)
                    and (not causal or kpos[j] <= qpos[i])
                    and (window is None or qpos[i] - kpos[j] < window)

and by the padding masks: a padded key (`key_valid` False) is never seen, a padded query
(`query_valid` False) outputs 0, and a query that sees no key outputs 0 (never NaN, in values or
gradients). Both are differentiable by autograd (`attention_cp`'s backward re-runs the forward).

- `attend_flash`: one `flash_attn.flash_attn_varlen_func` call (FLA's own kernel, `fla/layers/attn.py`).
  Every (row b, document d) of the part is one varlen sequence: the valid queries of d in row b, and
  the valid keys of d that some of those queries may see (causal: kpos <= the last query's position;
  window: kpos > the first query's position - window). flash-attn aligns causal masks to the bottom
  right (query i of Tq sees keys 0 .. i + Tk - Tq) and counts its window `(window - 1, 0)` in those
  unpadded key indices, so it is exact when, per sequence, the valid queries are the last valid keys
  (self-attention where the keys include the queries' own rows with the same padding) and, with a
  window, a query's window holds no padding hole (valid tokens contiguous within a document: padding
  only at the start and/or end of a row's stream). With a hole and a window flash-attn's window would
  span more positions than `window`; `attend_flash` checks both conditions on the host and raises
  ValueError instead of returning a different result (the layer refuses holes with a window anyway).
  A query that sees no key (e.g. its own key padded) is left out of the call and outputs 0.
  Non-causal with a window is refused (bottom-right alignment cannot express it; `attention_cp`
  refuses it too). Limits: CUDA only, fp16/bf16 only, head dims <= 256 (D != Dv is handled by
  zero-padding the smaller one, which leaves scores and outputs unchanged); softmax in fp32 inside the
  kernel. Memory O(n + m) per head: no score matrix, no mask; the index tensors are O(B * (n + m)).
  Cost on the host: with padding masks, one device-to-host copy of the `[B, n + m]` valid flags per
  call (flash-attn's varlen interface needs the sequence lengths and `max_seqlen` as host ints, as
  FLA's own `unpad_input` does); without, none after the first call (`FlashLayout` caches the indices).
- `attend_sdpa`: `torch.nn.functional.scaled_dot_product_attention` with an explicit boolean mask
  `[B or 1, 1, n, m]` (`allowed` and the key padding). Exact for any mask, holes and windows included.
  An explicit mask is needed because SDPA's `is_causal=True` is aligned to the top left when n != m
  (query i sees keys 0 .. i), while a part's keys start before its queries. Computes in q's dtype with
  SDPA's own accumulation (on CUDA: the memory-efficient kernel, fp32 accumulation; fp32 matmuls there
  follow `torch.backends.cuda.matmul.allow_tf32`). Memory: the boolean mask is O(B * n * m) (O(n * m)
  without padding), plus the additive bias of the same shape in q's dtype that torch derives from it
  for its fused kernels; those kernels never hold the `[B, H, n, m]` scores (the math fallback does).
  GQA expands K/V to H heads first (O(m * H * D)): SDPA's `enable_gqa=True` with a mask falls back to
  the math kernel.

`resolve_attention_kernel` picks one: "flash" on CUDA for fp16/bf16 when flash-attn is importable,
"sdpa" on CUDA otherwise, "torch" (`_attend`'s fp32/fp64 math) on CPU.

flash-attn is imported lazily, once (`flash_attn_varlen()`); tests replace it by setting the module
attribute `_FLASH_VARLEN` (e.g. `monkeypatch.setattr(attention_kernels, "_FLASH_VARLEN", fn)`; None
means "not installed").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("auto", "torch", "sdpa", "flash")
FLASH_MAX_HEAD_DIM = 256

_UNSET = object()
# flash_attn.flash_attn_varlen_func, None when flash-attn is not importable, _UNSET before the first look
_FLASH_VARLEN = _UNSET


def flash_attn_varlen():
    """`flash_attn.flash_attn_varlen_func`, or None when flash-attn cannot be imported (looked up once)."""
    global _FLASH_VARLEN
    if _FLASH_VARLEN is _UNSET:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # noqa: BLE001 - a broken build (missing CUDA symbols) is "not available" too
            flash_attn_varlen_func = None
        _FLASH_VARLEN = flash_attn_varlen_func
    return _FLASH_VARLEN


# ---------------------------------------------------------------------------- kernel choice
def _flash_unavailable(q: torch.Tensor, head_dim_v: int | None) -> str | None:
    """Why flash-attn cannot run on q, or None. The import is tried last (CPU runs never import it)."""
    if q.device.type != "cuda":
        return f"q is on {q.device} and flash-attn runs on CUDA only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q is {q.dtype} and flash-attn computes in float16/bfloat16 only"
    dim = max(q.shape[-1], head_dim_v or 0)
    if dim > FLASH_MAX_HEAD_DIM:
        return f"head dim {dim} > {FLASH_MAX_HEAD_DIM}, flash-attn's limit"
    if flash_attn_varlen() is None:
        return "flash-attn is not installed (`import flash_attn` failed)"
    return None


def resolve_attention_kernel(backend: str, q: torch.Tensor, *, head_dim_v: int | None = None) -> str:
    """The kernel `backend` runs on q: "flash", "sdpa" or "torch".

    "auto": "flash" when q is CUDA fp16/bf16 (head dims <= 256) and flash-attn imports; else "sdpa" on
    CUDA; else "torch" (CPU keeps the exact fp32/fp64 math). "torch" and "sdpa" are returned as asked
    ("sdpa" runs on CPU too). "flash" where it cannot run raises ValueError saying why.
    `head_dim_v`: Dv when it differs from q's D (flash's head-dim limit applies to both)."""
    if not isinstance(backend, str) or backend not in KERNELS:
        raise ValueError(f"backend must be one of {KERNELS}, got {backend!r}")
    if backend in ("torch", "sdpa"):
        return backend
    why = _flash_unavailable(q, head_dim_v)
    if backend == "flash":
        if why is not None:
            raise ValueError(f"backend='flash' cannot run: {why}; use backend='sdpa' or 'torch' "
                             f"(or 'auto', which picks one that runs)")
        return "flash"
    if why is None:
        return "flash"
    return "sdpa" if q.device.type == "cuda" else "torch"


# ---------------------------------------------------------------------------- SDPA
def _connected_zeros(shape, q, k, v) -> torch.Tensor:
    """Zeros `shape` in q's dtype that still depend on q, k, v (zero gradients rather than None, and
    `torch.autograd.grad` finds a graph even when nothing was attended)."""
    link = (q.sum() + k.sum() + v.sum()) * 0
    return q.new_zeros(shape) + link.to(q.dtype)


def attend_sdpa(q, k, v, allowed, key_valid, query_valid, scale: float) -> torch.Tensor:
    r"""Masked softmax attention with torch SDPA and an explicit boolean mask.

    Args:
        q: `[B, n, H, D]`; k: `[B, m, Hkv, D]`; v: `[B, m, Hkv, Dv]`, same dtype and device, H % Hkv == 0.
        allowed: `[n, m]` bool (document / causal / window structure), on q's device.
        key_valid: `[B, m]` bool or None; query_valid: `[B, n]` bool or None (padding).
        scale: the softmax scale.

    Returns:
        o `[B, n, H, Dv]` in q's dtype; 0 on padded queries and on queries that see no key.
    """
    B, n, H, D = q.shape
    m, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if n == 0 or m == 0:
        return _connected_zeros((B, n, H, Dv), q, k, v)
    mask = allowed.to(device=q.device, dtype=torch.bool)[None, None]                    # [1, 1, n, m]
    if key_valid is not None:
        mask = mask & key_valid.to(torch.bool)[:, None, None, :]                       # [B, 1, n, m]
    # a row with no visible key is NaN in some SDPA backends (0 / 0): let it see key 0 and zero it
    # afterwards; the single visible key has probability exactly 1, so its gradients are exactly 0
    empty = ~mask.any(-1, keepdim=True)                                                # [B|1, 1, n, 1]
    first = torch.zeros(m, dtype=torch.bool, device=q.device)
    first[0] = True
    mask = mask | (empty & first)
    keep = ~empty[:, 0]                                                                # [B|1, n, 1]
    if query_valid is not None:
        keep = keep & query_valid.to(torch.bool)[:, :, None]
    # [B, T, heads, d] -> [B, heads, T, d]; GQA: key head g serves query heads g*r .. g*r + r - 1.
    # Expanded by hand: enable_gqa=True with a mask sends SDPA to its math kernel (the full scores)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if H != Hkv:
        r = H // Hkv
        kt = kt[:, :, None].expand(B, Hkv, r, m, D).reshape(B, H, m, D)
        vt = vt[:, :, None].expand(B, Hkv, r, m, Dv).reshape(B, H, m, Dv)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)
    return o.masked_fill(~keep[..., None], 0).to(q.dtype)


# ---------------------------------------------------------------------------- flash-attn
class FlashLayout:
    """What `attend_flash` needs from a part's positions and documents, built once on the host.

    qpos `[n]`, kpos `[m]`: int64 global stream positions, increasing (kpos may be negative: keys of a
    KV cache before the call). qdoc `[n]`, kdoc `[m]`: int64 document ids, non-decreasing; -1 is no
    document (never seen). Each key is assigned the slot of the query document it may serve (or -1:
    no query may see it), and the padding-free indices are cached per (B, device)."""

    def __init__(self, qpos, kpos, qdoc, kdoc, causal: bool, window: int | None):
        qpos, kpos, qdoc, kdoc = (torch.as_tensor(x).detach().to("cpu", torch.int64).reshape(-1)
                                  for x in (qpos, kpos, qdoc, kdoc))
        if qpos.numel() != qdoc.numel() or kpos.numel() != kdoc.numel():
            raise ValueError(f"attend_flash: qpos/qdoc have {qpos.numel()}/{qdoc.numel()} entries and "
                             f"kpos/kdoc {kpos.numel()}/{kdoc.numel()}; they must match pairwise")
        if window is not None and not causal:
            raise ValueError("attend_flash: a window needs causal=True (flash-attn's bottom-right alignment "
                             "cannot express a one-sided window over keys after the queries)")
        if window is not None and window < 1:
            raise ValueError(f"attend_flash: window must be None or >= 1, got {window}")
        self.n, self.m, self.causal, self.window = qpos.numel(), kpos.numel(), bool(causal), window
        self.qpos, self.kpos = qpos, kpos
        has_q = qdoc >= 0
        docs = torch.unique(qdoc[has_q])                                    # sorted
        self.nd = max(docs.numel(), 1)
        slot_q = torch.searchsorted(docs, qdoc).clamp_max(max(docs.numel() - 1, 0))
        slot_q = torch.where(has_q, slot_q, torch.full_like(slot_q, -1))
        slot_k = torch.searchsorted(docs, kdoc).clamp_max(max(docs.numel() - 1, 0))
        serves = (kdoc >= 0) & (docs.numel() > 0)
        if docs.numel():
            serves &= docs[slot_k] == kdoc
            # trim keys no query of their document can see: after the document's last query (causal),
            # or before the window of its first query
            big = torch.iinfo(torch.int64).max
            last = torch.full((docs.numel(),), -big).scatter_reduce(0, slot_q[has_q], qpos[has_q], "amax")
            first = torch.full((docs.numel(),), big).scatter_reduce(0, slot_q[has_q], qpos[has_q], "amin")
            if causal:
                serves &= kpos <= last[slot_k]
            if window is not None:
                serves &= kpos > first[slot_k] - window
        slot_k = torch.where(serves, slot_k, torch.full_like(slot_k, -1))
        self.slot_q, self.slot_k = slot_q, slot_k
        # rows are unpadded in (row, index) order: that is (row, document, position) order only when
        # documents and positions are sorted along the part
        for name, slot, pos in (("queries", slot_q[has_q], qpos[has_q]), ("keys", slot_k[serves], kpos[serves])):
            ds, dp = slot.diff(), pos.diff()
            if bool((ds < 0).any()) or bool(((ds == 0) & (dp <= 0)).any()):
                raise ValueError(f"attend_flash: the {name}' documents must be non-decreasing and their "
                                 f"positions increasing within a document")
        # positions -> offsets in [0, span): (sequence, position) pairs compare as sequence * span + offset
        lo = min(int(qpos.min()) if self.n else 0, int(kpos.min()) if self.m else 0)
        hi = max(int(qpos.max()) if self.n else 0, int(kpos.max()) if self.m else 0)
        self.base, self.span = lo, hi - lo + 2
        self._cache: dict = {}

    def _offset(self, pos: torch.Tensor) -> torch.Tensor:
        return (pos - self.base).clamp(0, self.span - 1)

    def indices(self, B: int, q_ok: torch.Tensor | None, k_ok: torch.Tensor | None):
        """Host: (query rows, key rows) of the flattened `[B*n]` / `[B*m]` tensors in varlen order,
        the per-sequence lengths (Tq, Tk), for host padding flags q_ok `[B, n]`, k_ok `[B, m]` (None: all
        valid). Raises ValueError where flash-attn's alignment would not give `allowed`."""
        n, m, nd = self.n, self.m, self.nd
        qsel = (self.slot_q >= 0).expand(B, n)
        ksel = (self.slot_k >= 0).expand(B, m)
        if q_ok is not None:
            qsel = qsel & q_ok
        if k_ok is not None:
            ksel = ksel & k_ok
        qi = qsel.reshape(-1).nonzero().squeeze(1)
        kj = ksel.reshape(-1).nonzero().squeeze(1)
        sq = qi // n * nd + self.slot_q[qi % n]
        sk = kj // m * nd + self.slot_k[kj % m]
        qp, kp = self.qpos[qi % n], self.kpos[kj % m]
        nseq = B * nd
        tk = torch.bincount(sk, minlength=nseq)
        k0 = torch.cumsum(tk, 0) - tk                                        # first key of each sequence
        kenc = sk * self.span + self._offset(kp)                             # sorted (checked in __init__)
        # c: how many keys of its sequence a query may see (causal: those at or before it)
        if self.causal:
            c = torch.searchsorted(kenc, sq * self.span + self._offset(qp), right=True) - k0[sq]
        else:
            c = tk[sq]
        seen = c > 0                       # a query that sees no key stays out of the call: output 0
        qi, sq, qp, c = qi[seen], sq[seen], qp[seen], c[seen]
        tq = torch.bincount(sq, minlength=nseq)
        if self.causal and qi.numel():
            # flash-attn: query t of its sequence sees keys 0 .. t + Tk - Tq; `allowed`: the c keys at or
            # before its position. Equal iff c - 1 is that diagonal (the queries are the last keys)
            t = torch.arange(qi.numel()) - (torch.cumsum(tq, 0) - tq)[sq]
            diag = t + tk[sq] - tq[sq] + 1
            if not bool((c == diag).all()):
                raise ValueError("attend_flash: a valid query is not among the valid keys of its document in "
                                 "order (flash-attn aligns causal masks bottom-right); use the 'sdpa' or "
                                 "'torch' kernel")
            if self.window is not None:
                # flash-attn's window: the last min(window, c) of those keys, counted in unpadded keys;
                # `allowed`: those within `window` positions. Equal iff no padding hole inside a window
                before = torch.searchsorted(kenc, sq * self.span + self._offset(qp - self.window + 1)) - k0[sq]
                if not bool((c - before == c.clamp_max(self.window)).all()):
                    raise ValueError(f"attend_flash: a padding hole inside a window of {self.window} (flash-attn "
                                     f"counts its window in unpadded tokens); use the 'sdpa' or 'torch' kernel")
        live = tq > 0
        kj = kj[live[sk]]                  # keys of sequences with no query left are not needed
        tk = torch.where(live, tk, torch.zeros_like(tk))
        return qi, kj, tq[live], tk[live]

    def device_indices(self, B: int, device, q_ok=None, k_ok=None):
        """`indices` moved to `device` as flash-attn wants them: (qi, kj, cu_seqlens_q, cu_seqlens_k)
        int64/int64/int32/int32 and max_seqlen_q, max_seqlen_k ints. Cached when there is no padding."""
        key = (B, str(device))
        if q_ok is None and k_ok is None and key in self._cache:
            return self._cache[key]
        qi, kj, tq, tk = self.indices(B, q_ok, k_ok)
        zero = torch.zeros(1, dtype=torch.int64)
        cu_q = torch.cat([zero, torch.cumsum(tq, 0)]).to(torch.int32)
        cu_k = torch.cat([zero, torch.cumsum(tk, 0)]).to(torch.int32)
        max_q = int(tq.max()) if tq.numel() else 0
        max_k = int(tk.max()) if tk.numel() else 0
        out = (qi.to(device), kj.to(device), cu_q.to(device), cu_k.to(device), max_q, max_k)
        if q_ok is None and k_ok is None:
            self._cache[key] = out
        return out


def flash_layout(qpos, kpos, qdoc, kdoc, causal: bool, window: int | None) -> FlashLayout:
    """Precompute `attend_flash`'s host work for one part (pass it as `layout=`; build it once per part)."""
    return FlashLayout(qpos, kpos, qdoc, kdoc, causal, window)


def attend_flash(q, k, v, qpos, kpos, qdoc, kdoc, key_valid, query_valid, causal: bool, window: int | None,
                 scale: float, *, layout: FlashLayout | None = None) -> torch.Tensor:
    r"""Masked softmax attention with one `flash_attn_varlen_func` call (see the module docstring).

    Args:
        q: `[B, n, H, D]`; k: `[B, m, Hkv, D]`; v: `[B, m, Hkv, Dv]` (flash-attn: CUDA fp16/bf16),
            H % Hkv == 0 (flash-attn's native GQA).
        qpos, kpos: `[n]`, `[m]` int64 host tensors, global positions (increasing; kpos may be negative).
        qdoc, kdoc: `[n]`, `[m]` int64 host tensors, document ids (non-decreasing; -1: no document).
        key_valid: `[B, m]` bool or None; query_valid: `[B, n]` bool or None (padding, on q's device;
            given, they cost one device-to-host copy per call).
        causal, window, scale: as in `attention_cp` (window needs causal).
        layout: `flash_layout(qpos, kpos, qdoc, kdoc, causal, window)` built once for this part; then
            qpos .. kdoc are not looked at (pass the same ones or None).

    Returns:
        o `[B, n, H, Dv]` in q's dtype; 0 on padded queries and on queries that see no key.

    Raises ValueError where flash-attn's bottom-right alignment or its unpadded window would not give
    the mask above (a valid query whose own key is not a valid key; a padding hole inside a window).
    """
    fn = flash_attn_varlen()
    if fn is None:
        raise RuntimeError("attend_flash: flash-attn is not installed (`import flash_attn` failed)")
    B, n, H, D = q.shape
    m, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if layout is None:
        layout = FlashLayout(qpos, kpos, qdoc, kdoc, causal, window)
    elif (layout.n, layout.m, layout.causal, layout.window) != (n, m, bool(causal), window):
        raise ValueError(f"attend_flash: layout was built for n={layout.n}, m={layout.m}, causal={layout.causal}, "
                         f"window={layout.window}; got n={n}, m={m}, causal={causal}, window={window}")
    q_ok = k_ok = None
    if query_valid is not None or key_valid is not None:
        # the one host sync: flash-attn's varlen interface takes sequence lengths and max_seqlen on the host
        flags = [x.reshape(-1).to(torch.bool) for x in (query_valid, key_valid) if x is not None]
        flags = torch.cat(flags).cpu() if len(flags) > 1 else flags[0].cpu()
        if query_valid is not None:
            q_ok, flags = flags[:B * n].reshape(B, n), flags[B * n:]
        if key_valid is not None:
            k_ok = flags.reshape(B, m)
    qi, kj, cu_q, cu_k, max_q, max_k = layout.device_indices(B, q.device, q_ok, k_ok)
    if qi.numel() == 0:
        return _connected_zeros((B, n, H, Dv), q, k, v)
    # gather the varlen rows (index_select: differentiable, contiguous as flash-attn wants)
    qf = q.reshape(B * n, H, D).index_select(0, qi)
    kf = k.reshape(B * m, Hkv, D).index_select(0, kj)
    vf = v.reshape(B * m, Hkv, Dv).index_select(0, kj)
    # flash-attn wants one head dim for q, k and v: zero columns add nothing to q.k and are cut from o
    dm = max(D, Dv)
    if D < dm:
        qf, kf = F.pad(qf, (0, dm - D)), F.pad(kf, (0, dm - D))
    if Dv < dm:
        vf = F.pad(vf, (0, dm - Dv))
    of = fn(qf, kf, vf, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            dropout_p=0.0, softmax_scale=scale, causal=bool(causal),
            window_size=(-1, -1) if window is None else (window - 1, 0))
    of = of[..., :Dv].to(q.dtype)
    o = of.new_zeros(B * n, H, Dv).index_copy(0, qi, of)       # differentiable in `of`; others stay 0
    return o.reshape(B, n, H, Dv)
