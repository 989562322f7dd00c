"""Per-rank memory of one training step (forward + backward) of Gated DeltaNet with context parallelism.

    python tests/cp/benchmark_memory.py --cp_size 1                       # saves the baseline
    torchrun --nproc_per_node=4 tests/cp/benchmark_memory.py --cp_size 4  # compares against it
    python tests/cp/benchmark_memory.py --plot memory.png                  # plot the latest run and its peers
    torchrun --nproc_per_node=2 tests/cp/benchmark_memory.py --model_config hybrid-small   # GDN + attention
    torchrun --nproc_per_node=2 tests/cp/benchmark_memory.py --model_config qwen3_5-small  # transformers' Qwen3.5

Every measurement runs in a fresh process per rank (spawned by each launcher rank), so that
  * on GPU, Peak is torch.cuda.max_memory_allocated of that step;
  * on CPU, Peak is the process's peak resident set (ru_maxrss), which cannot be reset in-process.
Activations is exact and device-independent: the bytes of tensors autograd saved for backward
(torch.autograd.graph.saved_tensors_hooks, each storage once, parameters excluded). Model is the
parameter bytes. Reduction compares with the saved cp_size=1 results measured with the same settings
(resolved model config, vocab, dtype, batch size, device); the plot draws the runs whose settings match
the latest one. An out-of-memory step is reported in Status, not a crash (exit 0: it is a result).
A measurement that failed (the step raised, its process died or timed out) exits 1, and the run is
neither saved nor plotted: the results file keeps the last good run. Results:
<results_dir>/memory_<dev>_cp<P>.json (memory_<dev>_cp<P>_zigzag.json for --cp_layout zigzag).

Any model of `fla_cp.utils.configs` runs: FLA GatedDeltaNet (pure, hybrid) and transformers' Qwen3.5 /
Qwen3.5-MoE / Qwen3-Next presets or config directories.

Hybrid models (a config with softmax-attention layers, e.g. --model_config hybrid-small) get a second
table that splits Activations by the decoder layer that saved them first (module hooks on the blocks
inside the same saved-tensor hooks): the attention layers', the GDN layers' (norms and MLP included:
the whole block), and the rest (embedding, final norm, head and loss). Two more figures, per rank:
  * K/V gather: computed, not measured. A full-attention layer all-gathers K and V, B*T*Hkv*(D+Dv)
    elements in the projections' dtype, and frees them before the next layer (it re-gathers in
    backward, where the gathered payload's fp32 gradient and the reduce-scatter's send buffer, each
    B*T*Hkv*(D+Dv) fp32, exist at the same time); a windowed layer gathers (P*parts*(W-1)+1) rows. The
    largest layer's forward figure is shown; none of it is in Activations (never saved).
  * CP cache: measured, the bytes of the tensors the CP context memoises (index tables, attention masks
    of the split) and keeps with the model across steps of the same length (not in Activations:
    autograd does not save them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run from a checkout without installing

import torch
import torch.distributed as dist

from fla_cp.utils.configs import build_config, causal_lm_class, preset_help, resolved_model_config
from fla_cp.utils.dist import (
    broadcast_object,
    cleanup_distributed,
    free_port,
    init_distributed,
)
from fla_cp.utils.memory import fmt_bytes

DEFAULT_SEQ_LENS = "1024,2048,4096,8192,16384"
# The warm-up step runs 1/WARMUP_DIV of each rank's measured tokens (see warmup_len).
WARMUP_DIV = 8


def seq_len_list(text: str) -> list[int]:
    try:
        lens = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(lens) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be >= 1, got {text!r}")
    return lens


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp_size", type=int, default=None, help="default: the world size; omit with --plot to only plot")
    p.add_argument("--cp_layout", default="contiguous", choices=["contiguous", "zigzag"])
    p.add_argument("--seq_lens", type=seq_len_list, default=DEFAULT_SEQ_LENS,
                   help="comma-separated global sequence lengths")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--model_config", default="small", help=f"{preset_help()} or a JSON file / config dir")
    p.add_argument("--vocab_size", type=int, default=257, help="257 = the byte tokenizer of train_cp_real.py")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    p.add_argument("--results_dir", default="runs/benchmark_memory")
    p.add_argument("--plot", default=None, help="write a PNG of memory vs sequence length of this run (or, with "
                   "--plot alone, the latest saved one) and the saved runs with the same settings")
    p.add_argument("--mem_limit_gb", type=float, default=None,
                   help="CPU only: cap each measuring process's address space (to exercise the OOM status)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_seq_len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# one measurement (a fresh process per rank)
# ----------------------------------------------------------------------------------------------
def is_oom(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in msg \
        or "can't allocate memory" in msg


def warmup_len(seq_len: int, cp_size: int) -> int:
    """Global length of the warm-up step, which gets one-time allocations (thread pools, allocator arenas,
    library caches) out of the way before the measured step. Its size matters on CPU, where Peak is the
    RSS growth of the measured step: memory the warm-up touched and the allocator kept is not counted
    again. So every cp_size warms up on the same fraction of its own per-rank length; a fixed count
    (it was 64 tokens per rank) let a CP run whose shard is <= 64 tokens warm up at full size while the
    cp_size=1 baseline did not, inflating the peak reduction (24x at 101 tokens on 3 ranks). At least 2
    tokens per rank: the zigzag layout needs 2 parts per rank."""
    local_len = -(-seq_len // cp_size)
    return min(seq_len, cp_size * max(2, local_len // WARMUP_DIV))


def token_mixer(block):
    """A decoder layer's token mixer: FLA's `attn` (GDN or attention), transformers' `linear_attn` / `self_attn`."""
    for name in ("attn", "linear_attn", "self_attn"):
        if hasattr(block, name):
            return getattr(block, name)
    raise TypeError(f"{type(block).__name__}: no token mixer (attn, linear_attn or self_attn)")


