"""Per-rank cost of chunk_cp (triton backend) on one GPU vs FLA's plain op and FLA's own CP path.

    python scripts/bench_op.py                       # T in 8K,32K,128K; P in 1,2,4,8; both shapes
    python scripts/bench_op.py --T 32768 --P 4 --shapes main --rep 50

One process, one GPU. For each (shape, T, P) the sequence (batch 1, one document, contiguous layout)
is cut into P shards and every rank's local work is run *in turn* with the exact states it would
receive: all summaries are computed first (untimed), gathered in memory, and folded exactly as the
orchestration does; then each distinct rank role (first, middle, last) is timed on its own shard:

    ours fwd      prepare -> summarize (if it sends) -> fold (torch bmm) -> forward(h0)
    ours fwd+bwd  the above + prepare(for_backward) -> state_grad (if it received) -> fold -> backward
    FLA plain     fla.ops.gated_delta_rule.chunk_gated_delta_rule on the whole T (the P = 1 baseline)
    FLA CP        FLA's plain op on the shard with h0 / dht + FLA's CP kernels (chunk_cp_fwd_h,
                  chunk_cp_bwd_dh, chunk_cp_merge) on that shard: FLA 0.6's CP path minus its
                  collectives, which need a real group (n/a where its kernels fail to run)

t_rank is the slowest role. The collectives are modelled, not run: each rank receives (P-1) payloads
of HV*K*(V[+K])*4 bytes per all_gather (one in forward, one in backward; M only when P > 2), at
--bw GB/s (default 300 GB/s: an NVLink-class all-gather bus bandwidth; latency ignored). Projected
parallel efficiency = t(T) / (P * (t_rank(T/P) + comm)). "share" = summary + fold time / t_rank.
"err" = max relative error of the timed ranks' outputs vs FLA's plain op on T (a self-check that the
exchanged states are exact). bf16 inputs, fp32 states.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = {
    "main": dict(H=16, HV=16, K=128, V=256),
    # FLA's GatedDeltaNet layer defaults: hidden 2048, head_dim 256, num_heads 6, expand_v 2
    "fla": dict(H=6, HV=6, K=256, V=512),
}
STATE_BYTES = 4  # summaries and states travel in fp32


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
    t_rank: float              # ours, slowest rank on T/P, ms
    t_share: float             # ours, summary + fold of that rank, ms
    t_fla_cp: float | None     # FLA's CP path on T/P, slowest rank, ms
    nbytes: int                # received by one rank in the collectives of this mode
    bw: float
    err: float = float("nan")

    @property
    def comm_ms(self) -> float:
        return comm_seconds(self.nbytes, self.bw) * 1e3

    @property
    def eff(self) -> float:
        return efficiency(self.t_full, self.t_rank, self.comm_ms, self.P)

    @property
    def overhead(self) -> float:
        """Ours on T/P over FLA's plain op on T/P scaled from T: t_rank * P / t(T)."""
        return self.t_rank * self.P / self.t_full


COLUMNS = ["shape", "T", "P", "mode", "FLA T (ms)", "ours T/P", "FLA-CP T/P", "share", "bytes/rank",
           "comm (ms)", "eff", "err"]


def format_table(rows: list[Row]) -> str:
    def cells(r: Row) -> list[str]:
        return [r.shape, f"{r.T // 1024}K", str(r.P), r.mode, f"{r.t_full:.3f}", f"{r.t_rank:.3f}",
                "n/a" if r.t_fla_cp is None else f"{r.t_fla_cp:.3f}",
                f"{100 * r.t_share / r.t_rank:.1f}%", fmt_bytes(r.nbytes), f"{r.comm_ms:.3f}",
                f"{100 * r.eff:.1f}%", f"{r.err:.1e}"]
    table = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# GPU work
