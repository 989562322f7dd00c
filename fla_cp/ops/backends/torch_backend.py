"""Pure-PyTorch local backend: a chunked (WY) Gated DeltaNet on any device, fp32 inside.

Per chunk of C tokens with chunk-local gate cumsum γ (γ_C its last entry) and chunk-start state S:

    A    = strict_tril(β_i k_i·k_j e^{γ_i-γ_j})           T = (I + A)^{-1}      (triangular solve)
    W    = T (β e^γ k)        U = T (β v)                 V_new = U - W S
    O    = scale (q e^γ) S + tril(scale q k^T e^{γ_i-γ_j}) V_new
    S'   = e^{γ_C} S + (k e^{γ_C-γ})^T V_new               = A_c S + (k e^{γ_C-γ})^T U

with the chunk transition `A_c = e^{γ_C} I - (k e^{γ_C-γ})^T W`. Everything that does not depend on
S (the solve, W, U, the intra-chunk attention) is batched over all chunks of all segments at once;
only the state recurrence walks the chunks in order, batched over segments. The backward of the
local chunk compute is autograd through the same code (recomputed in `backward`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK = 64


@dataclass
class TorchPrep:
    """Chunked tensors in segment-major chunk order; `[NCH, HV, C, *]` fp32."""
    qg: torch.Tensor        # scale * q * e^γ                     [NCH, HV, C, K]
    kd: torch.Tensor        # k * e^{γ_C - γ}                     [NCH, HV, C, K]
    w: torch.Tensor         # T (β e^γ k)                         [NCH, HV, C, K]
    u: torch.Tensor         # T (β v)                             [NCH, HV, C, V]
    attn: torch.Tensor      # tril(scale q k^T e^{γ_i-γ_j})       [NCH, HV, C, C]
    gc: torch.Tensor        # e^{γ_C}                             [NCH, HV]
    gamma: torch.Tensor     # γ, the chunk-local gate cumsum      [NCH, HV, C]
    seg_len: list[int]      # tokens of each segment
    seg_offset: list[int]   # first chunk of each segment
    seg_chunks: list[int]   # number of chunks of each segment
    num_tokens: int
    out_dtype: torch.dtype
    leaves: tuple | None = None   # (q, k, v, g, beta) requiring grad, when prepared for backward


def _to_chunks(x: torch.Tensor, seg_len: list[int], chunk: int) -> torch.Tensor:
    """[T, HV, D] -> [NCH, HV, C, D]: each segment zero-padded to whole chunks (zeros make padding an
    identity step of the recurrence). Split/pad/cat rather than a gather: their backward is slicing
    and concatenation, where a gather's backward is a slow scatter-add."""
    pieces = []
    for piece in x.split(seg_len):
        pad = -len(piece) % chunk
        pieces.append(F.pad(piece, (0, 0, 0, 0, 0, pad)) if pad else piece)
    flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return flat.view(-1, chunk, *x.shape[1:]).transpose(1, 2).contiguous()


