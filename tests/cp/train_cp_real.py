"""Train Gated DeltaNet (FLA's, or transformers' Qwen3.5 / Qwen3-Next) with exact context parallelism on
real text (no downloads).

    torchrun --nproc_per_node=2 tests/cp/train_cp_real.py --cp_size 2          # CP=2 on CPU (gloo)
    torchrun --nproc_per_node=4 tests/cp/train_cp_real.py --cp_size 2          # DP=2 x CP=2
    python tests/cp/train_cp_real.py --cp_size 1                                # one process
    torchrun --nproc_per_node=2 tests/cp/train_cp_real.py --cp_size 2 --model_config hybrid-small  # GDN + attention
    torchrun --nproc_per_node=4 tests/cp/train_cp_real.py --cp_size 2 --fsdp   # FSDP2 over dp x cp, sharded ckpts
    torchrun --nproc_per_node=2 tests/cp/train_cp_real.py --cp_size 2 --model_config qwen3_5-small  # transformers'

World = DP x CP; every rank of a CP group feeds the same packed batch and the model shards it along
the sequence. The default corpus is this interpreter's standard-library sources, the default
tokenizer is byte-level. Gloo on CPU, NCCL when every rank has a GPU of its own: nothing to choose.
`--save_dir` checkpoints can be resumed with `--resume` (same loss curve as an uninterrupted run);
Ctrl-C saves a checkpoint at the end of the current step and exits.

A resume continues the checkpoint's run: the arguments that define it (model, tokenizer, data, seed,
seq_len, sequences per step = batch_size x DP, optimizer and LR schedule, weight decay, clipping)
must be given as they were, or the script exits (code 2) naming each difference. The CP size and
layout, --bf16, --fsdp, and where / when to save, log and stop may change. A checkpoint already at --steps
(or at or past --stop_at) has nothing to do: the script says so and exits 0 without saving.

--fsdp shards parameters, gradients and AdamW state over all dp x cp ranks (FSDP2, `fully_shard` of each
decoder layer and of the root over the flattened dp x cp mesh: `fla_cp.parallel.apply_fsdp2`), for models
whose replicated optimizer state does not fit. The gradient reduction is `sync_gradients`' (sum over CP,
mean over DP: FSDP2 divides by dp, not dp x cp), so the losses are the replicated run's up to fp32
rounding. Its checkpoints are sharded, in the same step_XXXXXXX/ directories:

    step_XXXXXXX/dcp/                   model + optimizer shards (torch.distributed.checkpoint, every rank)
    step_XXXXXXX/config.json, model.safetensors, generation_config.json
                                        the weights gathered on rank 0: from_pretrained(dir) loads them
    step_XXXXXXX/trainer_state.pt       step, data position, args (no optimizer: it is in dcp/)
    step_XXXXXXX/rng_rank{r}.pt         every rank's RNG state
    latest                              the newest complete checkpoint, written last

Without --fsdp a checkpoint holds the optimizer state in trainer_state.pt instead of dcp/. Either kind
resumes with or without --fsdp and with any world size / dp x cp split: DCP reshards the shards on load,
and a replicated checkpoint's optimizer state is sharded on load (fla_cp/utils/checkpoint.py).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run from a checkout without installing

import fla_cp  # noqa: F401  (registers the CP models with the Auto classes)
from fla_cp.data import DATA_SUFFIXES, Corpus, Packer, load_tokenizer
from fla_cp.models import (
    init_cp_mesh,
    sync_gradients,
)
from fla_cp.parallel import apply_fsdp2
from fla_cp.utils.checkpoint import (
    checkpoint_format,
    load_model_and_optimizer,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from fla_cp.utils.configs import build_config, causal_lm_class, preset_help, resolved_model_config
from fla_cp.utils.dist import cleanup_distributed, init_distributed
from fla_cp.utils.memory import fmt_bytes, peak_memory_bytes
from fla_cp.utils.metrics_log import MetricsLog

# The arguments that define the run a checkpoint belongs to (besides the batch: `resume_conflicts`).
# --cp_size / --cp_layout are not among them: CP is exact, so any split continues the same run.
RUN_ARGS = ("model_config", "tokenizer", "data", "seed", "seq_len", "optimizer", "lr", "min_lr_ratio", "warmup",
            "steps", "weight_decay", "grad_clip")


# where the loss log goes without --save_dir (with it: save_dir/loss.jsonl)
DEFAULT_LOG_DIR = "runs/train_cp_real"
LOG_SUFFIXES = (".csv", ".jsonl")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp_size", type=positive_int, default=1, help="ranks per CP group; must divide the world size")
    p.add_argument("--cp_layout", default="contiguous", choices=["contiguous", "zigzag"])
    p.add_argument("--seq_len", type=positive_int, default=1024, help="tokens per packed sequence")
    p.add_argument("--batch_size", type=positive_int, default=4,
                   help="sequences per step per DP rank (packed in one row)")
    p.add_argument("--steps", type=positive_int, default=200, help="length of the run (and of the LR schedule)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=non_negative_int, default=20)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--model_config", default="small", help=f"{preset_help()} or a JSON file / config dir")
    p.add_argument("--data", default=None,
                   help=f"a local file (.jsonl: a document per line; any other: one document) or a directory of "
                        f"{'/'.join(DATA_SUFFIXES)} files (default: Python stdlib sources)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 over all dp x cp ranks: parameters, gradients and optimizer state sharded; "
                        "sharded (torch.distributed.checkpoint) checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_dir", default=None, help="checkpoints go to save_dir/step_XXXXXXX")
    p.add_argument("--save_every", type=non_negative_int, default=0,
                   help="also checkpoint every N steps (0: only at the end; needs --save_dir)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from --save_dir's latest checkpoint, or from the given checkpoint dir (the run's "
                        "arguments must be the checkpoint's; a finished run has nothing to do and exits 0)")
    p.add_argument("--stop_at", type=positive_int, default=None,
                   help="save and exit after this step, as if interrupted (resuming a checkpoint at or past it: "
                        "nothing to do, exit 0)")
    p.add_argument("--log_file", default=None,
                   help=f"{' or '.join(LOG_SUFFIXES)} loss log (default: SAVE_DIR/loss.jsonl, or "
                        f"{DEFAULT_LOG_DIR}/loss.jsonl without --save_dir)")
    p.add_argument("--backend", default=None, help="force a torch.distributed backend (default: automatic)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (default: cores / local ranks)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Combinations of arguments that cannot work: a usage error (exit 2) now, not a traceback later."""
    if args.resume == "latest" and args.save_dir is None:
        p.error("--resume without a checkpoint path resumes --save_dir's latest checkpoint: give --save_dir "
                "(or --resume CHECKPOINT_DIR)")
    if args.resume not in (None, "latest") and not (Path(args.resume) / "trainer_state.pt").is_file():
        p.error(f"--resume {args.resume}: not a checkpoint directory (no trainer_state.pt there)")
    if args.save_dir is not None and Path(args.save_dir).exists() and not Path(args.save_dir).is_dir():
        p.error(f"--save_dir {args.save_dir} is a file, not a directory")
    if args.save_every and args.save_dir is None:
        p.error("--save_every needs --save_dir (where the checkpoints go)")
    if args.stop_at is not None and args.stop_at > args.steps:
        p.error(f"--stop_at {args.stop_at} is past the end of the run (--steps {args.steps})")
    if args.log_file is not None:
        if Path(args.log_file).suffix not in LOG_SUFFIXES:
            p.error(f"--log_file {args.log_file}: must end in {' or '.join(LOG_SUFFIXES)}")
        if Path(args.log_file).is_dir():
            p.error(f"--log_file {args.log_file} is a directory")
    if args.data is not None and not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist")


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr over the run (`step` counts from 0)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class StopFlag:
    """SIGINT/SIGTERM ask for a clean stop; the ranks agree on it at the end of each step.

    A second Ctrl-C falls through to Python's default (KeyboardInterrupt) for a hard stop.
    """

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def agreed(self, device) -> bool:
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run_identity(args, tokenizer, corpus) -> dict:
    """What --model_config, --tokenizer and --data stand for, compared on resume instead of their
    spelling: the resolved model config, the tokenizer's sizes and special ids, and the corpus's
    document count and bytes (the same file named another way passes; another file of the same name
    does not; an edit that keeps both counts would)."""
    files = {path for path, _ in corpus.entries}
    return {"model_config": resolved_model_config(args.model_config, tokenizer.vocab_size),
            "tokenizer": [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.eos_token_id,
                          tokenizer.bos_token_id],
            "data": [len(corpus), sum(f.stat().st_size for f in files)]}