def attention_sizes(mixer) -> tuple[int, int, int | None] | None:
    """(K/V heads, head dim, window or None) of a softmax-attention mixer; None for a GDN layer."""
    from fla_cp.layers import AttentionCP
    from fla_cp.layers.qwen_hybrid_cp import QwenGatedAttentionCPMixin
    if isinstance(mixer, AttentionCP):
        return mixer.num_kv_heads, mixer.head_dim, mixer.window_size
    if isinstance(mixer, QwenGatedAttentionCPMixin):
        return mixer.config.num_key_value_heads, mixer.head_dim, None
    return None


def layer_kinds(model) -> list[str]:
    """"attn" or "gdn" per decoder layer, in order."""
    return ["attn" if attention_sizes(token_mixer(block)) else "gdn" for block in model.model.layers]


def kv_gather_bytes(model, batch_size: int, seq_len: int, cp_size: int, layout: str, elem_bytes: int) -> int:
    """The largest K/V all-gather of one attention layer's forward, per rank (computed from the sizes, see
    the module docstring): 0 without CP or without attention layers."""
    if cp_size == 1:
        return 0
    parts = 2 if layout == "zigzag" else 1
    sizes = [0]
    for block in model.model.layers:
        attn = attention_sizes(token_mixer(block))
        if attn:
            kv_heads, head_dim, window = attn
            width = kv_heads * 2 * head_dim             # K and V side by side (D == Dv)
            rows = seq_len if window is None else cp_size * parts * min(window - 1, seq_len - 1) + 1
            sizes.append(batch_size * rows * width * elem_bytes)
    return max(sizes)


def cp_cache_bytes(model) -> int:
    """Bytes of the tensors the CP contexts the model keeps (its split memo) hold in their own memo:
    index tables and attention masks kept across steps (each storage once)."""
    import dataclasses
    seen: dict = {}

    def visit(x):
        if torch.is_tensor(x):
            s = x.untyped_storage()
            seen[(x.device, s.data_ptr())] = s.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))
    for m in model.modules():
        for ctx in m.__dict__.get("_cp_splits", {}).values():
            visit(getattr(ctx, "_memo", {}))
    return sum(seen.values())


