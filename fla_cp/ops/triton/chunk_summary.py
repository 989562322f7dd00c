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

Two launches: the columns of H (or G), then, when asked for, those of M; each a grid of (column
blocks, segments × value heads). Program (i_c, i_nh) owns a [K, BV] fp32 tile of one summary, held
as up to four [BK ≤ 64, BV] row blocks (K ≤ 256) like FLA's state kernels, and walks its segment
chunk by chunk. Separate compilations keep the state pass free of the M chain's registers: one kernel
branching between both spilled in both (`scripts/kernel_resources.py`, docs/RESULTS.md).

The kernels use only Triton builtins (no `@triton.jit` helpers of `triton.language.standard` such as
`tl.zeros` / `tl.cdiv`): those are decorated when triton is first imported, and if that happened before
TRITON_INTERPRET=1 was set they cannot be called from an interpreted kernel.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fla_cp.ops.triton.utils import FP32_DOT_PRECISION, autotuned

# BV (columns of the state tile a program owns) is tuned with the launch shape: a program keeps a
# [K, BV] fp32 tile plus its [BT, BK] loads in registers, and smaller BV also means more programs
# for the one-segment, few-head launches CP makes. `scripts/kernel_resources.py` prints what each
# config costs in registers and spills (sm_90, no GPU needed); the first config, the untuned default
# (FLA_CP_AUTOTUNE=0), spills least or nearly least on the bf16 shapes there (docs/RESULTS.md).
_CONFIGS = [triton.Config({'BV': bv}, num_warps=w, num_stages=s)
            for bv, w, s in ((32, 8, 1), (16, 4, 1), (32, 4, 1), (16, 8, 1), (64, 8, 1), (32, 8, 2), (64, 4, 2))]
_KEY = ['H', 'HV', 'K', 'V', 'W', 'BT', 'BK', 'IS_M', 'FP32_STATE']
_MAX_TILE = 8192   # K * BV fp32 state elements per program; larger tiles only spill


def _prune(configs, named_args, **kwargs):
    """Drop configs whose state tile cannot stay in registers for this K (they are slow, and slow to compile)."""
    K = {**named_args, **kwargs}['K']
    return [c for c in configs if K * c.kwargs['BV'] <= _MAX_TILE] or configs[:1]


@triton.jit
def _chunk_gate(g, i_t, T, HV: tl.constexpr, BT: tl.constexpr):
    """Token offsets/mask of chunk i_t, its gate cumsum, and the cumsum at its last valid token.

    Offsets stay int32 (a token index within one segment) but every product with a row stride is
    taken in int64: tokens x HV x V passes 2^31 at ~262K tokens of one segment with HV=32, V=256
    (FLA's block pointers likewise compute offsets with int64 strides)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_g = tl.load(g + o_t.to(tl.int64) * HV, mask=m_t, other=0.).to(tl.float32)
    b_g_last = tl.load(g + (tl.minimum((i_t + 1) * BT, T) - 1).to(tl.int64) * HV).to(tl.float32)
    return o_t, m_t, b_g, b_g_last


@triton.jit
def _tokens_by_features(p, r0, o_t, m_t, stride, K: tl.constexpr, BK: tl.constexpr):
    """[BT, BK] tile of a token-major head view (row stride `stride`): feature rows r0 .. r0+BK."""
    o_k = r0 + tl.arange(0, BK)
    return tl.load(p + o_t[:, None].to(tl.int64) * stride + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :],
                   other=0.)


@triton.jit
def _features_by_tokens(p, r0, o_t, m_t, stride, K: tl.constexpr, BK: tl.constexpr):
    """The transposed tile, [BK, BT]."""
    o_k = r0 + tl.arange(0, BK)
    return tl.load(p + o_k[:, None] + o_t[None, :].to(tl.int64) * stride, mask=(o_k < K)[:, None] & m_t[None, :],
                   other=0.)


@triton.jit
def _dot(a, b, EXACT: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b, fp32 result. EXACT: fp32-accurate dots on fp32 operands; else in a's 16-bit dtype, as
    FLA's kernels round the state inside their dots (the caller casts a when it is computed)."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        return tl.dot(a, b.to(a.dtype))


@triton.jit
def _start_block(r0, o_c, IS_M: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Rows r0 .. r0+BK of the start state: the identity's (M) or zeros (H, G)."""
    if IS_M:
        return tl.where((r0 + tl.arange(0, BK))[:, None] == o_c[None, :], 1., 0.)
    else:
        return tl.full([BK, BV], 0., dtype=tl.float32)