def _shown_identity(name: str, value, other) -> str:
    if name == "model_config":      # the fields that differ, not the whole config
        keys = [k for k in sorted(set(value) | set(other)) if value.get(k) != other.get(k)]
        return "{" + ", ".join(f"{k}: {value.get(k)!r}" for k in keys[:4]) + (", ..." if len(keys) > 4 else "") + "}"
    if name == "data":
        return f"{value[0]:,} documents, {value[1]:,} bytes"
    return repr(value)


def resume_conflicts(extra: dict, args, dp_size: int, identity: dict) -> list[str]:
    """'--name: checkpoint X, given Y' for each run-defining argument that differs from the checkpoint's
    (`extra`: what `checkpoint()` saved with it; arguments it lacks are not compared). Model, tokenizer
    and data are compared by `run_identity` (by spelling for checkpoints saved before it)."""
    saved, saved_identity = extra.get("args", {}), extra.get("identity", {})
    conflicts = [f"--{name}: checkpoint {saved[name]!r}, given {getattr(args, name)!r}"
                 for name in RUN_ARGS if name in saved and name not in saved_identity
                 and saved[name] != getattr(args, name)]
    for name, value in identity.items():
        if name in saved_identity and saved_identity[name] != value:
            conflicts.append(f"--{name}: checkpoint {saved.get(name)!r} "
                             f"({_shown_identity(name, saved_identity[name], value)}), given "
                             f"{getattr(args, name)!r} ({_shown_identity(name, value, saved_identity[name])})")
    # the sequences of a step, not their split over DP ranks, make the run: DP may change with --batch_size
    saved_dp = extra.get("dp_size", dp_size)
    if "batch_size" in saved and saved["batch_size"] * saved_dp != args.batch_size * dp_size:
        conflicts.append(f"--batch_size x dp (sequences per step): checkpoint {saved['batch_size']} x {saved_dp}, "
                         f"given {args.batch_size} x {dp_size}")
    return conflicts


