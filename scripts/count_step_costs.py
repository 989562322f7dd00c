"""Collectives and host syncs of one CP training step, per setting: step 1 (first call) and a steady step.

A tiny GatedDeltaNetCPForCausalLM (vocab 128, 2 layers) trains on P gloo ranks (CPU) for a few steps
(forward with labels, backward, `fla_cp.models.sync_gradients`, AdamW step) in four settings:

    dense     B=2, T=64, contiguous layout
    qwen3_5   B=2, T=64, contiguous, transformers' Qwen3.5 under CP (preset qwen3_5-tiny, vocab 128)
    masked    B=2, T=64, right-padded attention_mask (labels -100 at pads), other pad lengths each step
    packed    B=1, T=128, cu_seqlens with documents crossing the rank boundaries, new boundaries each step
    zigzag    B=2, T=64, zigzag layout

Each step runs inside `tests/cp/_counting.count_costs` (read its docstring for what counts, and for the
device-data / host-data rule). The step's inputs (input_ids, labels, attention_mask, cu_seqlens) and
the model count as device data, as in a GPU run where the batch is moved to the GPU (as
tests/cp/train_cp_real.py does). For each setting a Markdown table gives, per (kind, name, caller,
phase), the count at step 1 and at step `--steady`; a summary table follows.

    python scripts/count_step_costs.py [--P 2] [--steps 3] [--steady 3] [--json runs/step_costs.json]

The measured fla_cp is whichever `import fla_cp` finds (PYTHONPATH first: point it at a worktree to
measure another commit); its path and commit are printed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "cp"))          # _dist, _counting (this checkout's)
import importlib.util  # noqa: E402

if importlib.util.find_spec("fla_cp") is None:                 # not installed, no PYTHONPATH: this checkout
    sys.path.append(ROOT)

import torch  # noqa: E402

from _counting import count_costs  # noqa: E402
from _dist import run_ranks  # noqa: E402

VOCAB = 128
CONFIG = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
              vocab_size=VOCAB, hidden_ratio=2, norm_eps=1e-6)
SETTINGS = {
    "dense": "B=2, T=64, contiguous",
    "masked": "B=2, T=64, right padding (attention_mask), contiguous",
    "packed": "B=1, T=128, cu_seqlens (documents cross ranks; new boundaries each step), contiguous",
    "zigzag": "B=2, T=64, zigzag",
    "qwen3_5": "B=2, T=64, contiguous; transformers' Qwen3.5 (qwen3_5-tiny: 3 GDN + 1 attention layer)",
}
PHASES = ("forward", "backward", "sync_gradients", "optimizer")
KINDS = [("collectives", "collective"), ("device_syncs", "device sync"), ("host_only_syncs", "host-data sync"),
         ("h2d", "h2d copy"), ("wire", "wire op")]
PLURAL = {"collective": "collectives", "device sync": "device syncs", "host-data sync": "host-data syncs",
          "h2d copy": "h2d copies", "wire op": "wire ops"}


def batch(setting: str, step: int, world: int) -> dict:
    """The global batch of a step: the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    if setting == "packed":
        T = 128
        ids = torch.randint(0, VOCAB, (1, T), generator=g)
        # 4 random cuts, none on a rank boundary, so documents cross ranks (and differ each step)
        bounds = {T * r // (2 * world) for r in range(1, 2 * world)}
        cand = [t for t in range(3, T - 2) if t not in bounds]
        cuts = sorted(cand[i] for i in torch.randperm(len(cand), generator=g)[:4].tolist())
        cu = torch.tensor([0, *cuts, T], dtype=torch.long)
        return dict(input_ids=ids, labels=ids.clone(), cu_seqlens=cu)
    ids = torch.randint(0, VOCAB, (2, 64), generator=g)
    if setting == "masked":
        mask = torch.ones(2, 64, dtype=torch.long)
        mask[0, 64 - (3 + 4 * step):] = 0                        # right padding, other lengths each step
        mask[1, 64 - (11 + 2 * step):] = 0
        return dict(input_ids=ids, labels=ids.masked_fill(mask == 0, -100), attention_mask=mask)
    return dict(input_ids=ids, labels=ids.clone())


def worker(rank, world, settings, steps):
    import fla_cp  # noqa: F401
    from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, sync_gradients
    out = {}
    for setting in settings:
        torch.manual_seed(0)
        layout = "zigzag" if setting == "zigzag" else "contiguous"
        if setting == "qwen3_5":
            from fla_cp.utils.configs import build_config, causal_lm_class
            config = build_config("qwen3_5-tiny", VOCAB, cp_size=world)
            model = causal_lm_class(config)(config).train()
        else:
            model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**CONFIG, cp_size=world, cp_layout=layout))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        per_step = []
        for step in range(1, steps + 1):
            b = batch(setting, step, world)
            opt.zero_grad(set_to_none=True)
            with count_costs(device_data=(model, b)) as c:
                with c.phase("forward"):
                    loss = model(**b).loss
                with c.phase("backward"):
                    loss.backward()
                with c.phase("sync_gradients"):
                    sync_gradients(model)
                with c.phase("optimizer"):
                    opt.step()
            per_step.append(dict(loss=loss.item(), events=[
                dict(kind=e.kind, name=e.name, caller=e.caller, via=e.via, device=e.device, phase=e.phase,
                     site=e.site, chain=list(e.chain)) for e in c.events]))
        out[setting] = per_step
    return out