# ------------------------------------------------------------------------------------------------
def make_inputs(T, H, HV, K, V, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    bf = torch.bfloat16
    q = torch.randn(1, T, H, K, device=device, generator=gen).to(bf)
    k = F.normalize(torch.randn(1, T, H, K, device=device, generator=gen), dim=-1).to(bf)
    v = torch.randn(1, T, HV, V, device=device, generator=gen).to(bf)
    g = F.logsigmoid(torch.randn(1, T, HV, device=device, generator=gen) + 3).float()
    beta = torch.rand(1, T, HV, device=device, generator=gen).to(bf)
    do = torch.randn(1, T, HV, V, device=device, generator=gen).to(bf)
    return q, k, v, g, beta, do


def bench(fn, rep: int) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(5, rep // 4), rep=rep)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class OursRanks:
    """Every rank of one (T, P) run with exact exchanged states; timed one role at a time."""

    def __init__(self, x, P, scale):
        from fla_cp.ops.backends.triton_backend import TritonBackend
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
        self.fwd_summ, self.bwd_summ = [None] * P, [None] * P
        for r in range(P):
            prep = self.be.prepare(*self.shards[r], self.cu, scale)
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
        return None if state is None else state.unsqueeze(0)

    def fold_bwd(self, r):
        """dS <- M_jᵀ dS + G_j over ranks j > r, from the last backwards."""
        d = None
        for j in range(self.P - 1, r, -1):
            s = self.bwd_summ[j][0]
            gm = s[..., :self.V]
            d = gm if d is None else torch.baddbmm(gm, s[..., self.V:].transpose(-1, -2), d)
        return None if d is None else d.unsqueeze(0)

    def fwd(self, r):
        prep = self.be.prepare(*self.shards[r], self.cu, self.scale)
        if r < self.P - 1:
            self.be.summarize(prep, [0], self.with_m)
        return self.be.forward(prep, self.fold_fwd(r))

    def bwd(self, r):
        prep = self.be.prepare(*self.shards[r], self.cu, self.scale, for_backward=True)
        if r > 0:
            self.be.state_grad(prep, self.do[r], [0], self.with_m)
        return self.be.backward(prep, self.h0[r], self.do[r], self.fold_bwd(r))

    def share_fwd(self, r, prep):
        if r < self.P - 1:
            self.be.summarize(prep, [0], self.with_m)
        self.fold_fwd(r)

    def share_bwd(self, r, prep):
        if r > 0:
            self.be.state_grad(prep, self.do[r], [0], self.with_m)
        self.fold_bwd(r)


def fla_plain(x, scale, backward: bool, h0=None, dht=None):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    q, k, v, g, beta, do = x
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v, g, beta)]
    if h0 is not None:
        h0 = h0.detach().requires_grad_(backward)
    o, ht = chunk_gated_delta_rule(*leaves, scale=scale, initial_state=h0, output_final_state=dht is not None)
    if backward:
        outs, grads = [o], [do]
        if dht is not None:
            outs.append(ht)
            grads.append(dht)
        torch.autograd.backward(outs, grads)
    return o


def fla_cp_rank(ours: OursRanks, r: int, backward: bool):
    """FLA 0.6's CP path on rank r's shard, minus collectives: its plain op with the exact h0/dht
    plus its CP summary/merge kernels. Returns a callable to time."""
    from fla.ops.common.chunk_o import chunk_bwd_dv_local
    from fla.ops.cp.chunk_bwd import chunk_cp_bwd_dh
    from fla.ops.cp.chunk_fwd import chunk_cp_fwd_h
    from fla.ops.cp.chunk_merge import chunk_cp_merge
    P, be = ours.P, ours.be
    prep = be.prepare(*ours.shards[r], ours.cu, ours.scale)
    q, k = prep.q, prep.k
    HV, K, V = prep.u.shape[2], k.shape[-1], ours.V
    x = (*ours.shards[r], ours.do[r])
    dv = None
    if backward:
        dv = chunk_bwd_dv_local(q=q, k=k, g=prep.g, do=ours.do[r], scale=ours.scale, cu_seqlens=ours.cu)
    # FLA always gathers [H | M]; fill the gathered buffer with our exact summaries (M = I where unused)
    ag = torch.zeros(P, HV, K, V + K, device=q.device)
    ag[..., V:] = torch.eye(K, device=q.device)
    for j in range(P):
        if ours.fwd_summ[j] is not None:
            ag[j, ..., :ours.fwd_summ[j].shape[-1]] = ours.fwd_summ[j][0]
    hm = torch.empty(HV, K, V + K, device=q.device)
    h_buf = torch.empty(HV, K, V, device=q.device)
    dht = ours.fold_bwd(r)

    def run():
        if r < P - 1:
            chunk_cp_fwd_h(k=k, w=prep.w, u=prep.u, hm=hm, g=prep.g, cu_seqlens=ours.cu)
        if r > 0:
            chunk_cp_merge(h=h_buf, ag_hm=ag, num_ranks=r, rank=r, forward=True)
        if backward and r > 0:
            chunk_cp_bwd_dh(q=q, k=k, w=prep.w, do=ours.do[r], dv=dv, dhm=hm, g=prep.g, scale=ours.scale,
                            cu_seqlens=ours.cu)
        if backward and r < P - 1:
            chunk_cp_merge(h=h_buf, ag_hm=ag, num_ranks=P - 1 - r, rank=r, forward=False)
        fla_plain(x, ours.scale, backward, h0=ours.h0[r], dht=dht if backward else None)
    return run