def set_special_tokens(model, tokenizer) -> None:
    """The tokenizer's EOS / BOS in the config that checkpoints save, so that generate() stops at the end
    of a document. The pad token (EOS for the byte tokenizer, which has none) goes to the generation config
    only: the model config's pad_token_id is the embedding's padding_idx, a zero row that never trains."""
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    pad = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id if pad is None else pad


def build(args, info, mesh, tokenizer, ckpt, ckpt_format=None):
    """The model (on `info.device`, fp32, identical on every rank; sharded with --fsdp) and its optimizer.
    From a "full" checkpoint the weights come with `from_pretrained`; a "dcp" checkpoint's are loaded
    later (`load_model_and_optimizer`) into a model built as for a fresh run."""
    # FLA's GatedDeltaNet or transformers' Qwen3.5 / Qwen3.5-MoE / Qwen3-Next: the config names the family
    config = build_config(args.model_config, tokenizer.vocab_size, cp_size=args.cp_size, cp_layout=args.cp_layout)
    model_class = causal_lm_class(config)
    if ckpt is not None and ckpt_format == "full":
        model = model_class.from_pretrained(ckpt, cp_size=args.cp_size, cp_layout=args.cp_layout, device_mesh=mesh)
    else:
        model = model_class(config, device_mesh=mesh)
    set_special_tokens(model, tokenizer)
    model = model.to(device=info.device, dtype=torch.float32)
    for p in model.parameters():        # identical start on every rank, whatever the init RNG did
        dist.broadcast(p.data, src=0)
    if args.fsdp:                       # before the optimizer: it must hold the sharded parameters
        apply_fsdp2(model, mesh)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    else:
        opt = torch.optim.SGD(groups, lr=args.lr)
    return model, opt