@triton.jit
def _forward_chain(k, w, u, g, T, o_c, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_M: tl.constexpr,
                   EXACT: tl.constexpr, PRECISION: tl.constexpr):
    """Columns o_c of H (the segment's end state started from zero) or, IS_M, of M (its transition:
    started from the identity with zero values), as up to four [BK, BV] fp32 row blocks.

    The state is held as K/BK row blocks, as FLA's `chunk_gated_delta_rule_fwd_h` holds it: the
    [BT, K] loads then come in [BT, BK] pieces and a K = 256 state fits the registers (blocks past K
    are never touched). H with 16-bit inputs rounds the state inside the dots exactly as FLA's fwd_h
    (H only feeds that same 16-bit pipeline); fp32 inputs and M get fp32-accurate dots, so
    summaries match an fp32 reference to ~1e-6.
    """
    b_h1 = _start_block(0, o_c, IS_M, BK, BV)
    b_h2 = _start_block(BK, o_c, IS_M, BK, BV)
    b_h3 = _start_block(2 * BK, o_c, IS_M, BK, BV)
    b_h4 = _start_block(3 * BK, o_c, IS_M, BK, BV)
    for i_t in range((T + BT - 1) // BT):
        o_t, m_t, b_g, b_g_last = _chunk_gate(g, i_t, T, HV, BT)
        # the delta-rule residual u - w h of every token of the chunk
        if IS_M:
            b_v = tl.full([BT, BV], 0., dtype=tl.float32)
        else:
            b_v = tl.load(u + o_t[:, None].to(tl.int64) * (HV * V) + o_c[None, :],
                          mask=m_t[:, None] & (o_c < V)[None, :], other=0.).to(tl.float32)
        b_v -= _dot(_tokens_by_features(w, 0, o_t, m_t, HV * K, K, BK), b_h1, EXACT, PRECISION)
        if K > BK:
            b_v -= _dot(_tokens_by_features(w, BK, o_t, m_t, HV * K, K, BK), b_h2, EXACT, PRECISION)
        if K > 2 * BK:
            b_v -= _dot(_tokens_by_features(w, 2 * BK, o_t, m_t, HV * K, K, BK), b_h3, EXACT, PRECISION)
        if K > 3 * BK:
            b_v -= _dot(_tokens_by_features(w, 3 * BK, o_t, m_t, HV * K, K, BK), b_h4, EXACT, PRECISION)
        # ... decays from its token to the chunk end, then is written into the state
        b_v = b_v * tl.where(m_t, tl.math.exp2(b_g_last - b_g), 0.)[:, None]
        b_decay = tl.math.exp2(b_g_last)
        b_h1 = b_h1 * b_decay + _dot(_features_by_tokens(k, 0, o_t, m_t, H * K, K, BK), b_v, EXACT, PRECISION)
        if K > BK:
            b_h2 = b_h2 * b_decay + _dot(_features_by_tokens(k, BK, o_t, m_t, H * K, K, BK), b_v, EXACT, PRECISION)
        if K > 2 * BK:
            b_h3 = b_h3 * b_decay + _dot(_features_by_tokens(k, 2 * BK, o_t, m_t, H * K, K, BK), b_v,
                                         EXACT, PRECISION)
        if K > 3 * BK:
            b_h4 = b_h4 * b_decay + _dot(_features_by_tokens(k, 3 * BK, o_t, m_t, H * K, K, BK), b_v,
                                         EXACT, PRECISION)
    return b_h1, b_h2, b_h3, b_h4


@triton.jit
def _g_chain(q, k, w, g, do, T, o_c, scale, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
             V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             EXACT: tl.constexpr, PRECISION: tl.constexpr):
    """Columns o_c of G = dS_start with dS_end = 0, as up to four [BK, BV] fp32 row blocks.

    Reverse pass of FLA's `chunk_gated_delta_rule_bwd_dhu` with the intra-chunk value gradient
    (`chunk_bwd_dv_local`) fused in, so the summary needs `do` only:

        dv = tril_t≤s(scale · k qᵀ ⊙ exp2(g_s − g_t)) do + (k dh) ⊙ d
        dh ← exp2(g_last) dh + scale · (q ⊙ exp2(g))ᵀ do − wᵀ dv
    """
    b_dh1 = tl.full([BK, BV], 0., dtype=tl.float32)
    b_dh2 = tl.full([BK, BV], 0., dtype=tl.float32)
    b_dh3 = tl.full([BK, BV], 0., dtype=tl.float32)
    b_dh4 = tl.full([BK, BV], 0., dtype=tl.float32)
    for i_t in range((T + BT - 1) // BT - 1, -1, -1):
        o_t, m_t, b_g, b_g_last = _chunk_gate(g, i_t, T, HV, BT)
        b_do = tl.load(do + o_t[:, None].to(tl.int64) * (HV * V) + o_c[None, :], mask=m_t[:, None] & (o_c < V)[None, :],
                       other=0.)

        # k qᵀ and k dh, summed over the row blocks
        b_k = _tokens_by_features(k, 0, o_t, m_t, H * K, K, BK)
        b_A = _dot(b_k, _features_by_tokens(q, 0, o_t, m_t, H * K, K, BK), EXACT, PRECISION)
        b_kdh = _dot(b_k, b_dh1, EXACT, PRECISION)
        if K > BK:
            b_k = _tokens_by_features(k, BK, o_t, m_t, H * K, K, BK)
            b_A += _dot(b_k, _features_by_tokens(q, BK, o_t, m_t, H * K, K, BK), EXACT, PRECISION)
            b_kdh += _dot(b_k, b_dh2, EXACT, PRECISION)
        if K > 2 * BK:
            b_k = _tokens_by_features(k, 2 * BK, o_t, m_t, H * K, K, BK)
            b_A += _dot(b_k, _features_by_tokens(q, 2 * BK, o_t, m_t, H * K, K, BK), EXACT, PRECISION)
            b_kdh += _dot(b_k, b_dh3, EXACT, PRECISION)
        if K > 3 * BK:
            b_k = _tokens_by_features(k, 3 * BK, o_t, m_t, H * K, K, BK)
            b_A += _dot(b_k, _features_by_tokens(q, 3 * BK, o_t, m_t, H * K, K, BK), EXACT, PRECISION)
            b_kdh += _dot(b_k, b_dh4, EXACT, PRECISION)

        # token t's value feeds the outputs of tokens s >= t of its chunk; the exponent is masked
        # before exp2 so that s < t (positive exponents) can never overflow
        m_A = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]
        b_A = tl.where(m_A, b_A * scale * tl.math.exp2(tl.where(m_A, b_g[None, :] - b_g[:, None], 0.)), 0.)
        b_dv = _dot(b_A.to(b_do.dtype), b_do, EXACT, PRECISION)
        b_dv += b_kdh * tl.where(m_t, tl.math.exp2(b_g_last - b_g), 0.)[:, None]

        # dh of the chunk start, row block by row block
        b_qg = tl.math.exp2(b_g)[None, :]
        b_decay = tl.math.exp2(b_g_last)
        b_dh1 = b_dh1 * b_decay + scale * _dot((_features_by_tokens(q, 0, o_t, m_t, H * K, K, BK) * b_qg)
                                               .to(b_do.dtype), b_do, EXACT, PRECISION) \
            - _dot(_features_by_tokens(w, 0, o_t, m_t, HV * K, K, BK), b_dv, EXACT, PRECISION)
        if K > BK:
            b_dh2 = b_dh2 * b_decay + scale * _dot((_features_by_tokens(q, BK, o_t, m_t, H * K, K, BK) * b_qg)
                                                   .to(b_do.dtype), b_do, EXACT, PRECISION) \
                - _dot(_features_by_tokens(w, BK, o_t, m_t, HV * K, K, BK), b_dv, EXACT, PRECISION)
        if K > 2 * BK:
            b_dh3 = b_dh3 * b_decay + scale * _dot((_features_by_tokens(q, 2 * BK, o_t, m_t, H * K, K, BK) * b_qg)
                                                   .to(b_do.dtype), b_do, EXACT, PRECISION) \
                - _dot(_features_by_tokens(w, 2 * BK, o_t, m_t, HV * K, K, BK), b_dv, EXACT, PRECISION)
        if K > 3 * BK:
            b_dh4 = b_dh4 * b_decay + scale * _dot((_features_by_tokens(q, 3 * BK, o_t, m_t, H * K, K, BK) * b_qg)
                                                   .to(b_do.dtype), b_do, EXACT, PRECISION) \
                - _dot(_features_by_tokens(w, 3 * BK, o_t, m_t, HV * K, K, BK), b_dv, EXACT, PRECISION)
    return b_dh1, b_dh2, b_dh3, b_dh4


@triton.jit
def _segment(cu_seqlens, seg_ids, i_nh, HV: tl.constexpr):
    """Value head, first token (int64) and length of the segment that program row `i_nh` summarises."""
    i_n, i_h = i_nh // HV, i_nh % HV
    i_s = tl.load(seg_ids + i_n).to(tl.int64)
    bos, eos = tl.load(cu_seqlens + i_s).to(tl.int64), tl.load(cu_seqlens + i_s + 1).to(tl.int64)
    return i_h, bos, (eos - bos).to(tl.int32)


@triton.jit
def _store_block(out, b_x, r0, o_c, m_c, K: tl.constexpr, W: tl.constexpr, BK: tl.constexpr):
    """Rows r0 .. r0+BK, columns o_c of one summary `[K, W]`."""
    o_k = r0 + tl.arange(0, BK)
    tl.store(out + o_k[:, None] * W + o_c[None, :], b_x, mask=(o_k < K)[:, None] & m_c[None, :])


@triton.jit
def _store_blocks(out, b_1, b_2, b_3, b_4, c0, o_c, m_c, K: tl.constexpr, W: tl.constexpr, BK: tl.constexpr):
    """The row blocks of one column tile; the state columns start at c0 (0 for H/G, V for M)."""
    _store_block(out, b_1, 0, c0 + o_c, m_c, K, W, BK)
    if K > BK:
        _store_block(out, b_2, BK, c0 + o_c, m_c, K, W, BK)
    if K > 2 * BK:
        _store_block(out, b_3, 2 * BK, c0 + o_c, m_c, K, W, BK)
    if K > 3 * BK:
        _store_block(out, b_4, 3 * BK, c0 + o_c, m_c, K, W, BK)


@triton.jit
def chunk_summary_fwd_kernel(
    k, w, u, g, hm, cu_seqlens, seg_ids,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_M: tl.constexpr, FP32_STATE: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h, bos, T = _segment(cu_seqlens, seg_ids, i_nh, HV)
    # GVA: value head i_h reads key head i_h // (HV // H); w is already per value head
    k += (bos * H + i_h // (HV // H)) * K
    w += (bos * HV + i_h) * K
    u += (bos * HV + i_h) * V
    g += bos * HV + i_h
    hm += i_nh * K * W
    o_c = i_c * BV + tl.arange(0, BV)
    if IS_M:   # the transition's columns, stored after the V state columns
        b_1, b_2, b_3, b_4 = _forward_chain(k, w, u, g, T, o_c, H, HV, K, V, BT, BK, BV, True, True, PRECISION)
        _store_blocks(hm, b_1, b_2, b_3, b_4, V, o_c, o_c < K, K, W, BK)
    else:
        b_1, b_2, b_3, b_4 = _forward_chain(k, w, u, g, T, o_c, H, HV, K, V, BT, BK, BV, False, FP32_STATE,
                                            PRECISION)
        _store_blocks(hm, b_1, b_2, b_3, b_4, 0, o_c, o_c < V, K, W, BK)


@triton.jit
def chunk_summary_bwd_kernel(
    q, k, w, g, do, gm, cu_seqlens, seg_ids, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_M: tl.constexpr, FP32_STATE: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h, bos, T = _segment(cu_seqlens, seg_ids, i_nh, HV)
    q += (bos * H + i_h // (HV // H)) * K
    k += (bos * H + i_h // (HV // H)) * K
    w += (bos * HV + i_h) * K
    do += (bos * HV + i_h) * V
    g += bos * HV + i_h
    gm += i_nh * K * W
    o_c = i_c * BV + tl.arange(0, BV)
    if IS_M:   # the same transition as the forward's M (DESIGN.md §3 uses its transpose)
        b_1, b_2, b_3, b_4 = _forward_chain(k, w, do, g, T, o_c, H, HV, K, V, BT, BK, BV, True, True, PRECISION)
        _store_blocks(gm, b_1, b_2, b_3, b_4, V, o_c, o_c < K, K, W, BK)
    else:
        b_1, b_2, b_3, b_4 = _g_chain(q, k, w, g, do, T, o_c, scale, H, HV, K, V, BT, BK, BV, FP32_STATE,
                                      PRECISION)
        _store_blocks(gm, b_1, b_2, b_3, b_4, 0, o_c, o_c < V, K, W, BK)


_launch_fwd = autotuned(chunk_summary_fwd_kernel, _CONFIGS, _KEY, prune=_prune)
_launch_bwd = autotuned(chunk_summary_bwd_kernel, _CONFIGS, _KEY, prune=_prune)


MAX_K = 256   # four row blocks of 64, as FLA's chunk kernels


def _block_k(K: int) -> int:
    """Rows of one state block: K itself up to 64 (padded to a power of two), else 64."""
    return min(64, max(16, triton.next_power_of_2(K)))


def _check_k(K: int, chunk_size: int):
    if K > MAX_K:
        raise ValueError(f"fla_cp's summary kernels take head dims K <= {MAX_K} (as FLA's chunk kernels), got K={K}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):   # tl.arange needs a power of two, tl.dot >= 16
        raise ValueError(f"fla_cp's summary kernels take a chunk size that is a power of two >= 16, got {chunk_size}")


def _grid(n: int, HV: int, columns: int):
    """(column blocks, segments x value heads) for the launch's BV."""
    return lambda meta: (triton.cdiv(columns, meta['BV']), n * HV)


def _segment_ids(segments, device) -> torch.Tensor:
    return _segment_ids_on(tuple(segments), torch.device(device))


@functools.lru_cache(maxsize=64)
def _segment_ids_on(segments: tuple, device: torch.device) -> torch.Tensor:
    """Kept per (segments, device): a host-to-GPU copy from pageable memory waits for the stream, and
    every layer of a model asks for the same few lists (never written to)."""
    return torch.tensor(segments, dtype=torch.int32, device=device)


def _summaries(launch, out: str, segments, with_m: bool, H: int, HV: int, K: int, V: int, chunk_size: int,
               **inputs) -> torch.Tensor:
    """Allocate the `[n, HV, K, V (+K)]` fp32 summaries (kernel argument `out`) and fill them: one
    launch for the H / G columns, one more for the M columns when `with_m`."""
    _check_k(K, chunk_size)
    n, device = len(segments), inputs['k'].device
    result = torch.empty(n, HV, K, V + K if with_m else V, dtype=torch.float32, device=device)
    if n == 0:
        return result
    seg_ids = _segment_ids(segments, device)
    for is_m in (False, True) if with_m else (False,):
        launch(_grid(n, HV, K if is_m else V), **inputs, **{out: result}, seg_ids=seg_ids,
               H=H, HV=HV, K=K, V=V, W=result.shape[-1], BT=chunk_size, BK=_block_k(K), IS_M=is_m,
               FP32_STATE=inputs['k'].dtype == torch.float32, PRECISION=FP32_DOT_PRECISION)
    return result


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
    return _summaries(_launch_fwd, 'hm', segments, with_m, H, u.shape[2], K, u.shape[3], chunk_size,
                      k=k, w=w, u=u, g=g, cu_seqlens=cu_seqlens)


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
    return _summaries(_launch_bwd, 'gm', segments, with_m, H, do.shape[2], K, do.shape[3], chunk_size,
                      q=q, k=k, w=w, g=g, do=do, cu_seqlens=cu_seqlens, scale=scale)