def run_config(shape_name, T, P, args, baseline_cache, device):
    s = SHAPES[shape_name]
    H, HV, K, V = s["H"], s["HV"], s["K"], s["V"]
    scale = K ** -0.5
    x = make_inputs(T, H, HV, K, V, device)
    key = (shape_name, T)
    if key not in baseline_cache:
        o_ref = fla_plain(x, scale, backward=False)
        baseline_cache[key] = (o_ref, {m: bench(lambda m=m: fla_plain(x, scale, backward=m == "fwd+bwd"), args.rep)
                                       for m in args.modes})
    o_ref, t_full = baseline_cache[key]
    ours = OursRanks(x, P, scale)
    n = T // P
    err = max(rel(ours.fwd(r)[0], o_ref[:, r * n:(r + 1) * n]) for r in rank_roles(P))
    fwd_bytes, bwd_bytes = collective_bytes(P, HV, K, V)
    rows = []
    for mode in args.modes:
        backward = mode == "fwd+bwd"
        t_rank, t_share, t_fla = 0.0, 0.0, 0.0
        for r in rank_roles(P):
            t = bench((lambda r=r: (ours.fwd(r), ours.bwd(r))) if backward else (lambda r=r: ours.fwd(r)), args.rep)
            prep_f = ours.be.prepare(*ours.shards[r], ours.cu, scale)
            sh = bench(lambda r=r: ours.share_fwd(r, prep_f), args.rep)
            if backward:
                prep_b = ours.be.prepare(*ours.shards[r], ours.cu, scale, for_backward=True)
                sh += bench(lambda r=r: ours.share_bwd(r, prep_b), args.rep)
            if t > t_rank:
                t_rank, t_share = t, sh
            if t_fla is not None:
                try:
                    t_fla = max(t_fla, bench(fla_cp_rank(ours, r, backward), args.rep))
                except Exception as e:  # noqa: BLE001 - FLA's CP kernels may not run for a shape
                    print(f"  FLA CP n/a for {shape_name} T={T} P={P}: {type(e).__name__}: {e}", file=sys.stderr)
                    t_fla = None
        rows.append(Row(shape_name, T, P, mode, t_full[mode], t_rank, t_share, t_fla,
                        fwd_bytes + (bwd_bytes if backward else 0), args.bw, err))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--T", type=ints, default=[8192, 32768, 131072], help="global lengths (comma list)")
    p.add_argument("--P", type=ints, default=[1, 2, 4, 8], help="CP sizes (comma list)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES), help=f"of {list(SHAPES)}")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"])
    p.add_argument("--bw", type=float, default=300.0, help="modelled all-gather bandwidth, GB/s")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time per measurement, ms")
    args = p.parse_args(argv)
    bad = [s for s in args.shapes if s not in SHAPES] + [m for m in args.modes if m not in ("fwd", "fwd+bwd")]
    if bad:
        p.error(f"unknown shapes/modes: {bad}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_op.py needs a CUDA GPU (FLA's chunk kernels); see --help")
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
            torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