def main(argv=None) -> int:
    args = get_args(argv)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    info = init_distributed(args.backend)
    if info.world_size % args.cp_size:
        if info.is_main:
            print(f"error: --cp_size {args.cp_size} does not divide the world size {info.world_size}", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    dp_size, dp_rank = info.world_size // args.cp_size, info.rank // args.cp_size
    mesh = init_cp_mesh(args.cp_size, device_type=info.device.type)

    try:        # what --tokenizer, --data and --model_config name: a clear error (exit 2), not a traceback
        tokenizer = load_tokenizer(args.tokenizer)
        packer = Packer(Corpus(args.data), tokenizer, args.seq_len, seed=args.seed)
        identity = run_identity(args, tokenizer, packer.corpus)
        ckpt = resolve_checkpoint(args.resume, args.save_dir) if args.resume else None
    except (OSError, ValueError) as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    if args.resume and ckpt is None and info.is_main:
        print(f"--resume: no checkpoint in {args.save_dir} yet, starting from scratch", flush=True)
    step = 0
    if ckpt is not None:
        # every rank reads the same checkpoint and arguments, so every rank stops here alike
        state, rng = load_trainer_state(ckpt)
        step = state["step"]
        conflicts = resume_conflicts(state["extra"], args, dp_size, identity)
        if conflicts:
            if info.is_main:
                print(f"error: --resume {ckpt}: a resume continues the checkpoint's run, but these arguments differ "
                      f"from it (give the checkpoint's values, or start a new --save_dir):\n  "
                      + "\n  ".join(conflicts), file=sys.stderr)
            cleanup_distributed(info)
            return 2
        end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
        if step >= end:
            if info.is_main:
                why = f"--stop_at {args.stop_at}" if end < args.steps else f"the end of the run, --steps {args.steps}"
                print(f"nothing to do: {ckpt} is at step {step} ({why}); nothing trained or saved", flush=True)
            cleanup_distributed(info)
            return 0
    torch.manual_seed(args.seed)
    model, opt = build(args, info, mesh, tokenizer, ckpt, checkpoint_format(state) if ckpt is not None else None)
    if ckpt is not None:
        load_model_and_optimizer(ckpt, state, model, opt)
        packer.load_state_dict(state["data"])
        if rng is not None:
            set_rng_state(rng)
    log_path = args.log_file or Path(args.save_dir or DEFAULT_LOG_DIR) / "loss.jsonl"
    log = MetricsLog(log_path, resume_step=step if ckpt is not None else None, enabled=info.is_main)
    # after a resume, the summary and time_s continue the whole run's when the log holds all its earlier
    # steps (rank 0's view); otherwise they cover this run, and the summary says so
    start_step = step
    earlier = log.kept if [r["step"] for r in log.kept] == list(range(1, step + 1)) else []
    losses = [r["loss"] for r in earlier]
    t_before = earlier[-1].get("time_s", 0.0) if earlier else 0.0

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.seq_len * args.batch_size * dp_size
    sharding = f" (FSDP2 over {info.world_size} rank{'s' * (info.world_size > 1)})" if args.fsdp else ""
    if info.is_main:
        print(f"world {info.world_size} = dp {dp_size} x cp {args.cp_size}{sharding} | backend {info.backend}"
              f" | device {info.device} | {n_params / 1e6:.2f}M params"
              f" | corpus {packer.corpus.name} ({len(packer.corpus)} docs)"
              f" | tokenizer {tokenizer.name} | {tokens_per_step} tokens/step"
              f" ({args.seq_len * args.batch_size // args.cp_size} per rank) | log {log_path}"
              + (f" | resumed from {ckpt} at step {step}" if ckpt else ""), flush=True)

    def checkpoint(reason: str):
        if args.save_dir:
            path = save_checkpoint(args.save_dir, step, model, opt, packer.state_dict(),
                                   extra={"args": vars(args), "dp_size": dp_size, "identity": identity})
            if info.is_main:
                print(f"{reason}: saved {path}", flush=True)

    stop = StopFlag()
    amp = torch.autocast(info.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    bar = tqdm(total=args.steps, initial=step, disable=not info.is_main, dynamic_ncols=True)
    tokens_seen = step * tokens_per_step
    t_start = time.perf_counter() - t_before
    while step < args.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = packer.next_batch(args.batch_size * dp_size).split(dp_size, dp_rank).to(info.device)
        with amp:
            out = model(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
        out.loss.backward()
        if not args.fsdp:               # FSDP2 reduce-scatters the gradients itself (sum over CP, mean over DP)
            sync_gradients(model)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        loss = out.loss.detach().float().clone()               # identical on the ranks of a CP group
        if model.dp_group is not None:                          # average over the DP replicas
            dist.all_reduce(loss, group=model.dp_group)
        loss = loss.item() / dp_size
        losses.append(loss)
        dt = time.perf_counter() - t0
        tokens_seen += tokens_per_step
        peak = peak_memory_bytes(info.device)
        log.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                   "peak_mem_bytes": peak, "time_s": time.perf_counter() - t_start})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", peak_mem=fmt_bytes(peak))

        if stop.agreed(info.device):
            bar.close()
            checkpoint(f"interrupted at step {step}")
            break
        if args.stop_at is not None and step >= args.stop_at:
            bar.close()
            checkpoint(f"stopped at step {step} (--stop_at)")
            break
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            checkpoint(f"step {step}")
    else:
        bar.close()
        checkpoint(f"finished {step} steps")
    if info.is_main and len(losses) >= 2:
        k = max(1, min(10, len(losses) // 4))
        first = f"the first {k} steps" + (f" after step {start_step}" if start_step and not earlier else "")
        print(f"loss: mean of {first} {sum(losses[:k]) / k:.4f} -> mean of the last {k} steps "
              f"{sum(losses[-k:]) / k:.4f} ({len(losses)} steps, {time.perf_counter() - t_start:.0f}s)", flush=True)
    stop.restore()
    cleanup_distributed(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
