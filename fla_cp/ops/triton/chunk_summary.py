"""Segment summaries for context parallelism (DESIGN.md §1–3), one launch for all segments and heads.

Forward: for each listed segment and value head, `[H | M]` with `S_end = M @ S_start + H`.
Backward: for each listed segment and value head, `[G | M]` with `dS_start = Mᵀ @ dS_end + G`,
where `G` is `dS_start` computed from `do` alone (`dS_end = 0`).

Both read the WY pieces FLA's prep produces for the same `cu_seqlens` and chunk size:

    k, q   [B, T, H, K]      w  [B, T, HV, K]      u, do  [B, T, HV, V]
    g      [B, T, HV]        chunk-local cumsum of the log-decay in log2 units (FLA's RCP_LN2
                             scaling: `exp2(g)` is the decay since the chunk start)

Chunks start at each segment's first token (FLA's varlen chunking), so `w`, `u`, `g` must come from
a prep over the same `cu_seqlens`. Per chunk (decay d_t = exp2(g_last - g_t)):

    h ← exp2(g_last) h + kᵀ ((u − w h) ⊙ d)           (H columns: h starts at 0)
    m ← exp2(g_last) m − kᵀ ((w m) ⊙ d)               (M columns: m starts at I, values 0)

i.e. the M columns are the same state pass with zero values started from the identity (the
augmented state of DESIGN.md §1), run on K/BV extra column blocks. M is never formed per chunk as a
K×K matrix: `kᵀ((w m) ⊙ d)` costs 2·BT·K·BV per block instead of BT·K² + K²·BV.

Grid: (column blocks of H or G, then of M; segments × value heads). Program (i_c, i_nh) owns a
[K, BV] fp32 tile of one summary and walks its segment chunk by chunk.

The kernels use only Triton builtins (no `@triton.jit` helpers of `triton.language.standard` such as
`tl.zeros` / `tl.cdiv`): those are decorated when triton is first imported, and if that happened before
TRITON_INTERPRET=1 was set they cannot be called from an interpreted kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_cp.ops.triton.utils import FP32_DOT_PRECISION, autotuned

# BV (columns of the state tile a program owns) is tuned with the launch shape: a program keeps a
# [BK, BV] fp32 tile plus its [BT, BK] loads in registers, and smaller BV also means more programs
# for the one-segment, few-head launches CP makes. `scripts/kernel_resources.py` prints what each
# config costs in registers and spills (sm_90, no GPU needed); the first config, the untuned default
# (FLA_CP_AUTOTUNE=0), is the one that spilled least across the bf16 shapes there.
_CONFIGS = [triton.Config({'BV': bv}, num_warps=w, num_stages=s)
            for bv, w, s in ((32, 8, 1), (16, 4, 1), (32, 4, 1), (16, 8, 1), (64, 8, 1), (32, 8, 2), (64, 4, 2))]
_KEY = ['H', 'HV', 'K', 'V', 'W', 'BT', 'BK', 'WITH_M', 'FP32_STATE']
_MAX_TILE = 8192   # BK * BV fp32 state elements per program; larger tiles only spill


def _prune(configs, named_args, **kwargs):
    """Drop configs whose state tile cannot stay in registers for this K (they are slow, and slow to compile)."""
    BK = {**named_args, **kwargs}['BK']
    return [c for c in configs if BK * c.kwargs['BV'] <= _MAX_TILE] or configs[:1]


@triton.jit
def _chunk_gate(g, i_t, T, HV: tl.constexpr, BT: tl.constexpr):
    """Token offsets/mask of chunk i_t, its gate cumsum, and the cumsum at its last valid token."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_g = tl.load(g + o_t * HV, mask=m_t, other=0.).to(tl.float32)
    b_g_last = tl.load(g + (tl.minimum((i_t + 1) * BT, T) - 1) * HV).to(tl.float32)
    return o_t, m_t, b_g, b_g_last