def rows_of(events: list[dict]) -> collections.Counter:
    """(kind, name, caller, phase) -> count."""
    kinds = {"collective": "collective", "wire": "wire op", "h2d": "h2d copy"}
    n = collections.Counter()
    for e in events:
        kind = kinds.get(e["kind"]) or ("device sync" if e["device"] else "host-data sync")
        caller = e["caller"] + (f" (via {e['via']})" if e["via"] else "")
        n[(kind, e["name"], caller, e["phase"])] += 1
    return n


def totals(events: list[dict]) -> dict:
    r = rows_of(events)
    return {label: sum(v for k, v in r.items() if k[0] == label) for _, label in KINDS}


def table(setting: str, steps: list[dict], first: int, steady: int) -> str:
    a, b = rows_of(steps[first - 1]["events"]), rows_of(steps[steady - 1]["events"])
    order = {label: i for i, (_, label) in enumerate(KINDS)}
    keys = sorted(set(a) | set(b), key=lambda k: (order[k[0]], PHASES.index(k[3]) if k[3] in PHASES else 9,
                                                  k[2], k[1]))
    lines = [f"#### {setting}: {SETTINGS[setting]}", "",
             f"| kind | name | caller | phase | step {first} | step {steady} |", "|---|---|---|---|---:|---:|"]
    ta, tb = totals(steps[first - 1]["events"]), totals(steps[steady - 1]["events"])
    for _, label in KINDS:
        lines.append(f"| **{PLURAL[label]}, total** | | | | **{ta[label]}** | **{tb[label]}** |")
    for k in keys:
        if k[0] == "wire op":
            continue                       # the totals row says it; per caller it repeats the collectives
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {a.get(k, 0)} | {b.get(k, 0)} |")
    return "\n".join(lines)


def package_info() -> str:
    import fla_cp
    d = os.path.dirname(os.path.dirname(os.path.abspath(fla_cp.__file__)))
    try:
        head = subprocess.run(["git", "-C", d, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--", "fla_cp"], capture_output=True,
                               text=True, check=True).stdout.strip()
        head += f" + uncommitted changes in {len(dirty.splitlines())} fla_cp paths" if dirty else " (clean)"
    except (OSError, subprocess.CalledProcessError):
        head = "unknown commit"
    return f"fla_cp from {os.path.dirname(os.path.abspath(fla_cp.__file__))}, commit {head}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--P", type=int, default=2, help="CP ranks (gloo, CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--steady", type=int, default=3, help="the step reported as the steady state")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", default=None, help="also write every step's events and counts here")
    args = ap.parse_args()
    if not 1 <= args.steady <= args.steps:
        ap.error("--steady must be in [1, --steps]")
    t0 = time.time()
    results = run_ranks(worker, args.P, args=(args.settings, args.steps), timeout=600)
    print(f"## Collectives and host syncs per CP training step (P={args.P} gloo ranks, rank 0)\n")
    print(f"{package_info()}; torch {torch.__version__}; tiny model {CONFIG}; AdamW; "
          f"{args.steps} steps per setting.\n")
    print("Counted by tests/cp/_counting.py: *collective* = torch.distributed call (outermost); *device "
          "sync* = a host sync on device data (would block the host on a GPU); *host-data sync* = the same "
          "ops on host-built tensors (no GPU sync, listed so a reader can judge); *h2d copy* = host data copied to "
          "the device (`torch.tensor(list, device=x.device)`, `.to(device)`, host data sent by a collective under "
          "NCCL): on CUDA a blocking copy, `cudaStreamSynchronize` included; *wire op* = backend "
          "collective ops the dispatcher ran (totals only). Inputs and model are device data.\n")
    for setting in args.settings:
        steps0 = results[0][setting]
        print(table(setting, steps0, 1, args.steady))
        for r in range(1, args.P):
            for s in (1, args.steady):
                if rows_of(results[r][setting][s - 1]["events"]) != rows_of(steps0[s - 1]["events"]):
                    diff = rows_of(results[r][setting][s - 1]["events"])
                    diff.subtract(rows_of(steps0[s - 1]["events"]))
                    shown = {" / ".join(map(str, k)): v for k, v in diff.items() if v}
                    print(f"\nrank {r} differs from rank 0 at step {s} (rank {r} minus rank 0): {shown}")
        print()
    print(f"#### summary (step {args.steady}, steady state; step 1 in parentheses where it differs)\n")
    print("| setting | " + " | ".join(PLURAL[label] for _, label in KINDS) + " |")
    print("|---|" + "---:|" * len(KINDS))
    for setting in args.settings:
        ta = totals(results[0][setting][0]["events"])
        tb = totals(results[0][setting][args.steady - 1]["events"])
        cells = [f"{tb[label]}" + (f" ({ta[label]})" if ta[label] != tb[label] else "") for _, label in KINDS]
        print(f"| {setting} | " + " | ".join(cells) + " |")
    print(f"\n({time.time() - t0:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        data = {"P": args.P, "steps": args.steps, "steady": args.steady, "package": package_info(),
                "settings": {}}
        for setting in args.settings:
            data["settings"][setting] = {
                f"rank {r}": [dict(step=i + 1, loss=st["loss"], totals=totals(st["events"]),
                                   counts={" | ".join(map(str, k)): v for k, v in rows_of(st["events"]).items()},
                                   events=st["events"])
                              for i, st in enumerate(results[r][setting])] for r in range(args.P)}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
