"""Error distributions of the layer's CP test over many fresh seeds: how much room its bounds have.

For every seed, P and case of `tests/cp/layers/test_layer_cp.py` (5 kinds x 2 layouts), the layer runs
with CP on P gloo ranks and in one process, and an independent float64 composition of its math
(`layer_reference_fp64`) gives the truth. Per quantity (output, input gradient, each parameter
gradient) it records
    cp_vs_single   rel. error of CP against one process (what the test's TOL bounds for o and dx)
    single_vs_64   one process's own fp32 error against float64
    cp_vs_64       CP's fp32 error against float64
and prints, per P and quantity class, the median / 99th percentile / worst of each and of the ratio
cp_vs_64 / max(single_vs_64, floor) that the parameter-gradient assertion bounds (by `ratio` of
GRAD_BOUNDS / GRAD_BOUND in the test; the column is meaningless for output and input grad).

    python scripts/sweep_margins.py --seeds 50 --P 1 2 3 4 [--json runs/margins/layer.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "cp")]


from tests.cp.layers import test_layer_cp as lt  # noqa: E402
from tests.cp._dist import run_ranks  # noqa: E402


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def sweep(P: int, seeds: list[int]) -> list[dict]:
    specs = [(kind, layout, seed) for seed in seeds for layout in ("contiguous", "zigzag") for kind in lt.KINDS]
    overrides = lt.layer_overrides(P)
    got = lt._cp_worker(0, 1, specs, overrides) if P == 1 else \
        run_ranks(lt._cp_worker, P, args=(specs, overrides), timeout=3600)[0]
    rows = []
    for (kind, layout, seed), (o, dx, grads) in zip(specs, got):
        case = lt.make_case(kind, P, layout, seed)
        layer = lt.make_layer(seed, **overrides)
        single = lt.layer_reference(layer, case)
        truth = lt.layer_reference_fp64(layer, case)
        cp = (o, dx, grads)
        for name, pick in [("output", lambda r: r[0]), ("input grad", lambda r: r[1])] + \
                [(f"grad {n}", (lambda n: lambda r: r[2][n])(n)) for n in grads]:
            rows.append(dict(P=P, kind=kind, layout=layout, seed=seed, quantity=name,
                             cp_vs_single=lt.rel_err(pick(cp), pick(single)),
                             single_vs_64=lt.rel_err(pick(single), pick(truth)),
                             cp_vs_64=lt.rel_err(pick(cp), pick(truth))))
    return rows


def bound(quantity: str) -> tuple[float, float]:
    """(ratio, floor) of the test's parameter-gradient bound; outputs are bounded by TOL instead."""
    name = quantity.removeprefix("grad ")
    return lt.GRAD_BOUNDS.get(name, lt.GRAD_BOUND)


def table(rows: list[dict]) -> None:
    def cls(q):
        return q if q in ("output", "input grad") else ("grad A_log, dt_bias" if q in ("grad A_log", "grad dt_bias")
                                                        else "other parameter grads")
    print(f"{'P':>2} {'quantity':<22} {'n':>5} | {'cp_vs_single  med / p99 / max':>32} | "
          f"{'single_vs_64 med / max':>24} | {'cp_vs_64 med / max':>22} | {'ratio p99 / max':>16}")
    for P in sorted({r["P"] for r in rows}):
        for c in ("output", "input grad", "grad A_log, dt_bias", "other parameter grads"):
            sel = [r for r in rows if r["P"] == P and cls(r["quantity"]) == c]
            if not sel:
                continue
            d = [r["cp_vs_single"] for r in sel]
            s = [r["single_vs_64"] for r in sel]
            c64 = [r["cp_vs_64"] for r in sel]
            ratio = [r["cp_vs_64"] / max(r["single_vs_64"], bound(r["quantity"])[1]) for r in sel]
            print(f"{P:>2} {c:<22} {len(sel):>5} | {quantile(d, .5):9.1e} / {quantile(d, .99):8.1e} / {max(d):8.1e} | "
                  f"{quantile(s, .5):10.1e} / {max(s):8.1e} | {quantile(c64, .5):9.1e} / {max(c64):8.1e} | "
                  f"{quantile(ratio, .99):6.2f} / {max(ratio):6.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=50, help="fresh seeds per P")
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--json", default=None, help="also write every row here")
    args = ap.parse_args()
    rows = []
    for P in args.P:
        seeds = [random.randrange(2**31 - 1) for _ in range(args.seeds)]
        t0 = time.time()
        rows += sweep(P, seeds)
        print(f"P={P}: {args.seeds} seeds x {2 * len(lt.KINDS)} cases in {time.time() - t0:.0f}s", flush=True)
    table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