def measure(args) -> dict:
    import resource

    if args.mem_limit_gb and not torch.cuda.is_available():
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    import fla_cp  # noqa: F401
    from fla_cp.models import init_cp_mesh, sync_gradients
    from fla_cp.utils.memory import (
        SavedActivations,
        current_rss_bytes,
        peak_memory_bytes,
        reset_peak_memory,
    )

    class SavedByLayer(SavedActivations):
        """SavedActivations that also books each storage to the decoder layer whose forward saved it first
        (-1: outside the layers). Forward pre-/post-hooks on the blocks say which layer is running."""

        def __init__(self, blocks, exclude=()):
            super().__init__(exclude)
            self.layer, self.owner = -1, {}
            self._handles = []
            for i, block in enumerate(blocks):
                self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "layer", i)))
                self._handles.append(block.register_forward_hook(lambda m, a, o: setattr(self, "layer", -1)))

        def _pack(self, t):
            key = self._key(t)
            if key not in self._excluded and key not in self._seen:
                self.owner[key] = self.layer
            return super()._pack(t)

        def by_layer(self, n: int) -> list[int]:
            """Bytes per layer 0..n-1, then the bytes saved outside the layers."""
            out = [0] * (n + 1)
            for key, nbytes in self._seen.items():
                out[self.owner[key]] += nbytes          # -1: the last slot
            return out

        def __exit__(self, *exc):
            for h in self._handles:
                h.remove()
            return super().__exit__(*exc)

    info = init_distributed(timeout_s=min(args.timeout, 600))
    result = {"rank": info.rank, "status": "OK"}
    try:
        mesh = init_cp_mesh(args.cp_size, device_type=info.device.type)
        torch.manual_seed(0)
        config = build_config(args.model_config, args.vocab_size, cp_size=args.cp_size, cp_layout=args.cp_layout)
        model = causal_lm_class(config)(config, device_mesh=mesh).to(info.device)
        params = list(model.parameters())
        # known before the step runs: the run's header has it even if every step fails or runs out of memory
        result.update(params=sum(p.numel() for p in params),
                      model_bytes=sum(p.numel() * p.element_size() for p in params))
        amp = {"device_type": info.device.type, "dtype": torch.bfloat16, "enabled": args.dtype == "bf16"}

        def step(seq_len: int, saved=None):
            g = torch.Generator().manual_seed(seq_len)
            ids = torch.randint(0, args.vocab_size, (args.batch_size, seq_len), generator=g).to(info.device)
            with torch.autocast(**amp), (saved if saved is not None else nullcontext()):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            sync_gradients(model)
            model.zero_grad(set_to_none=True)

        step(warmup_len(args._seq_len, args.cp_size))     # one-time allocations out of the way
        if info.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        reset_peak_memory(info.device)
        baseline = torch.cuda.memory_allocated(info.device) if info.device.type == "cuda" else current_rss_bytes()
        kinds = layer_kinds(model)
        saved = SavedByLayer(model.model.layers, exclude=params)
        t0 = time.perf_counter()
        step(args._seq_len, saved)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        per_layer = saved.by_layer(len(kinds))
        result.update(
            peak_bytes=peak_memory_bytes(info.device),
            step_peak_bytes=peak_memory_bytes(info.device) - baseline,
            saved_bytes=saved.bytes,
            step_time_s=time.perf_counter() - t0,
            layer_kinds=kinds,
            saved_bytes_by_layer=per_layer[:-1],
            saved_attn_bytes=sum(b for b, k in zip(per_layer, kinds) if k == "attn"),
            saved_gdn_bytes=sum(b for b, k in zip(per_layer, kinds) if k == "gdn"),
            saved_other_bytes=per_layer[-1],
            kv_gather_bytes=kv_gather_bytes(model, args.batch_size, args._seq_len, args.cp_size, args.cp_layout,
                                            2 if args.dtype == "bf16" else 4),
            cp_cache_bytes=cp_cache_bytes(model),
        )
    except BaseException as e:  # noqa: BLE001 - a failed measurement is a row of the table
        result["status"] = "OOM" if is_oom(e) else f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        cleanup_distributed(info)
    return result


def child_main(args) -> int:
    result = measure(args)
    Path(args._out).write_text(json.dumps(result))
    return 0


