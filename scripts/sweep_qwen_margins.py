"""Error distributions of the Qwen model CP test over many seeds: how much room its bounds have.

For every seed s (weights `WEIGHT_SEED = s`, data `DATA_SEED = 1000 s`) and P, the cases of
`tests/cp/models/test_qwen_models.py` run as the test runs them: transformers' own model in this process
(fp32) is the reference, our CP model runs on P gloo ranks (the three families in one spawn), both
layouts, every rank. Per seed, family and quantity it records the worst relative error, against the
test's bound:
    loss, logits          training cases (dense, left-padded, packed) x layouts x ranks      TOL
    grads (non-decay)     every other parameter                                               TOL
    grads A_log, dt_bias  the decay's parameters (A_log, dt_bias, in_proj_a: DECAY_PARAMS)    TOL_DECAY
    grads router          the MoE routers' weights (ROUTER_PARAMS)                            TOL_ROUTER
    continuation          cache prefill + continuation + decode logits, 3 cases x ranks       TOL
    generate              greedy tokens equal transformers' (count of mismatching seeds)
With --fp64, transformers' model run in float64 (its modeling module with every fp32 cast made fp64,
`fp64_twin`) is a yardstick for the gradients: it prints transformers' fp32 and CP's fp32 error against
it (the decay bound's premise: CP only reorders sums whose fp32 rounding transformers shares). P=1 runs
our model in this process (the test's one-process case).

    python scripts/sweep_qwen_margins.py --seeds 10 --P 2 [--fp64] [--json runs/margins/qwen.json]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import re
import sys
import time
import types
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "cp")]
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")

import torch  # noqa: E402

from _interpret import enable_test_patches  # noqa: E402
from tests.cp._dist import run_ranks  # noqa: E402
from tests.cp.models import test_qwen_models as qt  # noqa: E402

QUANTITIES = ("loss", "logits", "grads (non-decay)", "grads A_log, dt_bias", "grads router", "continuation")
BOUNDS = {"loss": qt.TOL, "logits": qt.TOL, "grads (non-decay)": qt.TOL, "grads A_log, dt_bias": qt.TOL_DECAY,
          "grads router": qt.TOL_ROUTER, "continuation": qt.TOL}


def set_seed(seed: int) -> None:
    qt.WEIGHT_SEED, qt.DATA_SEED = seed, 1000 * seed


def _ranks_worker(rank, world, seed, states):
    set_seed(seed)          # a spawned rank re-imports the test module: its seeds come as arguments
    return {family: qt._worker(rank, world, family, state) for family, state in states.items()}


def references(families):
    """The test's fixture, per family: (state, refs) of transformers' model (fp32, this process)."""
    out = {}
    for family in families:
        model = qt.reference_model(family).train()
        refs = {"train": qt.reference_training(model)}
        model.config.output_router_logits = False
        model.eval()
        for case in qt.CONTINUATIONS:
            refs[("continuation", case[0])] = qt.continuation(model, case, cp=False)
        refs["generate"] = qt.greedy(model)
        out[family] = (model, model.state_dict(), refs)
    return out


def fp64_twin(name):
    """A twin of the module `name` with every fp32 cast made fp64 (`torch.float32`, `torch.float`,
    `.float()`). For transformers' modeling modules: their CPU fallbacks (chunked GDN, norms, softmax,
    router, aux loss) run in float64; for its loss module: the cross entropy. Our own model at cp_size=1
    is no float64 yardstick: its GDN operator computes in fp32 whatever the input dtype (as transformers'
    unmodified fallback does)."""
    if name + "_fp64" not in sys.modules:
        original = importlib.import_module(name)
        src = inspect.getsource(original)
        src = re.sub(r"torch\.float(32)?\b", "torch.float64", src).replace(".float()", ".double()")
        module = types.ModuleType(name + "_fp64")
        module.__package__, module.__file__ = original.__package__, original.__file__
        sys.modules[module.__name__] = module
        exec(compile(src, original.__file__ + " (fp64)", "exec"), module.__dict__)
    return sys.modules[name + "_fp64"]


def fp64_yardstick(family, state):
    """transformers' model in float64 (`fp64_twin` of its modeling module and of its loss), the same
    weights: the test's training cases."""
    config = copy.deepcopy(qt.config_of(family))
    config._experts_implementation = "eager"        # transformers' grouped_mm takes no float64
    modeling = fp64_twin(f"transformers.models.{family}.modeling_{family}")
    model = getattr(modeling, qt.classes(family)[1].__name__)(config).double()
    model.load_state_dict(state)
    model.loss_function = fp64_twin("transformers.loss.loss_utils").ForCausalLMLoss
    # the packed case pools the MoE aux loss through qwen3_next's function: its fp64 twin meanwhile
    owner = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")
    saved = owner.load_balancing_loss_func
    owner.load_balancing_loss_func = fp64_twin(owner.__name__).load_balancing_loss_func
    try:
        return {"train": qt.reference_training(model.train())}
    finally:
        owner.load_balancing_loss_func = saved


