"""Communication of one softmax-attention layer under CP, full vs windowed, counted from the collectives.

    python scripts/bench_attention_comm.py                        # P = 2, 4; T = 1K..16K; W = 128, 512
    python scripts/bench_attention_comm.py --P 2 --T 1024 --W 64  # one small size (what the test runs)

For each P (a fresh group of P gloo ranks on this machine) and each (T, W), every rank runs
`fla_cp.ops.attention_cp` forward and backward on its shard of random q, k, v `[B, T/P, H, D]` (small heads:
the volumes are per element, the head sizes only scale them) while every `torch.distributed` collective
is wrapped: each call's tensor sizes are recorded, per phase. Nothing else runs inside the counted region
(`verify_agreement=False` for the op and the context: the agreement check is one tiny all_gather of a few
integers, not data).

Per-rank volume of a collective, in elements, as the ring algorithms of NCCL and gloo move them (the
convention of nccl-tests' bus bandwidth): all_gather of n elements per rank, and reduce-scatter to n
elements per rank, send and receive (P-1)*n each; all_reduce of N sends and receives 2(P-1)/P*N. So
"sent" and "received" are equal for the collectives attention uses; both are printed.

Expected (C = Hkv*(D+Dv) = 2*Hkv*D elements per token, parts = 1 contiguous / 2 zigzag):
  full (window_size=None): forward all-gathers K/V: (P-1)/P * B*T*C, the brief's (P-1)/P x 2*B*T*Hkv*D;
      backward re-gathers K/V and reduce-scatters dK/dV: twice that.
  windowed (W): forward all-gathers every part's last H = min(W-1, T-1) K/V rows:
      (P-1)*parts*H*B*C; backward re-gathers them and reduce-scatters their gradient: twice that.
      Proportional to W, independent of T. When that would be at least the whole stream's
      (P*parts*H >= T: windows wider than the parts) the op gathers all K/V instead, as full attention:
      never more than full attention. The minimum is one predecessor's halo per part, H*B*C;
      the layout's constant is (P-1)*parts: the gather hands every rank every part's tail (one collective,
      no neighbour bookkeeping), although a part whose predecessor is at least H long reads only one.
Checks (exit 1 if any fails): full == its formula exactly (T is a multiple of P, resp. 2P for zigzag, so
all_gather_varlen pads nothing; a length that is not would add up to the padding rows, and is refused);
windowed == (P-1)*parts*H*B*C exactly, i.e. at most (P-1)*parts times the minimum, and the same for every
T >= W at given P and W; backward == 2 x forward; no collective other than all_gather / reduce-scatter.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import queue
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("fla_cp") is None:                 # not installed, no PYTHONPATH: this checkout
    sys.path.append(ROOT)                                      # (fla_cp is imported where it is used)

# collectives the recorder understands -> how the per-rank count n is read from (args, kwargs)
_GATHERS = ("all_gather", "all_gather_into_tensor")
_SCATTERS = ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single")
_OTHERS = ("all_reduce", "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
           "reduce", "gather", "scatter", "barrier", "all_gather_object", "broadcast_object_list")


def _arg(args, kwargs, i, name):
    return kwargs[name] if name in kwargs else args[i]


class CommRecorder:
    """Wraps the collectives of `torch.distributed` (and `distributed_c10d`) while active; records
    (phase, name, sent, received) per call, outermost calls only."""

    def __init__(self):
        self.calls: list[tuple[str, str, int, int]] = []
        self.phase = None
        self._depth = 0

    def _volume(self, name, args, kwargs) -> tuple[int, int]:
        group = kwargs.get("group")
        P = dist.get_world_size(group)
        if name == "all_gather":                       # (tensor_list, tensor)
            n = _arg(args, kwargs, 1, "tensor").numel()
        elif name == "all_gather_into_tensor":         # (output, input)
            n = _arg(args, kwargs, 1, "input_tensor").numel()
        elif name in _SCATTERS:                        # (output, input / input_list)
            n = _arg(args, kwargs, 0, "output").numel()
        elif name == "all_reduce":
            n = _arg(args, kwargs, 0, "tensor").numel()
            return 2 * (P - 1) * n // P, 2 * (P - 1) * n // P
        else:
            return -1, -1                              # not expected here: flagged by the checks
        return (P - 1) * n, (P - 1) * n

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth == 0:
                sent, recv = self._volume(name, args, kwargs)
                self.calls.append((self.phase, name, sent, recv))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapper

    @contextlib.contextmanager
    def active(self):
        import torch.distributed.distributed_c10d as c10d
        saved = []
        for mod in (dist, c10d):
            for name in _GATHERS + _SCATTERS + _OTHERS:
                fn = getattr(mod, name, None)
                if fn is not None:
                    saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(name, fn))
        try:
            yield self
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def totals(self, phase: str) -> dict:
        calls = [c for c in self.calls if c[0] == phase]
        return {"sent": sum(c[2] for c in calls), "recv": sum(c[3] for c in calls),
                "calls": [c[1] for c in calls]}


def _rank_main(rank, world, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        import traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, args: tuple, timeout: float) -> list:
    """`fn(rank, world, *args)` on `world` gloo ranks on this machine; the results by rank. Forked where the
    platform can (the ranks inherit the imported torch and fla_cp: no 10 s import per rank on a small
    machine; each rank runs on one thread, as DataLoader workers do), spawned where it cannot or where this
    process holds a process group of its own."""
    from fla_cp.utils.dist import free_port
    fork = "fork" in mp.get_all_start_methods() and not dist.is_initialized()
    ctx = mp.get_context("fork" if fork else "spawn")
    inbox, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, inbox), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, status, payload = inbox.get(timeout=timeout)
            (results if status == "ok" else errors)[rank] = payload
            if errors:
                break                                  # the others may wait forever on a collective
    except queue.Empty as e:                           # a rank hung
        raise TimeoutError(f"ranks did not finish within {timeout:.0f}s") from e
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(f"rank {min(errors)} failed:\n{errors[min(errors)]}")
    return [results[r] for r in range(world)]


def worker(rank, world, cases, B, H, Hkv, D, layout, backend):
    """Every case on this rank: {(T, W): {"fwd": totals, "bwd": totals}}."""
    from fla_cp.ops import attention_cp, build_cp_context
    torch.set_num_threads(1)
    out = {}
    for T, W in cases:
        cp = build_cp_context(seq_len=T, layout=layout, verify_agreement=False)
        g = torch.Generator().manual_seed(T * 7919 + (W or 0))
        q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv))
        q, k, v = (cp.shard(x, dim=1).requires_grad_() for x in (q, k, v))
        rec = CommRecorder()
        with rec.active():
            with rec.in_phase("fwd"):
                o = attention_cp(q, k, v, cp, causal=True, window_size=W, backend=backend, verify_agreement=False)
            with rec.in_phase("bwd"):
                o.sum().backward()
        out[(T, W)] = {"fwd": rec.totals("fwd"), "bwd": rec.totals("bwd"), "local_len": cp.local_len}
    return out


def expected(P: int, T: int, W: int | None, B: int, Hkv: int, D: int, parts: int) -> tuple[int, int]:
    """(forward elements each way per rank, the minimum a windowed layer needs); see the docstring."""
    C = 2 * Hkv * D
    full = (P - 1) * (B * T * C) // P
    if W is None:
        return full, full
    halo = min(W - 1, T - 1)
    if P * parts * halo >= T:       # the halo gather would move as much as the whole stream: attention_cp
        return full, halo * B * C   # gathers all K/V instead (fla_cp/ops/attention.py: _gathers_all)
    return (P - 1) * parts * halo * B * C, halo * B * C


def fmt(n: int) -> str:
    return f"{n:,}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--P", default="2,4", help="comma-separated CP sizes (gloo ranks on this machine)")
    ap.add_argument("--T", default="1024,2048,4096,8192,16384", help="comma-separated global lengths")
    ap.add_argument("--W", default="128,512", help="comma-separated windows (full attention always runs)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=2, help="query heads")
    ap.add_argument("--Hkv", type=int, default=1, help="key/value heads")
    ap.add_argument("--D", type=int, default=8, help="head dim (D = Dv)")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    ap.add_argument("--backend", default="sdpa", choices=["torch", "sdpa"],
                    help="the local kernel (sdpa: no [n, m] score tensors on CPU; the traffic does not depend on it)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per P")
    args = ap.parse_args(argv)
    try:
        Ps = [int(x) for x in args.P.split(",")]
        Ts = [int(x) for x in args.T.split(",")]
        Ws = [int(x) for x in args.W.split(",")] if args.W else []
    except ValueError:
        ap.error("--P, --T and --W take comma-separated integers")
    parts = 2 if args.layout == "zigzag" else 1
    if min(Ps) < 2 or min(Ts) < 1 or (Ws and min(Ws) < 1) or min(args.B, args.H, args.Hkv, args.D) < 1 \
            or args.H % args.Hkv:
        ap.error("need P >= 2, T, W, B, H, Hkv, D >= 1 and H a multiple of Hkv")
    bad = [(P, T) for P in Ps for T in Ts if T % (P * parts)]
    if bad:
        ap.error(f"T must be a multiple of P x parts ({parts}) so that no rank's share is padded: {bad}")

    import fla_cp.ops  # noqa: F401  (imported once, before the ranks fork)
    cases = [(T, W) for T in Ts for W in [None, *Ws]]
    rows, failures = [], []
    t0 = time.time()
    for P in Ps:
        results = run_ranks(worker, P, args=(cases, args.B, args.H, args.Hkv, args.D, args.layout, args.backend),
                            timeout=args.timeout)
        for T, W in cases:
            per_rank = [r[(T, W)] for r in results]
            fwd = {k: max(r["fwd"][k] for r in per_rank) for k in ("sent", "recv")}
            bwd = {k: max(r["bwd"][k] for r in per_rank) for k in ("sent", "recv")}
            want, minimum = expected(P, T, W, args.B, args.Hkv, args.D, parts)
            calls = sorted({c for r in per_rank for ph in ("fwd", "bwd") for c in r[ph]["calls"]})
            row = {"P": P, "T": T, "W": W, "fwd": fwd, "bwd": bwd, "want": want, "minimum": minimum, "calls": calls,
                   "fwd_calls": len(per_rank[0]["fwd"]["calls"]), "bwd_calls": len(per_rank[0]["bwd"]["calls"])}
            rows.append(row)
            what = f"P={P} T={T} {'full' if W is None else f'W={W}'}"
            for phase, key, got, factor in (("forward", "fwd", fwd, 1), ("backward", "bwd", bwd, 2)):
                if got["sent"] != factor * want or got["recv"] != factor * want:
                    failures.append(f"{what}: {phase} moved {got['sent']:,} / {got['recv']:,} elements "
                                    f"(sent / received), expected {factor * want:,}")
                moved = [(r[key]["sent"], r[key]["recv"]) for r in per_rank]
                if any(x != moved[0] for x in moved):
                    failures.append(f"{what}: {phase}: the ranks moved different amounts {moved}")
            unexpected = [c for c in calls if c not in _GATHERS + _SCATTERS]
            if unexpected:
                failures.append(f"{what}: unexpected collectives {unexpected}")
            if W is not None and W <= T and fwd["sent"] > (P - 1) * parts * minimum:
                failures.append(f"{what}: windowed forward {fwd['sent']:,} is more than (P-1)*parts = "
                                f"{(P - 1) * parts} x the one-halo minimum {minimum:,}")
    # windowed: the same for every T >= W (independent of T)
    for P in Ps:
        for W in Ws:
            seen = {r["fwd"]["sent"] for r in rows
                    if r["P"] == P and r["W"] == W and r["T"] > P * parts * (W - 1)}   # (halo exchange)
            if len(seen) > 1:
                failures.append(f"P={P} W={W}: windowed forward traffic depends on T: {sorted(seen)}")

    C = 2 * args.Hkv * args.D
    print(f"## Communication per attention layer, per rank (elements; B={args.B}, H={args.H}, Hkv={args.Hkv}, "
          f"D=Dv={args.D}, C = Hkv*(D+Dv) = {C} per token; {args.layout}; gloo, {args.backend} kernel)\n")
    print("sent / received per rank, counted from the collectives' tensor sizes (ring volumes: (P-1) x the "
          "per-rank share of an all_gather / reduce-scatter). Formula, forward: full (P-1)/P x B*T*C; "
          "windowed (P-1) x parts x min(W-1, T-1) x B*C, or full's when that is larger. Backward: 2 x forward "
          "(re-gather + reduce-scatter).\n")
    print("| P | T | attention | forward sent / recv | backward sent / recv | formula fwd / bwd | "
          "fwd / formula | calls fwd + bwd | vs full |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    full = {(r["P"], r["T"]): r["fwd"]["sent"] for r in rows if r["W"] is None}
    for r in rows:
        kind = "full" if r["W"] is None else f"window {r['W']}"
        ratio = r["fwd"]["sent"] / r["want"] if r["want"] else float("nan")
        vs = "1" if r["W"] is None else f"{r['fwd']['sent'] / full[(r['P'], r['T'])]:.3f}"
        print(f"| {r['P']} | {r['T']:,} | {kind} | {fmt(r['fwd']['sent'])} / {fmt(r['fwd']['recv'])} | "
              f"{fmt(r['bwd']['sent'])} / {fmt(r['bwd']['recv'])} | {fmt(r['want'])} / {fmt(2 * r['want'])} | "
              f"{ratio:.3f} | {r['fwd_calls']} + {r['bwd_calls']} | {vs} |")
    print(f"\nAllowed: full, exactly the formula (T is a multiple of P x parts: no padding rows); windowed, exactly "
          f"(P-1) x parts x the one-halo minimum H*B*C (H = min(W-1, T-1)): the all_gather hands every rank every "
          f"part's tail, a constant of the layout, never a function of T; backward exactly 2 x forward. "
          f"({time.time() - t0:.0f} s)")
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("PASS: every measurement equals its formula")
    return 0


if __name__ == "__main__":
    sys.exit(main())