def run_child(args, seq_len: int, port: int) -> dict:
    """Spawn this rank's measuring process for one sequence length; its result, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--_child", "--_seq_len", str(seq_len), "--_out", str(out)]
        for key in ("cp_size", "cp_layout", "batch_size", "model_config", "vocab_size", "dtype", "mem_limit_gb",
                    "timeout", "threads"):
            if getattr(args, key) is not None:
                cmd += [f"--{key}", str(getattr(args, key))]
        # a child is a fresh group of its own: not torchrun's agent store (it would wait for it forever)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
        env.update(MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port),
                   RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()),
                   LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                   LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size())))
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True, check=False)
        except subprocess.TimeoutExpired:
            return {"status": f"TIMEOUT (> {args.timeout:.0f}s)"}
        if out.is_file():
            return json.loads(out.read_text())
        if proc.returncode in (-9, 137):
            return {"status": "OOM (killed)"}
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"status": f"FAILED (exit {proc.returncode}): {last}"}


# ----------------------------------------------------------------------------------------------
# the table, the JSON, the plot
# ----------------------------------------------------------------------------------------------
# the hybrid table's figures (each the max over ranks, like the others)
SPLIT_KEYS = ("saved_attn_bytes", "saved_gdn_bytes", "saved_other_bytes", "kv_gather_bytes", "cp_cache_bytes")


def combine(seq_len: int, cp_size: int, per_rank: list[dict]) -> dict:
    bad = [r["status"] for r in per_rank if r["status"] != "OK"]
    row = {"seq_len": seq_len, "local_len": -(-seq_len // cp_size),
           "status": next((s for s in bad if s.startswith("OOM")), bad[0] if bad else "OK")}
    row["params"] = next((r["params"] for r in per_rank if r.get("params") is not None), None)
    if not bad:
        for key in ("model_bytes", "peak_bytes", "step_peak_bytes", "saved_bytes", "step_time_s", *SPLIT_KEYS):
            if all(key in r for r in per_rank):
                row[key + "_per_rank"] = [r[key] for r in per_rank]
                row[key] = max(r[key] for r in per_rank)
        if "layer_kinds" in per_rank[0]:
            row["layer_kinds"] = per_rank[0]["layer_kinds"]
            row["saved_bytes_by_layer"] = [max(b) for b in zip(*(r["saved_bytes_by_layer"] for r in per_rank))]
    return row


def results_path(results_dir, device_type: str, cp_size: int, layout: str = "contiguous") -> Path:
    # cp_size=1 has a single layout (one rank holds everything): its file is the baseline of every layout
    suffix = f"_{layout}" if cp_size > 1 and layout != "contiguous" else ""
    return Path(results_dir) / f"memory_{device_type}_cp{cp_size}{suffix}.json"


def run_settings(args, device_name: str) -> dict:
    """Everything but cp_size and layout that the numbers depend on: runs are compared (and plotted
    together) only when these match. The model is the resolved config, so two JSON files with the same
    name, or a preset with another vocab, do not pass for each other, and a preset and a checkpoint of it do."""
    settings = {"model": resolved_model_config(args.model_config, args.vocab_size), "dtype": args.dtype,
                "batch_size": args.batch_size, "device": device_name, "warmup_div": WARMUP_DIV}
    return json.loads(json.dumps(settings))       # as it will read back from the results file


def settings_diff(a: dict | None, b: dict | None, prefix: str = "") -> list[str]:
    """The settings in which a and b differ, e.g. ['model.vocab_size 257 vs 20000']."""
    if a is None or b is None:
        return ["no settings saved (an older version of this script)"]
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += settings_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} {x} vs {y}")
    return out


def load_baseline(results_dir, run: dict) -> tuple[dict | None, str | None]:
    """The saved cp_size=1 run with the settings of `run`, or None and a note that says why there is none."""
    if run["cp_size"] == 1:
        return None, None
    path = results_path(results_dir, run["device_type"], 1)
    if not path.is_file():
        return None, f"(no saved cp_size=1 results at {path}: run with --cp_size 1 and the same options first)"
    baseline = json.loads(path.read_text())
    diff = settings_diff(baseline.get("settings"), run["settings"])
    if diff:
        shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        return None, (f"(no reduction column: {path} was measured with other settings (there vs here: {shown}): "
                      f"run with --cp_size 1 and the same options first)")
    return baseline, None


def fmt_params(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M"


def is_failed(status: str) -> bool:
    """A row with no measurement: the step raised, the process died or timed out. Out of memory is a
    result (the step does not fit), not a failure."""
    return status != "OK" and not status.startswith("OOM")


def print_table(run: dict, baseline: dict | None, note: str | None = None) -> None:
    base = {r["seq_len"]: r for r in (baseline or {}).get("results", []) if r["status"] == "OK"}
    cpu = run["device_type"] == "cpu"
    head = ["Seq Len", "Local Chunk", "Model", "Peak/rank" + (" (RSS)" if cpu else ""),
            "Activations/rank", "Status", "Reduction"]
    rows = []
    for r in run["results"]:
        red = "-"
        b = base.get(r["seq_len"])
        if r["status"] == "OK" and b is not None and run["cp_size"] != 1:
            act = b["saved_bytes"] / max(r["saved_bytes"], 1)
            # CPU: RSS includes the interpreter and libraries, so compare what the step itself added
            key = "step_peak_bytes" if cpu else "peak_bytes"
            red = f"{act:.2f}x act, {b[key] / max(r[key], 1):.2f}x peak"
        ok = r["status"] == "OK"
        rows.append([f"{r['seq_len']:,}", f"{r['local_len']:,}", fmt_bytes(r.get("model_bytes")),
                     fmt_bytes(r.get("peak_bytes")) if ok else "-", fmt_bytes(r.get("saved_bytes")) if ok else "-",
                     r["status"], red])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"\nMemory per rank, one training step (fwd+bwd) | cp_size={run['cp_size']} layout={run['cp_layout']} "
          f"model={run['model_config']} ({fmt_params(run.get('params'))} params) dtype={run['dtype']} "
          f"batch={run['batch_size']} | {run['device_name']}")
    print(" " + " | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(line)
    for row in rows:
        print(" " + " | ".join(c.ljust(w) for c, w in zip(row, widths)))
    if cpu:
        print("Peak = peak RSS of a fresh process (includes ~interpreter+libraries); Reduction 'peak' uses the RSS "
              "growth during the step; 'act' = bytes saved for backward (exact).")
    print_split_table(run, base)
    if note:
        print(note)


def _cell(n: int | None, total: int | None = None) -> str:
    if n is None:
        return "-"
    return fmt_bytes(n) + (f" ({100 * n / total:.0f}%)" if total else "")


def print_split_table(run: dict, base: dict) -> None:
    """Hybrid models: Activations split by layer kind, the transient K/V gather and the CP cache (see the
    module docstring); nothing for a model without attention layers or rows without the split."""
    rows = [r for r in run["results"] if r["status"] == "OK" and "saved_attn_bytes" in r
            and "attn" in r.get("layer_kinds", [])]
    if not rows:
        return
    kinds = rows[0]["layer_kinds"]
    n_attn, n_gdn = kinds.count("attn"), kinds.count("gdn")
    P = run["cp_size"]
    head = ["Seq Len", "Local Chunk", "Activations/rank", f"attn layers ({n_attn})", f"GDN layers ({n_gdn})",
            "other", "per attn / GDN layer", "K/V gather (transient)", "CP cache", "vs 1 device / P"]
    table = []
    for r in rows:
        total = r["saved_bytes"]
        per = f"{fmt_bytes(r['saved_attn_bytes'] / max(n_attn, 1))} / {fmt_bytes(r['saved_gdn_bytes'] / max(n_gdn, 1))}"
        b = base.get(r["seq_len"])
        vs = f"{total / (b['saved_bytes'] / P):.3f}x" if b is not None and P != 1 else "-"
        table.append([f"{r['seq_len']:,}", f"{r['local_len']:,}", fmt_bytes(total),
                      _cell(r["saved_attn_bytes"], total), _cell(r["saved_gdn_bytes"], total),
                      _cell(r["saved_other_bytes"], total), per,
                      fmt_bytes(r["kv_gather_bytes"]) if P != 1 else "- (no CP)", fmt_bytes(r["cp_cache_bytes"]), vs])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    print(f"\nActivations per rank by layer kind (hybrid: {n_attn} attention + {n_gdn} GDN layers), cp_size={P}")
    print(" " + " | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("+".join("-" * (w + 2) for w in widths))
    for row in table:
        print(" " + " | ".join(c.ljust(w) for c, w in zip(row, widths)))
    print("attn / GDN layers: bytes first saved inside those decoder layers (norms and MLP included); other: "
          "embedding, final norm, head, loss. K/V gather: computed, the largest attention layer's gathered K/V "
          "(forward; its backward holds it plus its fp32 gradient and the reduce-scatter buffer), freed before "
          "the next layer, not in Activations. CP cache: measured, the split's memoised index tables and "
          "attention masks kept with the model across steps. vs 1 device / P: Activations/rank over "
          "(cp_size=1's / P).")


def plot(results_dir, device_type: str, out: str, latest: dict | None = None) -> list[dict]:
    """Plot `latest` (default: the newest saved run) and the saved runs measured with its settings;
    returns the runs plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = sorted(Path(results_dir).glob(f"memory_{device_type}_cp*.json"))
    saved = {p.name: json.loads(p.read_text()) for p in paths}
    if not saved:
        raise SystemExit(f"nothing to plot: no {results_dir}/memory_{device_type}_cp*.json")
    latest = latest or max(saved.values(), key=lambda r: r.get("date", ""))
    runs = [r for r in saved.values() if r is latest or not settings_diff(r.get("settings"), latest.get("settings"))]
    if latest not in runs:     # not saved (yet)
        runs.append(latest)
    left_out = [name for name, r in saved.items() if r not in runs]
    if left_out:
        print(f"left out of the plot (measured with other settings than the cp_size={latest['cp_size']} "
              f"{latest['cp_layout']} run of {latest.get('date')}): {', '.join(left_out)}")
    runs.sort(key=lambda r: (r["cp_size"], r["cp_layout"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        ok = [r for r in run["results"] if r["status"] == "OK"]
        xs = [r["seq_len"] for r in ok]
        label = f"cp_size={run['cp_size']}" + (f" {run['cp_layout']}" if run["cp_size"] > 1 else "")
        axes[0].plot(xs, [r["saved_bytes"] / 2**20 for r in ok], marker="o", label=label)
        key = "step_peak_bytes" if device_type == "cpu" else "peak_bytes"
        axes[1].plot(xs, [r[key] / 2**20 for r in ok], marker="o", label=label)
    axes[0].set_title("activations saved for backward, per rank")
    axes[1].set_title("peak RSS growth in the step, per rank" if device_type == "cpu" else "peak allocated, per rank")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("global sequence length (tokens)")
        ax.set_ylabel("MiB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Gated DeltaNet CP memory, model={latest['model_config']} ({fmt_params(latest.get('params'))} "
                 f"params), {latest['dtype']}, batch {latest['batch_size']}, {latest['device_name']}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return runs


def main(argv=None) -> int:
    args = get_args(argv)
    if args._child:
        return child_main(args)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cp_size is None and "WORLD_SIZE" not in os.environ and args.plot:
        plot(args.results_dir, device_type, args.plot)        # plot only
        return 0
    info = init_distributed(use_device=False)                  # the launcher never touches the GPU
    args.cp_size = args.cp_size or info.world_size
    if info.world_size % args.cp_size:
        if info.is_main:
            print(f"error: --cp_size {args.cp_size} does not divide the world size {info.world_size}", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    try:                                   # a bad --model_config: one clear error now, not a failed child per length
        resolved_model_config(args.model_config, args.vocab_size)
    except (OSError, ValueError) as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    rows = []
    for seq_len in args.seq_lens:
        port = broadcast_object(free_port() if info.is_main else None)
        mine = run_child(args, seq_len, port)
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, mine)
        rows.append(combine(seq_len, args.cp_size, per_rank))
        if info.is_main:
            row = rows[-1]
            print(f"seq_len {seq_len:>7,}: {row['status']}"
                  + (f", peak/rank {fmt_bytes(row['peak_bytes'])}, activations/rank "
                     f"{fmt_bytes(row['saved_bytes'])}, {row['step_time_s']:.1f}s" if row["status"] == "OK" else ""),
                  flush=True)
    failed = [r for r in rows if is_failed(r["status"])]     # the same on every rank (all_gather)
    if info.is_main:
        n_params = next((r["params"] for r in rows if r.get("params") is not None), None)
        device_name = torch.cuda.get_device_name(0) if device_type == "cuda" else \
            f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
        run = {"cp_size": args.cp_size, "cp_layout": args.cp_layout, "world_size": info.world_size,
               "model_config": args.model_config, "params": n_params, "dtype": args.dtype,
               "batch_size": args.batch_size, "device_type": device_type, "device_name": device_name,
               "settings": run_settings(args, device_name),
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "results": rows}
        path = results_path(args.results_dir, device_type, args.cp_size, args.cp_layout)
        print_table(run, *load_baseline(args.results_dir, run))
        if failed:
            # a broken run is not a result: it neither replaces the saved one nor gets plotted
            kept = f"{path} keeps its earlier results" if path.is_file() else f"nothing written to {path}"
            print(f"error: {len(failed)} of {len(rows)} measurements failed (seq_len "
                  f"{', '.join(str(r['seq_len']) for r in failed)}): not saved, {kept}", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run, indent=1))
            print(f"saved {path}")
            if args.plot:
                plot(args.results_dir, device_type, args.plot, latest=run)
    cleanup_distributed(info)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