def from_chunks(o: torch.Tensor, seg_len: list[int]) -> torch.Tensor:
    """[NCH, HV, C, V] in segment-major order -> [T, HV, V], dropping the padding."""
    NCH, HV, C, V = o.shape
    flat = o.transpose(1, 2).reshape(NCH * C, HV, V)
    blocks = flat.split([-(-n // C) * C for n in seg_len])
    pieces = [blk[:n] for blk, n in zip(blocks, seg_len)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _prepare(q, k, v, g, beta, cu: list[int], scale: float, chunk: int) -> TorchPrep:
    T, H, HV = q.shape[1], q.shape[2], v.shape[2]
    f32 = torch.float32
    q, k = (x[0].to(f32).repeat_interleave(HV // H, dim=1) for x in (q, k))   # GVA: head i -> i // (HV/H)
    v, g, beta = v[0].to(f32), g[0].to(f32), beta[0].to(f32)
    seg_len = [b - a for a, b in zip(cu, cu[1:])]
    seg_chunks = [-(-n // chunk) for n in seg_len]
    seg_offset = [sum(seg_chunks[:i]) for i in range(len(seg_chunks))]

    qc, kc, vc = (_to_chunks(x, seg_len, chunk) for x in (q, k, v))              # [NCH, HV, C, D]
    gc, bc = (_to_chunks(x.unsqueeze(-1), seg_len, chunk).squeeze(-1) for x in (g, beta))  # [NCH, HV, C]
    gamma = gc.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # e^{γ_i-γ_j} only where j <= i: masking before exp keeps the upper triangle from overflowing
    decay = torch.where(causal, gamma.unsqueeze(-1) - gamma.unsqueeze(-2), float("-inf")).exp()
    a = (bc.unsqueeze(-1) * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(chunk, dtype=f32, device=q.device)
    rhs = torch.cat([(bc * gamma.exp()).unsqueeze(-1) * kc, bc.unsqueeze(-1) * vc], dim=-1)
    wu = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    K = kc.shape[-1]
    return TorchPrep(
        qg=scale * qc * gamma.exp().unsqueeze(-1),
        kd=kc * (gamma[..., -1:] - gamma).exp().unsqueeze(-1),
        w=wu[..., :K], u=wu[..., K:],
        attn=scale * (qc @ kc.transpose(-1, -2)) * decay,
        gc=gamma[..., -1].exp(), gamma=gamma,
        seg_len=seg_len, seg_offset=seg_offset, seg_chunks=seg_chunks,
        num_tokens=T, out_dtype=None,
    )


def _schedule(prep: TorchPrep, segments: list[int]):
    """Walk order of the chunks of `segments`.

    Segments go longest first, so the segments still running at step t are a prefix of that order.
    Returns (order, sizes, perm): segment order, the number of chunks of each step, and the chunk
    ids in step-major order (None when that is the stored order, e.g. a single segment).
    """
    order = sorted(range(len(segments)), key=lambda i: -prep.seg_chunks[segments[i]])
    steps = max(prep.seg_chunks[s] for s in segments)
    ids = []
    for t in range(steps):
        ids.append([prep.seg_offset[segments[i]] + t for i in order if prep.seg_chunks[segments[i]] > t])
    sizes = [len(x) for x in ids]
    flat = [c for x in ids for c in x]
    perm = None if flat == list(range(prep.w.shape[0])) else torch.tensor(flat, device=prep.w.device)
    return order, sizes, perm


def _by_step(x: torch.Tensor, perm, sizes) -> tuple[torch.Tensor, ...]:
    """Per-step views of a per-chunk tensor. One gather and one split: their backward is one
    scatter and one cat, where indexing every step would cost a full-size gradient per step."""
    return (x if perm is None else x[perm]).split(sizes)


def _unsort(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, i in enumerate(order):
        inv[i] = pos
    return inv


def _scan(prep: TorchPrep, segments: list[int], state: torch.Tensor, extra_cols: int = 0, record: bool = False):
    """Run the state recurrence over `segments` from start states `state` [n, HV, K, X].

    `extra_cols` zero value-columns are appended to U (X = V + extra_cols): with `state = [0 | I]`
    the extra columns carry the transition M (DESIGN.md §1). Returns the end states [n, HV, K, X]
    and, with `record`, (perm, chunk-start states, V_new) in step-major chunk order.
    """
    order, sizes, perm = _schedule(prep, segments)
    w, u, kd, gc = (_by_step(x, perm, sizes) for x in (prep.w, prep.u, prep.kd, prep.gc))
    s = state[order]
    finished, starts, news = [], [], []
    for t, n in enumerate(sizes):
        if n < s.shape[0]:                  # these segments ran out of chunks last step
            finished.append(s[n:])
            s = s[:n]
        u_t = torch.nn.functional.pad(u[t], (0, extra_cols)) if extra_cols else u[t]
        v_new = u_t - w[t] @ s
        if record:
            starts.append(s)
            news.append(v_new)
        s = gc[t][..., None, None] * s + kd[t].transpose(-1, -2) @ v_new
    finished.append(s)
    end = torch.cat(finished[::-1])         # longest-first order again
    rec = (perm, torch.cat(starts), torch.cat(news)) if record else None
    return end[_unsort(order)], rec


def _outputs(prep: TorchPrep, rec) -> torch.Tensor:
    """Per-chunk outputs of a recorded scan, back in token order: [T, HV, V] fp32."""
    perm, s, v_new = rec
    if perm is not None:        # step-major -> segment-major chunk order
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm), device=perm.device)
        s, v_new = s[inv], v_new[inv]
    o = prep.qg @ s + prep.attn @ v_new                              # [NCH, HV, C, V]
    return from_chunks(o, prep.seg_len)


class TorchBackend:
    """Local chunk compute in PyTorch; see `fla_cp/ops/backends/base.py` for the contract."""
    name = "torch"

    def __init__(self, chunk_size: int = CHUNK):
        self.chunk_size = chunk_size

    def kept(self, prep) -> tuple:
        return ()   # backward re-runs the prep under autograd: nothing from the forward helps

    def prepare(self, q, k, v, g, beta, cu_seqlens, scale, for_backward=False, kept=()):
        cu = cu_seqlens.tolist()
        if not for_backward:
            with torch.no_grad():
                prep = _prepare(q, k, v, g, beta, cu, scale, self.chunk_size)
            prep.out_dtype = q.dtype
            return prep
        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v, g, beta))
        with torch.enable_grad():
            prep = _prepare(*leaves, cu, scale, self.chunk_size)
        prep.out_dtype, prep.leaves = q.dtype, leaves
        return prep

    def _zero_states(self, prep, n, cols):
        HV, K = prep.w.shape[1], prep.w.shape[-1]
        return prep.w.new_zeros(n, HV, K, cols)

    @torch.no_grad()
    def summarize(self, prep, segments, with_m):
        V, K = prep.u.shape[-1], prep.w.shape[-1]
        state = self._zero_states(prep, len(segments), V + (K if with_m else 0))
        if with_m:
            state[..., V:] = torch.eye(K, dtype=state.dtype, device=state.device)
        end, _ = _scan(prep, segments, state, extra_cols=K if with_m else 0)
        return end

    def _forward(self, prep, h0):
        segments = list(range(len(prep.seg_chunks)))
        if h0 is None:
            h0 = self._zero_states(prep, len(segments), prep.u.shape[-1])
        ht, rec = _scan(prep, segments, h0, record=True)
        return _outputs(prep, rec), ht

    @torch.no_grad()
    def forward(self, prep, h0):
        o, ht = self._forward(prep, h0)
        return o.unsqueeze(0).to(prep.out_dtype), ht

    @torch.no_grad()
    def state_grad(self, prep, do, segments, with_m):
        """Reverse recurrence dS_start = A_cᵀ dS_end + qgᵀ dO - Wᵀ attnᵀ dO per chunk."""
        V, K = prep.u.shape[-1], prep.w.shape[-1]
        cols = V + (K if with_m else 0)
        order, sizes, perm = _schedule(prep, segments)
        do_c = _to_chunks(do[0].float(), prep.seg_len, self.chunk_size)   # [NCH, HV, C, V]
        # the do-only part of every chunk at once: qgᵀ dO - Wᵀ attnᵀ dO
        w, kd, gc, qg, attn, dO = (_by_step(x, perm, sizes) for x in
                                   (prep.w, prep.kd, prep.gc, prep.qg, prep.attn, do_c))
        x = self._zero_states(prep, 0, cols)
        for t in reversed(range(len(sizes))):   # last chunks first; segments join as t reaches them
            n = sizes[t]
            if n > x.shape[0]:
                fresh = self._zero_states(prep, n - x.shape[0], cols)
                if with_m:      # the extra columns carry Mᵀ, started from I at the segment's end
                    fresh[..., V:] = torch.eye(K, dtype=fresh.dtype, device=fresh.device)
                x = torch.cat([x, fresh])
            wt = w[t].transpose(-1, -2)
            x = gc[t][..., None, None] * x - wt @ (kd[t] @ x)
            x[..., :V] += qg[t].transpose(-1, -2) @ dO[t] - wt @ (attn[t].transpose(-1, -2) @ dO[t])
        x = x[_unsort(order)]
        if with_m:      # the contract returns M, not Mᵀ
            x = torch.cat([x[..., :V], x[..., V:].transpose(-1, -2)], dim=-1)
        return x

    def backward(self, prep, h0, do, dht):
        if prep.leaves is None:
            raise RuntimeError("TorchBackend.backward needs prepare(..., for_backward=True)")
        with torch.enable_grad():
            h0_leaf = None if h0 is None else h0.detach().requires_grad_()
            o, ht = self._forward(prep, h0_leaf)
            outputs, grads = [o], [do[0].float()]
            if dht is not None:
                outputs.append(ht)
                grads.append(dht)
            inputs = list(prep.leaves) + ([h0_leaf] if h0_leaf is not None else [])
            res = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
        res = [torch.zeros_like(x) if r is None else r for r, x in zip(res, inputs)]
        dq, dk, dv, dg, dbeta = res[:5]
        return dq, dk, dv, dg, dbeta, (res[5] if h0_leaf is not None else None)