@triton.jit
def _m_chain(k, w, g, T, i_m, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Columns [i_m*BV, i_m*BV+BV) of the span transition M = M_NT ⋯ M_1, in fp32 throughout.

    k, w, g point at the segment's first token of this head. Returns [BK, BV] fp32.
    """
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_c = i_m * BV + tl.arange(0, BV)
    # an unchanged incoming state is the identity before any chunk is applied
    b_m = tl.where(o_k[:, None] == o_c[None, :], 1., 0.)
    for i_t in range((T + BT - 1) // BT):
        o_t, m_t, b_g, b_g_last = _chunk_gate(g, i_t, T, HV, BT)
        b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(k + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0.)
        # bf16 inputs are exact in fp32; only the products need the fp32-accurate dot
        b_y = tl.dot(b_w.to(tl.float32), b_m, input_precision=PRECISION)
        b_y = b_y * tl.where(m_t, tl.math.exp2(b_g_last - b_g), 0.)[:, None]
        b_m = b_m * tl.math.exp2(b_g_last) - tl.dot(b_k.to(tl.float32), b_y, input_precision=PRECISION)
    return b_m


@triton.jit
def _h_chain(k, w, u, g, T, i_v, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             FP32_STATE: tl.constexpr, PRECISION: tl.constexpr):
    """Columns [i_v*BV, i_v*BV+BV) of H, the segment's end state started from zero. Returns [BK, BV].

    With 16-bit inputs the state is rounded to the input dtype inside the dots exactly as FLA's
    `chunk_gated_delta_rule_fwd_h` does (H only feeds that same 16-bit pipeline); fp32 inputs get
    fp32-accurate dots so the summary matches an fp32 reference to ~1e-6.
    """
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_h = tl.full([BK, BV], 0., dtype=tl.float32)
    for i_t in range((T + BT - 1) // BT):
        o_t, m_t, b_g, b_g_last = _chunk_gate(g, i_t, T, HV, BT)
        b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_k = tl.load(k + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0.)
        b_u = tl.load(u + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
        if FP32_STATE:
            b_v = b_u - tl.dot(b_w, b_h, input_precision=PRECISION)
        else:
            b_v = b_u.to(tl.float32) - tl.dot(b_w, b_h.to(b_w.dtype))
        # the delta-rule residual decays from its token to the chunk end
        b_v = b_v * tl.where(m_t, tl.math.exp2(b_g_last - b_g), 0.)[:, None]
        b_h = b_h * tl.math.exp2(b_g_last)
        if FP32_STATE:
            b_h += tl.dot(b_k, b_v, input_precision=PRECISION)
        else:
            b_h = tl.dot(b_k, b_v.to(b_k.dtype), b_h)
    return b_h


@triton.jit
def _g_chain(q, k, w, g, do, T, i_v, scale, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
             V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             FP32_STATE: tl.constexpr, PRECISION: tl.constexpr):
    """Columns [i_v*BV, i_v*BV+BV) of G = dS_start with dS_end = 0. Returns [BK, BV].

    Reverse pass of FLA's `chunk_gated_delta_rule_bwd_dhu` with the intra-chunk value gradient
    (`chunk_bwd_dv_local`) fused in, so the summary needs `do` only:

        dv = tril_t≤s(scale · k qᵀ ⊙ exp2(g_s − g_t)) do + (k dh) ⊙ d
        dh ← exp2(g_last) dh + scale · (q ⊙ exp2(g))ᵀ do − wᵀ dv
    """
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dh = tl.full([BK, BV], 0., dtype=tl.float32)
    for i_t in range((T + BT - 1) // BT - 1, -1, -1):
        o_t, m_t, b_g, b_g_last = _chunk_gate(g, i_t, T, HV, BT)
        b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
        b_qt = tl.load(q + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0.)
        b_wt = tl.load(w + o_k[:, None] + o_t[None, :] * (HV * K), mask=m_k[:, None] & m_t[None, :], other=0.)
        b_do = tl.load(do + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)

        # token t's value feeds the outputs of tokens s >= t of its chunk; the exponent is masked
        # before exp2 so that s < t (positive exponents) can never overflow
        m_A = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
        b_decay = tl.where(m_t, tl.math.exp2(b_g_last - b_g), 0.)
        if FP32_STATE:
            b_A = tl.dot(b_k, b_qt, input_precision=PRECISION) * scale
            b_A = tl.where(m_A, b_A * tl.math.exp2(tl.where(m_A, b_g[None, :] - b_g[:, None], 0.)), 0.)
            b_dv = tl.dot(b_A, b_do, input_precision=PRECISION)
            b_dv += tl.dot(b_k, b_dh, input_precision=PRECISION) * b_decay[:, None]
        else:
            b_A = tl.dot(b_k, b_qt) * scale
            b_A = tl.where(m_A, b_A * tl.math.exp2(tl.where(m_A, b_g[None, :] - b_g[:, None], 0.)), 0.)
            b_dv = tl.dot(b_A.to(b_do.dtype), b_do)
            b_dv += tl.dot(b_k, b_dh.to(b_k.dtype)) * b_decay[:, None]

        b_qt = b_qt * tl.math.exp2(b_g)[None, :]
        b_dh = b_dh * tl.math.exp2(b_g_last)
        if FP32_STATE:
            b_dh += tl.dot(b_qt, b_do, input_precision=PRECISION) * scale
            b_dh -= tl.dot(b_wt, b_dv, input_precision=PRECISION)
        else:
            b_dh += tl.dot(b_qt.to(b_do.dtype), b_do) * scale
            b_dh -= tl.dot(b_wt, b_dv.to(b_wt.dtype))
    return b_dh


@triton.jit
def _segment(cu_seqlens, seg_ids, i_nh, HV: tl.constexpr):
    """Value head, first token (int64) and length of the segment that program row `i_nh` summarises."""
    i_n, i_h = i_nh // HV, i_nh % HV
    i_s = tl.load(seg_ids + i_n).to(tl.int64)
    bos, eos = tl.load(cu_seqlens + i_s).to(tl.int64), tl.load(cu_seqlens + i_s + 1).to(tl.int64)
    return i_h, bos, (eos - bos).to(tl.int32)


@triton.jit
def _store_columns(out, b_x, i_c, NV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    """Store tile `b_x` [BK, BV] of one summary `[K, W]`: column block i_c of H / G (i_c < NV), or
    column block i_c - NV of M, which sits after the V state columns."""
    o_k = tl.arange(0, BK)
    if i_c < NV:
        o_c = i_c * BV + tl.arange(0, BV)
        m_c = o_c < V
    else:
        o_c = V + (i_c - NV) * BV + tl.arange(0, BV)
        m_c = o_c < V + K
    tl.store(out + o_k[:, None] * W + o_c[None, :], b_x, mask=(o_k < K)[:, None] & m_c[None, :])


@triton.jit
def chunk_summary_fwd_kernel(
    k, w, u, g, hm, cu_seqlens, seg_ids,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    WITH_M: tl.constexpr, FP32_STATE: tl.constexpr, PRECISION: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV   # column blocks of H / G; those of M follow
    i_c, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h, bos, T = _segment(cu_seqlens, seg_ids, i_nh, HV)
    # GVA: value head i_h reads key head i_h // (HV // H); w is already per value head
    k += (bos * H + i_h // (HV // H)) * K
    w += (bos * HV + i_h) * K
    u += (bos * HV + i_h) * V
    g += bos * HV + i_h
    if i_c < NV:
        b_x = _h_chain(k, w, u, g, T, i_c, H, HV, K, V, BT, BK, BV, FP32_STATE, PRECISION)
    else:
        b_x = _m_chain(k, w, g, T, i_c - NV, H, HV, K, BT, BK, BV, PRECISION)
    _store_columns(hm + i_nh * K * W, b_x, i_c, NV, K, V, W, BK, BV)


@triton.jit
def chunk_summary_bwd_kernel(
    q, k, w, g, do, gm, cu_seqlens, seg_ids, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    WITH_M: tl.constexpr, FP32_STATE: tl.constexpr, PRECISION: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV   # column blocks of H / G; those of M follow
    i_c, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h, bos, T = _segment(cu_seqlens, seg_ids, i_nh, HV)
    q += (bos * H + i_h // (HV // H)) * K
    k += (bos * H + i_h // (HV // H)) * K
    w += (bos * HV + i_h) * K
    do += (bos * HV + i_h) * V
    g += bos * HV + i_h
    if i_c < NV:
        b_x = _g_chain(q, k, w, g, do, T, i_c, scale, H, HV, K, V, BT, BK, BV, FP32_STATE, PRECISION)
    else:
        b_x = _m_chain(k, w, g, T, i_c - NV, H, HV, K, BT, BK, BV, PRECISION)
    _store_columns(gm + i_nh * K * W, b_x, i_c, NV, K, V, W, BK, BV)


_launch_fwd = autotuned(chunk_summary_fwd_kernel, _CONFIGS, _KEY, prune=_prune)
_launch_bwd = autotuned(chunk_summary_bwd_kernel, _CONFIGS, _KEY, prune=_prune)


def _block_k(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


def _grid(n: int, HV: int, K: int, V: int, with_m: bool):
    """(column blocks of H or G, then of M; segments x value heads), for the launch's BV."""
    return lambda meta: (triton.cdiv(V, meta['BV']) + (triton.cdiv(K, meta['BV']) if with_m else 0), n * HV)


def _segment_ids(segments, device) -> torch.Tensor:
    return torch.as_tensor(list(segments), dtype=torch.int32, device=device)


def chunk_summary_fwd(
    k: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    segments: list[int],
    with_m: bool,
    chunk_size: int = 64,
) -> torch.Tensor:
    """`[H | M]` of the listed segments.

    Args:
        k: `[1, T, H, K]`; w: `[1, T, HV, K]`; u: `[1, T, HV, V]` (WY pieces, FLA's meaning).
        g: `[1, T, HV]` chunk-local gate cumsum in log2 units.
        cu_seqlens: `[S+1]` local segment boundaries the prep was chunked with.
        segments: indices into the S segments.
    Returns:
        `[n, HV, K, V + K]` fp32 if `with_m` else `[n, HV, K, V]`.
    """
    _, _, H, K = k.shape
    HV, V = u.shape[2], u.shape[3]
    n = len(segments)
    hm = torch.empty(n, HV, K, V + K if with_m else V, dtype=torch.float32, device=k.device)
    if n == 0:
        return hm
    _launch_fwd(
        _grid(n, HV, K, V, with_m), k=k, w=w, u=u, g=g, hm=hm, cu_seqlens=cu_seqlens,
        seg_ids=_segment_ids(segments, k.device),
        H=H, HV=HV, K=K, V=V, W=hm.shape[-1], BT=chunk_size, BK=_block_k(K), WITH_M=with_m,
        FP32_STATE=k.dtype == torch.float32, PRECISION=FP32_DOT_PRECISION,
    )
    return hm


def chunk_summary_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    do: torch.Tensor,
    cu_seqlens: torch.Tensor,
    segments: list[int],
    scale: float,
    with_m: bool,
    chunk_size: int = 64,
) -> torch.Tensor:
    """`[G | M]` of the listed segments: `dS_start = Mᵀ @ dS_end + G` (M itself, not Mᵀ).

    Args:
        q, k: `[1, T, H, K]`; w: `[1, T, HV, K]`; do: `[1, T, HV, V]`.
        g: `[1, T, HV]` chunk-local gate cumsum in log2 units.
    Returns:
        `[n, HV, K, V + K]` fp32 if `with_m` else `[n, HV, K, V]`.
    """
    _, _, H, K = k.shape
    HV, V = do.shape[2], do.shape[3]
    n = len(segments)
    gm = torch.empty(n, HV, K, V + K if with_m else V, dtype=torch.float32, device=k.device)
    if n == 0:
        return gm
    _launch_bwd(
        _grid(n, HV, K, V, with_m), q=q, k=k, w=w, g=g, do=do, gm=gm, cu_seqlens=cu_seqlens,
        seg_ids=_segment_ids(segments, k.device), scale=scale,
        H=H, HV=HV, K=K, V=V, W=gm.shape[-1], BT=chunk_size, BK=_block_k(K), WITH_M=with_m,
        FP32_STATE=k.dtype == torch.float32, PRECISION=FP32_DOT_PRECISION,
    )
    return gm