def is_decay(name: str) -> bool:
    return name.endswith(qt.DECAY_PARAMS)


def training_errors(got, ref):
    """{quantity: (worst error, where)} of one training case."""
    loss, logits, grads = got
    rloss, rlogits, rgrads = ref
    assert set(grads) == set(rgrads), set(grads) ^ set(rgrads)
    err = {"loss": (qt.rel_err(loss, rloss), ""), "logits": (qt.rel_err(logits, rlogits), "")}
    for n, rg in rgrads.items():
        q = "grads A_log, dt_bias" if is_decay(n) else \
            "grads router" if n.endswith(qt.ROUTER_PARAMS) else "grads (non-decay)"
        e = qt.rel_err(grads[n], rg)
        if e > err.get(q, (-1.0, ""))[0]:
            err[q] = (e, n)
    return err


def top2_gap(model, seq, mask, start):
    """Smallest (top-1 - top-2) logit gap, and where, of transformers' model over the generated positions."""
    full = torch.cat([mask, torch.ones(mask.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(seq, attention_mask=full, use_cache=False).logits
    top = logits[:, start - 1:-1].topk(2, -1).values
    gap = top[..., 0] - top[..., 1]
    i = int(gap.argmin())
    return gap.min().item(), divmod(i, gap.shape[1])


def evaluate(P, seed, families, refs, ranks, yard):
    """Rows of one (P, seed): one per family, quantity (worst over layouts, cases, ranks)."""
    rows = []
    for family in families:
        model, _, ref = refs[family]
        worst = {}

        def note(q, e, where):
            if e > worst.get(q, (-1.0, ""))[0]:
                worst[q] = (e, where)

        for rank, res in enumerate(ranks):
            res = res[family]
            for layout in ("contiguous", "zigzag"):
                for case in ("dense", "padded", "packed"):
                    for q, (e, n) in training_errors(res[("train", layout)][case], ref["train"][case]).items():
                        note(q, e, f"{layout}/{case}/rank{rank} {n}".rstrip())
            for case in qt.CONTINUATIONS:
                key = ("continuation", case[0])
                note("continuation", qt.rel_err(res[key], ref[key]), f"{case[0]}/rank{rank}")
        for q, (e, where) in worst.items():
            rows.append(dict(P=P, seed=seed, family=family, quantity=q, err=e, where=where))
        # greedy tokens: equal on every rank? and how close transformers' own argmax came to a tie
        ids = ref["generate"]
        mism = [r for r, res in enumerate(ranks) if not torch.equal(res[family]["generate"], ids)]
        gen = qt.ids_of(2, 11, seed=4)
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[0, :3] = 0
        gap, (row, step) = top2_gap(model, ids, mask, gen.shape[1])
        rows.append(dict(P=P, seed=seed, family=family, quantity="generate", err=float(len(mism)),
                         where=f"ranks {mism}" if mism else "", min_gap=gap, gap_at=[row, step],
                         tokens=[ranks[r][family]["generate"].tolist() for r in mism], ref_tokens=ids.tolist()))
        if yard is not None:
            y = yard[family]
            for case in ("dense", "padded", "packed"):
                _, _, g64 = y["train"][case]
                _, _, gtf = ref["train"][case]
                for rank, res in enumerate(ranks):
                    for layout in ("contiguous", "zigzag"):
                        _, _, gcp = res[family][("train", layout)][case]
                        for n, g in g64.items():
                            rows.append(dict(P=P, seed=seed, family=family, quantity="fp64", param=n,
                                             decay=is_decay(n), case=case, layout=layout, rank=rank,
                                             tf_vs_64=qt.rel_err(gtf[n], g), cp_vs_64=qt.rel_err(gcp[n], g),
                                             cp_vs_tf=qt.rel_err(gcp[n], gtf[n])))
    return rows


def run(P, seed, families, fp64):
    set_seed(seed)
    refs = references(families)
    states = {f: refs[f][1] for f in families}
    yard = {f: fp64_yardstick(f, states[f]) for f in families} if fp64 else None
    if P == 1:
        ranks = [_ranks_worker(0, 1, seed, states)]
    else:
        ranks = run_ranks(_ranks_worker, P, args=(seed, states), timeout=1800)
    return evaluate(P, seed, families, refs, ranks, yard)


def margin(bound, err):
    return bound / err if err > 0 else float("inf")


def table(rows, families):
    short = {"qwen3_5": "qwen3_5", "qwen3_next": "qwen3_next", "qwen3_5_moe": "qwen3_5_moe"}
    for P in sorted({r["P"] for r in rows}):
        sel = [r for r in rows if r["P"] == P and r["quantity"] != "fp64"]
        seeds = sorted({r["seed"] for r in sel})
        print(f"\nP={P}, {len(seeds)} seeds {seeds}: worst relative error over seeds (layouts, cases, ranks); "
              f"bound / worst")
        print(f"{'quantity':<22} {'bound':>7} | " + " | ".join(f"{short[f]:>20}" for f in families)
              + f" | {'all: worst':>10} {'margin':>7}")
        for q in QUANTITIES:
            cells, allmax = [], 0.0
            for f in families:
                errs = [r["err"] for r in sel if r["family"] == f and r["quantity"] == q]
                m = max(errs) if errs else float("nan")
                allmax = max(allmax, m)
                cells.append(f"{m:8.1e} ({margin(BOUNDS[q], m):6.1f}x)")
            print(f"{q:<22} {BOUNDS[q]:7.0e} | " + " | ".join(f"{c:>20}" for c in cells)
                  + f" | {allmax:10.1e} {margin(BOUNDS[q], allmax):6.1f}x")
        cells = []
        for f in families:
            g = [r for r in sel if r["family"] == f and r["quantity"] == "generate"]
            bad = sum(r["err"] > 0 for r in g)
            cells.append(f"{bad}/{len(g)} differ, gap>={min(r['min_gap'] for r in g):.1e}")
        print(f"{'generate (tokens)':<22} {'exact':>7} | " + " | ".join(f"{c:>20}" for c in cells))
        for r in sel:
            if r["quantity"] == "generate" and r["err"] > 0:
                print(f"  generate differs: seed {r['seed']} {r['family']} {r['where']}: ref {r['ref_tokens']} "
                      f"got {r['tokens']} (smallest top-2 logit gap of transformers {r['min_gap']:.2e} at "
                      f"row/step {r['gap_at']})")
        print("worst cases:")
        for q in QUANTITIES:
            r = max((r for r in sel if r["quantity"] == q), key=lambda r: r["err"])
            print(f"  {q:<22} {r['err']:.2e}  seed {r['seed']} {r['family']} {r['where']}")
        fp = [r for r in rows if r["P"] == P and r["quantity"] == "fp64"]
        if fp:
            print("gradients vs transformers' model in float64 (worst over seeds, cases, layouts, ranks):")
            print(f"{'':<22} {'tf32 vs 64':>11} {'cp32 vs 64':>11} {'cp vs tf':>9} | worst parameter (cp vs tf)")
            for label, dec in (("grads (non-decay)", False), ("grads A_log, dt_bias", True)):
                s = [r for r in fp if r["decay"] == dec]
                w = max(s, key=lambda r: r["cp_vs_tf"])
                print(f"{label:<22} {max(r['tf_vs_64'] for r in s):11.1e} {max(r['cp_vs_64'] for r in s):11.1e} "
                      f"{w['cp_vs_tf']:9.1e} | {w['family']} {w['param']} seed {w['seed']} {w['case']} "
                      f"(tf {w['tf_vs_64']:.1e}, cp {w['cp_vs_64']:.1e} vs fp64)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per P: first, first + 1, ...")
    ap.add_argument("--first", type=int, default=1, help="first seed (0 is the test's own)")
    ap.add_argument("--P", type=int, nargs="+", default=[2])
    ap.add_argument("--families", nargs="+", default=list(qt.FAMILIES), choices=qt.FAMILIES)
    ap.add_argument("--fp64", action="store_true", help="also compare gradients with transformers' in float64")
    ap.add_argument("--json", default=None, help="also write every row here (appended to, per seed)")
    args = ap.parse_args()
    enable_test_patches()
    torch.set_num_threads(1)
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = json.load(f)
    done = {(r["P"], r["seed"]) for r in rows}
    for P in args.P:
        for seed in range(args.first, args.first + args.seeds):
            if (P, seed) in done:
                continue
            t0 = time.time()
            new = run(P, seed, args.families, args.fp64)
            rows += new
            bad = [f"{r['family']} {r['quantity']} {r['err']:.1e}" for r in new
                   if r["quantity"] in BOUNDS and r["err"] > BOUNDS[r["quantity"]]
                   or r["quantity"] == "generate" and r["err"] > 0]
            print(f"P={P} seed {seed}: {time.time() - t0:.0f}s" + (f"  OVER BOUND: {bad}" if bad else ""), flush=True)
            if args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump(rows, f)
    table(rows, args.families)
    return 0


if __name__ == "__main__":
    sys.exit(main())
