"""transformers' Qwen3.5 / Qwen3-Next under fla_cp's CP vs transformers' own model, on a GPU.

    python scripts/check_qwen_cuda.py                                   # one process: cp_size 1 vs transformers
    torchrun --nproc_per_node=2 scripts/check_qwen_cuda.py              # CP=2 (gloo ranks on the one GPU)
    python scripts/check_qwen_cuda.py --smoke                           # the same on CPU (tiny, for the tests)

On CUDA transformers' GDN layers call FLA's chunk kernels and its attention SDPA; ours run FLA's kernels
and our Triton summaries (backend "auto"), attention through flash-attn in bf16 when installed, SDPA
otherwise. Per family and dtype, one training step on a dense batch vs transformers' in the same
process: the loss, the gathered logits and every gradient (after `sync_gradients`: all of them as one
vector, and the worst tensor, against its norm or 1e-3 of the whole gradient's: at transformers' init
the decay gates' gradients are ~1e-8, pure cancellation), and greedy generation. fp32 runs with IEEE
dots (set TRITON_F32_DEFAULT=ieee and TF32 off) against 1e-4 relative; bf16 against FLA's bf16
tolerances (loss 5e-3, logits 2e-2, gradients 5e-2 relative). Prints a table; exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fla_cp  # noqa: F401,E402
from fla_cp.models import sync_gradients  # noqa: E402
from fla_cp.utils.configs import build_config, causal_lm_class  # noqa: E402

TOLERANCES = {"fp32": dict(loss=1e-4, logits=1e-4, grads=1e-4, generate=True),
              "bf16": dict(loss=5e-3, logits=2e-2, grads=5e-2, generate=False)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRESETS = {"qwen3_5": "qwen3_5-tiny", "qwen3_next": "qwen3_next-tiny"}
# A tensor's gradient error is measured against its norm, or 1e-3 of the whole gradient's where that is
# larger: at transformers' init (A up to 16: fast decay) the decay gates' gradients (A_log, dt_bias,
# in_proj_a) are ~1e-8 of it, pure cancellation, whose own relative error says nothing.
FLOOR = 1e-3


def worst_tensor_err(got: dict, want: dict) -> float:
    total = torch.cat([g.flatten() for g in want.values()]).double().norm()
    return max(((got[n].double() - g.double()).norm() / torch.maximum(g.double().norm(), FLOOR * total)).item()
               for n, g in want.items())


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference_class(config):
    import transformers
    return getattr(transformers, causal_lm_class(config).__name__.replace("CP", ""))


def step(model, ids, cp: bool):
    model.zero_grad()
    kw = dict(gather_logits=True) if cp else dict(use_cache=False)
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    if cp:
        sync_gradients(model)
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), out.logits.detach().float(), grads


def check(family: str, dtype: str, device, world: int, seq_len: int) -> list[tuple[str, float, float, bool]]:
    config = build_config(PRESETS[family], 256)
    config._attn_implementation = "sdpa"
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = False
    torch.manual_seed(0)
    ref = reference_class(config)(copy.deepcopy(config)).to(device=device, dtype=DTYPES[dtype])
    ours = causal_lm_class(config)._from_config(copy.deepcopy(config), cp_size=world).to(device=device,
                                                                                         dtype=DTYPES[dtype])
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    want, got = step(ref.train(), ids, cp=False), step(ours.train(), ids, cp=world > 1)
    tol = TOLERANCES[dtype]
    rows = [("loss", rel_err(got[0], want[0]), tol["loss"]), ("logits", rel_err(got[1], want[1]), tol["logits"]),
            ("grads (all, one vector)", rel_err(torch.cat([got[2][n].flatten() for n in want[2]]),
                                                torch.cat([g.flatten() for g in want[2].values()])), tol["grads"]),
            ("grads (worst tensor)", worst_tensor_err(got[2], want[2]), tol["grads"])]
    if tol["generate"]:
        with torch.no_grad():
            prompt = ids[:, :16]
            same = torch.equal(ref.eval().generate(prompt, max_new_tokens=8, do_sample=False),
                               ours.eval().generate(prompt, max_new_tokens=8, do_sample=False))
        rows.append(("greedy generate equal", 0.0 if same else 1.0, 0.0))
    return [(name, err, bound, err <= bound) for name, err, bound in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run on CPU (no GPU needed), fp32 only")
    p.add_argument("--families", default="qwen3_5,qwen3_next")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--seq_len", type=int, default=200)
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtypes = ["fp32"] if args.smoke else args.dtypes.split(",")
    rank = dist.get_rank() if world > 1 else 0
    ok = True
    lines = [f"{'family':<11} {'dtype':<5} {'quantity':<24} {'rel err':>9} {'bound':>8}  ok"]
    for family in args.families.split(","):
        for dtype in dtypes:
            for name, err, bound, good in check(family, dtype, device, world, args.seq_len):
                ok &= good
                lines.append(f"{family:<11} {dtype:<5} {name:<24} {err:>9.2e} {bound:>8.0e}  {'yes' if good else 'NO'}")
    if rank == 0:
        print(f"Qwen CP={world} vs transformers, one process, on {device}:\n" + "\n".join(lines))
    if world > 1:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
