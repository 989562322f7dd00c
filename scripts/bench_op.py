"""Per-rank cost of chunk_cp (triton backend) on one GPU vs FLA's plain op and FLA's own CP path.

    python scripts/bench_op.py                       # T in 8K,32K,128K; P in 1,2,4,8; both shapes
    python scripts/bench_op.py --T 32768 --P 4 --shapes main --rep 50
    python scripts/bench_op.py --smoke               # CPU, no GPU: checks the plumbing, not the speed

One process, one GPU. For each (shape, T, P) the sequence (batch 1, one document, contiguous layout)
is cut into P shards and every rank's local work is run *in turn* with the exact states it would
receive: all summaries are computed first (untimed), gathered in memory, and folded exactly as the
orchestration does; then each distinct rank role (first, middle, last) is timed on its own shard:

    ours fwd      prepare -> summarize (if it sends) -> fold (torch bmm) -> forward(h0)
    ours fwd+bwd  the above + prepare(for_backward: w, u from the kept gate cumsum and A) -> state_grad
                  (if it received) -> fold -> backward
    FLA plain     fla.ops.gated_delta_rule.chunk_gated_delta_rule on the whole T (the P = 1 baseline),
                  and on one T/P shard with no state in or out ("FLA T/P"): "ours/FLA T/P" is the
                  per-rank overhead of CP over FLA's own op on the same tokens (target <= 1.15x)
    FLA CP        what FLA 0.6 runs per rank with a cp_context, minus its collectives (which need a
                  real group): its plain op on the shard, fed the states its CP kernels produce:
                  forward  chunk_cp_fwd_h (if it sends) -> chunk_cp_merge of the gathered [H | M]
                           (if it receives; zeros on the first rank) -> the plain op with that h0
                  backward chunk_cp_bwd_dh (if it received) -> chunk_cp_merge of the gathered [G | Mᵀ]
                           (if it sends; zeros on the last rank) -> the plain op's backward with that dht
                  The gathered buffers hold our exact summaries in FLA's layout. "n/a" where FLA's CP
                  kernels fail to run; the reason is printed under the table.

t_rank is the slowest role. The collectives are modelled, not run: each rank receives (P-1) payloads
of HV*K*(V[+K])*4 bytes per all_gather (one in forward, one in backward; M only when P > 2), at
--bw GB/s (default 300 GB/s: an NVLink-class all-gather bus bandwidth; latency ignored). Projected
parallel efficiency = t(T) / (P * (t_rank(T/P) + comm)). "share" = summary + fold time / t_rank.
"err" = max relative error, over the timed ranks, of their output (fwd) and input gradients
(fwd+bwd) vs FLA's plain op on the whole T, for ours and for FLA's CP path, over each shard and over
its first and last 128 tokens (where the received states act): the self-check that the exchanged
states are exact. Above ERR_TOL (1e-2 in bf16, 1e-4 in fp32) the run prints FAIL and exits 1.
bf16 inputs, fp32 states.

--smoke runs the same code paths on CPU: FLA's and our Triton kernels in Triton's interpreter
(TRITON_INTERPRET=1, and the interpreter patches of scripts/triton_patches.py), the triton backend, a tiny
shape (T=256, P in 1,2,4), fp32 (the interpreter has no bf16 math), one perf_counter call per
timing (the times mean nothing). It exits 1 if err fails or FLA's CP column is n/a.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

# triton.jit picks the interpreter or the compiler when a kernel is decorated, i.e. when fla / fla_cp
# are first imported, so --smoke has to turn the interpreter on before anything imports them (torch
# included, to be safe). Looking at sys.argv here is the simplest way; main() checks it worked.
if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {
    "main": dict(H=16, HV=16, K=128, V=256),
    # FLA's GatedDeltaNet layer defaults: hidden 2048, head_dim 256, num_heads 6, expand_v 2
    "fla": dict(H=6, HV=6, K=256, V=512),
    # --smoke only: small enough for Triton's CPU interpreter
    "tiny": dict(H=2, HV=2, K=16, V=32),
}
GPU_SHAPES = ["main", "fla"]
STATE_BYTES = 4  # summaries and states travel in fp32
# err above this fails the run. At the shard edges (see shard_err) a missing state costs ~0.3, a state
# 1% off ~3e-3, one rounded to bf16 ~5e-4 (measured in fp32 at 16K-64K tokens, K=128, V=256); fp32
# paths agree to ~1e-6
ERR_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


# ------------------------------------------------------------------------------------------------
# the model of the collectives and the efficiency (CPU-side, no GPU needed)
# ------------------------------------------------------------------------------------------------
def summary_with_m(P: int) -> bool:
    """One sequence over P contiguous ranks, no initial state: M is needed only by middle ranks."""
    return P > 2


def collective_bytes(P: int, HV: int, K: int, V: int) -> tuple[int, int]:
    """Bytes each rank receives in the forward and in the backward all_gather of summaries."""
    if P == 1:
        return 0, 0
    payload = HV * K * (V + (K if summary_with_m(P) else 0)) * STATE_BYTES
    return (P - 1) * payload, (P - 1) * payload


def comm_seconds(nbytes: int, bw_gbs: float) -> float:
    return nbytes / (bw_gbs * 1e9)


def efficiency(t_full: float, t_rank: float, comm: float, P: int) -> float:
    """Projected parallel efficiency t(T) / (P * (t_rank(T/P) + comm))."""
    return t_full / (P * (t_rank + comm))


def rank_roles(P: int) -> list[int]:
    """Ranks whose work differs: the first (sends only), one middle (both), the last (receives)."""
    return sorted({0, min(1, P - 1), P - 1})


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class Row:
    shape: str
    T: int
    P: int
    mode: str                  # "fwd" | "fwd+bwd"
    t_full: float              # FLA plain on T, ms
    t_shard: float             # FLA plain on one T/P shard (no state in or out), ms
    t_rank: float              # ours, slowest rank on T/P, ms
    t_share: float             # ours, summary + fold of that rank, ms
    t_fla_cp: float | None     # FLA's CP path on T/P, slowest rank, ms
    nbytes: int                # received by one rank in the collectives of this mode
    bw: float
    err: float = float("nan")  # see the module docstring
    fla_cp_error: str | None = None  # why t_fla_cp is None

    @property
    def comm_ms(self) -> float:
        return comm_seconds(self.nbytes, self.bw) * 1e3

    @property
    def eff(self) -> float:
        return efficiency(self.t_full, self.t_rank, self.comm_ms, self.P)

    @property
    def overhead(self) -> float:
        """Ours on T/P over FLA's plain op on T/P, both measured: the issue's per-rank target (<= 1.15x)."""
        return self.t_rank / self.t_shard


COLUMNS = ["shape", "T", "P", "mode", "FLA T (ms)", "FLA T/P", "ours T/P", "ours/FLA T/P", "FLA-CP T/P", "share",
           "bytes/rank", "comm (ms)", "eff", "err"]


def fmt_T(T: int) -> str:
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def format_table(rows: list[Row]) -> str:
    def cells(r: Row) -> list[str]:
        return [r.shape, fmt_T(r.T), str(r.P), r.mode, f"{r.t_full:.3f}", f"{r.t_shard:.3f}", f"{r.t_rank:.3f}",
                f"{r.overhead:.2f}x", "n/a" if r.t_fla_cp is None else f"{r.t_fla_cp:.3f}",
                f"{100 * r.t_share / r.t_rank:.1f}%", fmt_bytes(r.nbytes), f"{r.comm_ms:.3f}",
                f"{100 * r.eff:.1f}%", f"{r.err:.1e}"]
    table = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# GPU work (on CPU under --smoke)
# ------------------------------------------------------------------------------------------------
def make_inputs(T, H, HV, K, V, device, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, H, K, device=device, generator=gen).to(dtype)
    k = F.normalize(torch.randn(1, T, H, K, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(1, T, HV, V, device=device, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(1, T, HV, device=device, generator=gen) + 3).float()
    beta = torch.rand(1, T, HV, device=device, generator=gen).to(dtype)
    do = torch.randn(1, T, HV, V, device=device, generator=gen).to(dtype)
    return q, k, v, g, beta, do


def timed(fn, rep: int, device: torch.device):
    """(fn's result, ms per call): triton's do_bench (median) on a GPU. On CPU (--smoke) the kernels
    run as Python in Triton's interpreter: one perf_counter call gives both, a time that means nothing."""
    t0 = time.perf_counter()
    out = fn()
    if device.type != "cuda":
        return out, (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return out, do_bench(fn, warmup=max(5, rep // 4), rep=rep)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def shard_err(out, ref, r: int, n: int, edge: int = 128) -> float:
    """Max relative error of rank r's (o, [dq, dk, dv, dg, dbeta]) vs FLA's plain op on the whole T
    (same layout), over the rank's n tokens and over their first and last `edge` tokens alone: the
    exchanged h0 / dht act there and decay within ~100 tokens with these gates, so over a long shard
    a missing state moves the whole-shard error by only ~2e-2 (64K tokens), at the edges by ~0.3."""
    (o, grads), (o_ref, grads_ref) = out, ref
    ends = torch.cat([torch.arange(min(edge, n)), torch.arange(max(n - edge, 0), n)]).to(o.device)
    err = 0.0
    for a, b in [(o, o_ref), *zip(grads, grads_ref)]:
        b = b[:, r * n:(r + 1) * n]
        err = max(err, rel(a, b), rel(a[:, ends], b[:, ends]))
    return err


class OursRanks:
    """Every rank of one (T, P) run with exact exchanged states; timed one role at a time."""

    def __init__(self, x, P, scale):
        from fla_cp.ops.backends.triton_backend import TritonBackend
        # FLA's chunk kernels and ours (on CPU under --smoke: interpreted), what backend="triton" runs
        self.be, self.P, self.scale = TritonBackend(), P, scale
        q, k, v, g, beta, do = x
        T = q.shape[1]
        assert T % P == 0
        n = T // P
        self.V = v.shape[-1]
        self.cu = torch.tensor([0, n], device=q.device)
        self.shards = [[t[:, r * n:(r + 1) * n].contiguous() for t in (q, k, v, g, beta)] for r in range(P)]
        self.do = [do[:, r * n:(r + 1) * n].contiguous() for r in range(P)]
        self.with_m = summary_with_m(P)
        # the exact exchange: every rank's summaries, as all_gather would deliver them
        self.fwd_summ, self.bwd_summ, self.kept = [None] * P, [None] * P, [None] * P
        for r in range(P):
            prep = self.be.prepare(*self.shards[r], self.cu, scale)
            self.kept[r] = self.be.kept(prep)
            if r < P - 1:
                self.fwd_summ[r] = self.be.summarize(prep, [0], self.with_m)
            if r > 0:
                self.bwd_summ[r] = self.be.state_grad(prep, self.do[r], [0], self.with_m)
        self.h0 = [self.fold_fwd(r) for r in range(P)]

    def fold_fwd(self, r):
        """S <- M_j S + H_j over ranks j < r (torch bmm over the HV heads)."""
        state = None
        for j in range(r):
            s = self.fwd_summ[j][0]
            h = s[..., :self.V]
            state = h if state is None else torch.baddbmm(h, s[..., self.V:], state)
        # contiguous: a lone H is a view into [H | M], and FLA's kernels read states as dense
        # (the orchestration copies states into fresh buffers)
        return None if state is None else state.unsqueeze(0).contiguous()

    def fold_bwd(self, r):
        """dS <- M_jᵀ dS + G_j over ranks j > r, from the last backwards."""
        d = None
        for j in range(self.P - 1, r, -1):
            s = self.bwd_summ[j][0]
            gm = s[..., :self.V]
            d = gm if d is None else torch.baddbmm(gm, s[..., self.V:].transpose(-1, -2), d)
        return None if d is None else d.unsqueeze(0).contiguous()   # see fold_fwd

    def fwd(self, r):
        prep = self.be.prepare(*self.shards[r], self.cu, self.scale)
        self.kept[r] = self.be.kept(prep)   # what the autograd Function saves for backward
        if r < self.P - 1:
            self.be.summarize(prep, [0], self.with_m)
        return self.be.forward(prep, self.fold_fwd(r))

    def bwd(self, r):
        prep = self.be.prepare(*self.shards[r], self.cu, self.scale, for_backward=True, kept=self.kept[r])
        if r > 0:
            self.be.state_grad(prep, self.do[r], [0], self.with_m)
        return self.be.backward(prep, self.h0[r], self.do[r], self.fold_bwd(r))

    def outputs(self, r, backward):
        """Rank r's forward (+ backward): (o, [dq, dk, dv, dg, dbeta] or []), for the err check."""
        return self.fwd(r)[0], (list(self.bwd(r)[:5]) if backward else [])

    def share_fwd(self, r, prep):
        if r < self.P - 1:
            self.be.summarize(prep, [0], self.with_m)
        self.fold_fwd(r)

    def share_bwd(self, r, prep):
        if r > 0:
            self.be.state_grad(prep, self.do[r], [0], self.with_m)
        self.fold_bwd(r)


def fla_plain(x, scale, backward: bool, h0=None, dht=None):
    """FLA's op (with autograd when backward); returns (o, [dq, dk, dv, dg, dbeta] or [])."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    q, k, v, g, beta, do = x
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v, g, beta)]
    if h0 is not None:
        h0 = h0.detach().requires_grad_(backward)
    # dht can only reach the kernels as the gradient of the final state, so it has to be output
    o, ht = chunk_gated_delta_rule(*leaves, scale=scale, initial_state=h0, output_final_state=dht is not None)
    if not backward:
        return o, []
    outs, grads = [o], [do]
    if dht is not None:
        outs.append(ht)
        grads.append(dht)
    torch.autograd.backward(outs, grads)
    return o, [t.grad for t in leaves]


def fla_cp_rank(ours: OursRanks, r: int, backward: bool):
    """FLA 0.6's CP path on rank r's shard (contiguous layout, one sequence), minus the collectives.
    Returns a callable to time; it returns (o, grads) for the err check.

    What `chunk_gated_delta_rule(..., cp_context=...)` runs on rank r (fla/ops/gated_delta_rule/chunk.py,
    fla/ops/cp/chunk_delta_h.py), in order:
      forward   cumsum + fwd_intra -> chunk_cp_fwd_h into hm (not on the last rank) -> all_gather ->
                chunk_cp_merge of the r earlier ranks into h0 (zeros on the first rank) -> fwd_h(h0) -> o
      backward  recompute w, u -> fwd_h(h0) -> bwd_dv_local -> chunk_cp_bwd_dh into dhm (not on the first
                rank) -> all_gather -> chunk_cp_merge of the P-1-r later ranks into dht (zeros on the last
                rank) -> bwd_dhu(h0, dht) -> dqkwg, wy bwd
    Here the plain op does the local part with h0 / dht taken from FLA's merges, so its output checks
    them. Differences, all negligible: dv for chunk_cp_bwd_dh is computed once outside (FLA shares the
    plain backward's), and the plain forward also stores the final state (the way dht gets in).
    """
    from fla.ops.common.chunk_o import chunk_bwd_dv_local
    from fla.ops.cp.chunk_bwd import chunk_cp_bwd_dh
    from fla.ops.cp.chunk_fwd import chunk_cp_fwd_h
    from fla.ops.cp.chunk_merge import chunk_cp_merge
    P, be, V, dev = ours.P, ours.be, ours.V, ours.cu.device
    prep = be.prepare(*ours.shards[r], ours.cu, ours.scale)
    q, k, do = prep.q, prep.k, ours.do[r]
    HV, K = prep.u.shape[2], k.shape[-1]
    x = (*ours.shards[r], do)

    def gathered(summaries, transpose_m):
        """What FLA's all_gather would deliver, [P, HV, K, V + K]: [H | M] forward, [G | Mᵀ] backward
        (FLA's backward kernel stores the transposed transition, ours stores M). Ranks that send
        nothing, or send no M (P = 2), get M = I; the merge never reads the former."""
        ag = torch.zeros(P, HV, K, V + K, device=dev)
        ag[..., V:] = torch.eye(K, device=dev)
        for j, s in enumerate(summaries):
            if s is not None:
                ag[j, ..., :V] = s[0][..., :V]
                if s.shape[-1] > V:
                    ag[j, ..., V:] = s[0][..., V:].transpose(-1, -2) if transpose_m else s[0][..., V:]
        return ag

    ag_fwd, ag_bwd = gathered(ours.fwd_summ, False), gathered(ours.bwd_summ, True)
    dv = chunk_bwd_dv_local(q=q, k=k, g=prep.g, do=do, scale=ours.scale, cu_seqlens=ours.cu) if backward else None

    def run():
        hm = torch.zeros(HV, K, V + K, device=dev)
        h0 = torch.zeros(1, HV, K, V, device=dev)
        if r < P - 1:
            chunk_cp_fwd_h(k=k, w=prep.w, u=prep.u, hm=hm, g=prep.g, cu_seqlens=ours.cu)
        if r > 0:
            chunk_cp_merge(h=h0[0], ag_hm=ag_fwd, num_ranks=r, rank=r, forward=True)
        dht = None
        if backward:
            dhm = torch.zeros(HV, K, V + K, device=dev)
            dht = torch.zeros(1, HV, K, V, device=dev)
            if r > 0:
                chunk_cp_bwd_dh(q=q, k=k, w=prep.w, do=do, dv=dv, dhm=dhm, g=prep.g, scale=ours.scale,
                                cu_seqlens=ours.cu)
            if r < P - 1:
                chunk_cp_merge(h=dht[0], ag_hm=ag_bwd, num_ranks=P - 1 - r, rank=r, forward=False)
        return fla_plain(x, ours.scale, backward, h0=h0, dht=dht)
    return run


def run_config(shape_name, T, P, args, baseline_cache, device):
    s = SHAPES[shape_name]
    H, HV, K, V = s["H"], s["HV"], s["K"], s["V"]
    scale = K ** -0.5
    x = make_inputs(T, H, HV, K, V, device, args.dtype)
    key = (shape_name, T)
    if key not in baseline_cache:
        outs, t_full = {}, {}
        for m in args.modes:
            outs[m], t_full[m] = timed(lambda m=m: fla_plain(x, scale, backward=m == "fwd+bwd"), args.rep, device)
        # err's reference: o, and the input gradients on the whole T when the backward ran
        baseline_cache[key] = (outs.get("fwd+bwd") or outs["fwd"], t_full)
    ref, t_full = baseline_cache[key]
    ours = OursRanks(x, P, scale)
    n = T // P
    shard = (*ours.shards[0], ours.do[0])     # every shard has the same cost without states
    t_shard = {m: timed(lambda m=m: fla_plain(shard, scale, backward=m == "fwd+bwd"), args.rep, device)[1]
               for m in args.modes}
    fwd_bytes, bwd_bytes = collective_bytes(P, HV, K, V)
    rows = []
    fla_cp_error = None   # why FLA's CP path could not run, once per config
    for mode in args.modes:
        backward = mode == "fwd+bwd"
        t_rank, t_share, t_fla, err = 0.0, 0.0, 0.0, 0.0
        for r in rank_roles(P):
            out, t = timed(lambda r=r: ours.outputs(r, backward), args.rep, device)
            err = max(err, shard_err(out, ref, r, n))
            prep_f = ours.be.prepare(*ours.shards[r], ours.cu, scale)
            sh = timed(lambda r=r: ours.share_fwd(r, prep_f), args.rep, device)[1]
            if backward:
                prep_b = ours.be.prepare(*ours.shards[r], ours.cu, scale, for_backward=True, kept=ours.kept[r])
                sh += timed(lambda r=r: ours.share_bwd(r, prep_b), args.rep, device)[1]
            if t > t_rank:
                t_rank, t_share = t, sh
            if fla_cp_error is None:
                try:
                    out, t = timed(fla_cp_rank(ours, r, backward), args.rep, device)
                    err = max(err, shard_err(out, ref, r, n))
                    t_fla = max(t_fla, t)
                except Exception as e:  # noqa: BLE001 - FLA's CP kernels may not run for a shape / device
                    fla_cp_error = f"FLA CP n/a for {shape_name} T={T} P={P}: {type(e).__name__}: {e}"
                    print(f"  {fla_cp_error}", file=sys.stderr)
        rows.append(Row(shape_name, T, P, mode, t_full[mode], t_shard[mode], t_rank, t_share,
                        None if fla_cp_error else t_fla, fwd_bytes + (bwd_bytes if backward else 0), args.bw, err,
                        fla_cp_error))
    return rows


def allow_fla_cp_kernels_off_cuda():
    """FLA's CP kernels refuse any device but an Ampere+ GPU or an Ascend NPU (`_check_cp_device`, a
    guard for their tf32x3 dots), yet they run in Triton's interpreter, where a dot is numpy fp32.
    --smoke lifts the guard in the three modules that imported it, so that the FLA CP column runs the
    same FLA calls as on a GPU; nothing else does."""
    from fla.ops.cp import chunk_bwd, chunk_fwd, chunk_merge
    for module in (chunk_fwd, chunk_bwd, chunk_merge):
        module._check_cp_device = lambda device: None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--T", type=ints, default=None, help="global lengths (comma list; 8192,32768,131072, "
                   "smoke: 256)")
    p.add_argument("--P", type=ints, default=None, help="CP sizes (comma list; 1,2,4,8, smoke: 1,2,4)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=None,
                   help=f"of {list(SHAPES)} ({','.join(GPU_SHAPES)}, smoke: tiny)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    p.add_argument("--bw", type=float, default=300.0, help="modelled all-gather bandwidth, GB/s")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time per measurement, ms")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test in Triton's interpreter (tiny shape, fp32, times meaningless)")
    args = p.parse_args(argv)
    if args.smoke:
        args.T, args.P, args.shapes = args.T or [256], args.P or [1, 2, 4], args.shapes or ["tiny"]
    else:
        args.T, args.P, args.shapes = args.T or [8192, 32768, 131072], args.P or [1, 2, 4, 8], args.shapes or GPU_SHAPES
    bad = [s for s in args.shapes if s not in SHAPES] + [m for m in args.modes if m not in ("fwd", "fwd+bwd")]
    if bad:
        p.error(f"unknown shapes/modes: {bad}")
    if min(args.T) < 1 or min(args.P) < 1:
        p.error(f"T and P must be >= 1: T={args.T}, P={args.P}")
    if any(T % P for T in args.T for P in args.P):
        p.error(f"every T must split evenly over every P: T={args.T}, P={args.P}")
    # the interpreter has no bf16 math (numpy): the smoke runs fp32, the GPU run bf16
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 before fla is imported: run it as "
                     "`python scripts/bench_op.py --smoke`")
        # process-wide interpreter patches FLA's kernels need (fla_cp applies none)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from triton_patches import enable_fla_kernels_in_interpreter
        enable_fla_kernels_in_interpreter()
        allow_fla_cp_kernels_off_cuda()
        device = torch.device("cpu")
        print(f"# SMOKE TEST on CPU, Triton interpreter | torch {torch.__version__} | fp32 | times are one "
              f"perf_counter call each and MEAN NOTHING; checked: the code paths run and err", flush=True)
    elif not torch.cuda.is_available():
        sys.exit("bench_op.py needs a CUDA GPU (FLA's chunk kernels); see --help, or --smoke on CPU")
    else:
        device = torch.device("cuda")
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 | comm modelled at "
              f"{args.bw:g} GB/s, latency ignored | times are do_bench medians in ms", flush=True)
    rows, cache = [], {}
    for shape in args.shapes:
        for T in args.T:
            for P in args.P:
                rows += run_config(shape, T, P, args, cache, device)
                print(format_table(rows[-len(args.modes):]).split("\n", 2)[-1], flush=True)
            cache.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    failed = False
    for reason in dict.fromkeys(r.fla_cp_error for r in rows if r.fla_cp_error):
        print(reason)
        failed |= args.smoke          # the smoke exists to run FLA's CP calls too
    tol = ERR_TOL[args.dtype]
    for r in rows:
        if not r.err <= tol:          # also catches nan
            print(f"FAIL: err {r.err:.1e} > {tol:g} for {r.shape} T={r.T} P={r.P} {r.mode}: "
                  f"the exchanged states are not exact")
            failed = True
    if failed:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
