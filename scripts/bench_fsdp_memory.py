"""Parameter + gradient + AdamW-state memory per rank: replicated vs FSDP2 over the flattened dp x cp mesh.

    python scripts/bench_fsdp_memory.py                                  # small and base, world 4: 1x4, 2x2, 4x1
    python scripts/bench_fsdp_memory.py --model_config tiny --splits 2x2  # what the test runs

For each model preset, a fresh group of `--world` gloo ranks on this machine (CPU) builds the CP model,
runs one real training step (forward + backward of `--seq_len` random tokens, AdamW step) and counts the
bytes it then holds per rank, from the tensors themselves: parameters, gradients and AdamW state
(exp_avg, exp_avg_sq, step), each `numel x element_size` of what this rank stores (a DTensor's
`to_local()` shard under FSDP2). Replicated (`sync_gradients`, what train_cp_real.py does without
--fsdp): every rank holds everything, whatever the dp x cp split, so it is measured once per model.
FSDP2 (`fla_cp.parallel.apply_fsdp2`, train_cp_real.py --fsdp): each dp x cp split of the world; the
table shows the largest rank (FSDP2 shards each parameter on dim 0 and pads it to a multiple of the
world, so the last ranks can hold a little less).

Activations, the all-gathered parameters of the layer being computed and allocator overheads are not
counted: this is the persistent training state that replication multiplies. The ratio FSDP2 /
replicated is ~1/world plus the padding; `--target` (default 0.3, the issue's bound at world 4) is
checked for every row: exit 1 if a row exceeds it.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("fla_cp") is None:                 # not installed, no PYTHONPATH: this checkout
    sys.path.append(ROOT)                                      # (fla_cp is imported where it is used)

VOCAB = 257                                                    # train_cp_real.py's byte tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default="small,base", help="comma-separated presets (fla_cp/utils/configs.py)")
    p.add_argument("--world", type=int, default=4, help="ranks (gloo, this machine)")
    p.add_argument("--splits", default=None,
                   help="comma-separated DPxCP splits of the world, e.g. 1x4,2x2 (default: every split)")
    p.add_argument("--seq_len", type=int, default=64, help="tokens of the one training step")
    p.add_argument("--target", type=float, default=0.3, help="largest FSDP2 / replicated ratio that passes")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.world < 1 or args.seq_len < 1:
        p.error("--world and --seq_len must be >= 1")
    args.splits = parse_splits(p, args.splits, args.world)
    return args


def parse_splits(p, text: str | None, world: int) -> list[tuple[int, int]]:
    """[(dp, cp)] from "1x4,2x2"; default: every (world / cp, cp) with cp dividing the world."""
    if text is None:
        return [(world // cp, cp) for cp in range(world, 0, -1) if world % cp == 0]
    splits = []
    for item in text.split(","):
        try:
            dp, cp = (int(x) for x in item.lower().split("x"))
        except ValueError:
            p.error(f"--splits: {item!r} is not DPxCP")
        if dp * cp != world or dp < 1:
            p.error(f"--splits: {item} is not a split of the world ({world} ranks)")
        splits.append((dp, cp))
    return splits


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for `t`: its local shard for a DTensor."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(model, optimizer) -> dict:
    """{"params", "grads", "adamw", "param_elems"}: what this rank holds after a step (bytes; local elements)."""
    params = list(model.parameters())
    adamw = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": sum(local_bytes(p) for p in params),
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "adamw": adamw,
            "param_elems": sum(local_bytes(p) // p.element_size() for p in params)}


def one_step(preset: str, cp_size: int, fsdp: bool, seq_len: int) -> dict:
    """Build the model over a ("dp", "cp") mesh of `cp_size`, train one AdamW step, count this rank's state."""
    from fla_cp.models import init_cp_mesh, sync_gradients
    from fla_cp.parallel import apply_fsdp2
    from fla_cp.utils.configs import build_config, causal_lm_class

    mesh = init_cp_mesh(cp_size, device_type="cpu")
    torch.manual_seed(0)                       # the same weights on every rank (FSDP2 shards the local copy)
    config = build_config(preset, VOCAB, cp_size=cp_size)          # FLA's GatedDeltaNet or a Qwen preset
    model = causal_lm_class(config)(config, device_mesh=mesh)
    n_params = sum(p.numel() for p in model.parameters())
    if fsdp:
        apply_fsdp2(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    if not fsdp:
        sync_gradients(model)
    opt.step()
    row = {**state_bytes(model, opt), "n_params": n_params}
    del model, opt
    gc.collect()
    return row


def worker(rank, world, presets, splits, seq_len):
    """{(preset, "replicated" | (dp, cp)): this rank's counts}."""
    torch.set_num_threads(1)
    out = {}
    for preset in presets:
        out[(preset, "replicated")] = one_step(preset, splits[0][1], False, seq_len)
        for dp, cp in splits:
            out[(preset, (dp, cp))] = one_step(preset, cp, True, seq_len)
    return out


def rows_from(ranks: list[dict], presets, splits, world: int) -> list[dict]:
    """One row per (preset, split): replicated bytes per rank, FSDP2 bytes of the largest rank, their ratio."""
    rows = []
    for preset in presets:
        rep = ranks[0][(preset, "replicated")]
        rep_total = rep["params"] + rep["grads"] + rep["adamw"]
        for dp, cp in splits:
            per_rank = [r[(preset, (dp, cp))] for r in ranks]
            totals = [c["params"] + c["grads"] + c["adamw"] for c in per_rank]
            big = per_rank[totals.index(max(totals))]
            rows.append({"model": preset, "params": rep["n_params"], "world": world, "dp": dp, "cp": cp,
                         "replicated": {k: rep[k] for k in ("params", "grads", "adamw")},
                         "replicated_total": rep_total,
                         "fsdp2": {k: big[k] for k in ("params", "grads", "adamw")},
                         "fsdp2_total": max(totals), "fsdp2_total_per_rank": totals,
                         # every parameter element is stored exactly once over the ranks (no loss, no copy)
                         "fsdp2_param_elems_sum": sum(c["param_elems"] for c in per_rank),
                         "ratio": max(totals) / rep_total})
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def print_table(rows: list[dict], target: float) -> None:
    print(f"Parameters + gradients + AdamW state per rank (MiB, fp32), after one step; FSDP2: the largest rank. "
          f"Target: FSDP2 / replicated <= {target}")
    w = max(7, *(len(r["model"]) for r in rows))          # the longest preset name
    head = (f"{'model':<{w}} | {'params':>11} | dp x cp | {'replicated: P + G + AdamW = total':>40} | "
            f"{'FSDP2: P + G + AdamW = total':>36} | ratio")
    print(head)
    print("-" * len(head))
    for r in rows:
        rep, fs = r["replicated"], r["fsdp2"]
        rep_cells = f"{mib(rep['params'])} + {mib(rep['grads'])} + {mib(rep['adamw'])} = {mib(r['replicated_total'])}"
        fs_cells = f"{mib(fs['params'])} + {mib(fs['grads'])} + {mib(fs['adamw'])} = {mib(r['fsdp2_total'])}"
        verdict = "" if r["ratio"] <= target else "  FAIL"
        print(f"{r['model']:<{w}} | {r['params']:>11,} | {r['dp']} x {r['cp']:<3} | {rep_cells:>40} | {fs_cells:>36} | "
              f"{r['ratio']:.3f}{verdict}")


def main(argv=None) -> int:
    args = get_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # the sibling script, however this one runs
    from bench_attention_comm import run_ranks                         # (a fork runner: ranks inherit the imports)
    presets = args.model_config.split(",")
    ranks = run_ranks(worker, args.world, (presets, args.splits, args.seq_len), timeout=args.timeout)
    rows = rows_from(ranks, presets, args.splits, args.world)
    print_table(rows, args.target)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["ratio"] > args.target]
    if bad:
        print(f"FAIL: {len(bad)} row(s) above the target {args.target}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
