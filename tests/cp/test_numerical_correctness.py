"""Numerical correctness of context parallelism against one process, in the style of TransformerEngine.

    python tests/cp/test_numerical_correctness.py --mode single --save_ref
    torchrun --nproc_per_node=2 tests/cp/test_numerical_correctness.py --mode cp --cp_size 2
    (add --hybrid to both for a GDN + softmax-attention model; --attention_kernel picks its kernel)
    pytest tests/cp/test_numerical_correctness.py          # the same check in-process for P=2 (gloo)

On fixed batches (a dense batch of 2 rows and a packed row of documents with global cu_seqlens) the
model's logits, loss and every parameter gradient are compared with the single-process reference,
then K optimizer steps (SGD and AdamW) are compared parameter by parameter ("golden training"). The
report prints every check with pass/fail; the exit code is non-zero when any check fails.

Bounds. fp32: everything within 1e-5 relative (logits elementwise |a-b| <= 1e-5 (1 + |b|); loss;
gradients and parameters as max|a-b| / max|b| per tensor). bf16 (parameters and activations in
bf16): >= 85% of logits within 2e-2, loss within 5%, gradients max abs diff <= 0.05.
AdamW after K steps: max|a-b| / max|b| <= 1e-3 per tensor. Why looser than SGD: Adam divides by
sqrt(v) + eps, so on its first steps an element's update is about lr * g / |g|, whatever |g| is. An
element whose gradient is ~1e-7 (pure rounding noise between two exact-in-math summation orders)
moves by ~lr in one run and by a different ~lr in the other, so one parameter can differ by O(lr)
while SGD moves it by lr * 1e-7. With lr = 1e-3 and weights of O(0.1-1), 1e-3 relative bounds that
worst element while still catching a real bug (a wrong gradient moves most elements by ~lr).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run from a checkout without installing

DEFAULT_REF = "runs/numerical_ref/reference.pt"

# model and data of the check (small enough for a CPU, large enough for several chunks per rank)
MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 32, "expand_v": 1.0,
         "hidden_ratio": 2, "vocab_size": 257}
SEQ_LEN = 320          # dense rows: 2 x 320;  packed row: 320 tokens, documents below
DOC_LENS = [7, 150, 1, 3, 90, 69]   # a 1-token doc, docs crossing every P=2/3/4 boundary, short tail docs
TRAIN_LR = {"sgd": 0.1, "adamw": 1e-3}
# --hybrid: 4 layers, softmax attention (FLA `attn` specs) in layer 1 (full, GQA) and 3 (window 64)
HYBRID = {"num_hidden_layers": 4,
          "attn": [{"layers": [1], "num_heads": 4, "num_kv_heads": 2},
                   {"layers": [3], "num_heads": 4, "num_kv_heads": 2, "window_size": 64}]}
RUN = {"hybrid": False, "attention_kernel": "auto"}      # set from the command line

TOLERANCES = {
    "fp32": {"logits_rtol": 1e-5, "logits_atol": 1e-5, "logits_share": 1.0, "loss_rel": 1e-5, "grad_rel": 1e-5,
             "grad_abs": None, "sgd_rel": 1e-5, "adamw_rel": 1e-3},
    "bf16": {"logits_rtol": 2e-2, "logits_atol": 2e-2, "logits_share": 0.85, "loss_rel": 0.05, "grad_rel": None,
             "grad_abs": 0.05, "sgd_rel": None, "adamw_rel": None},
}


# ----------------------------------------------------------------------------------------------
# inputs and one run
# ----------------------------------------------------------------------------------------------
def make_batches(seed: int = 1234) -> dict:
    """Fixed inputs: "dense" [2, SEQ_LEN] (some labels ignored) and "packed" [1, SEQ_LEN] + cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    vocab = MODEL["vocab_size"]
    ids = torch.randint(0, vocab, (2, SEQ_LEN), generator=g)
    labels = ids.clone()
    labels[:, 100:110] = -100
    assert sum(DOC_LENS) == SEQ_LEN
    cu = torch.tensor([0] + DOC_LENS).cumsum(0)
    pids = torch.randint(0, vocab, (1, SEQ_LEN), generator=g)
    plabels = pids.clone()
    plabels[0, cu[:-1]] = -100            # no prediction across a document boundary
    return {"dense": {"input_ids": ids, "labels": labels, "cu_seqlens": None},
            "packed": {"input_ids": pids, "labels": plabels, "cu_seqlens": cu}}


def train_batches(steps: int, seed: int = 99) -> list[dict]:
    """K packed batches of real text (the standard library's sources) for the golden training check."""
    from fla_cp.data import ByteTokenizer, Corpus, Packer
    packer = Packer(Corpus(None), ByteTokenizer(), SEQ_LEN, seed=seed)
    out = []
    for _ in range(steps):
        b = packer.next_batch(1)
        out.append({"input_ids": b.input_ids, "labels": b.labels, "cu_seqlens": b.cu_seqlens})
    return out


def build_model(dtype: str, cp_size: int, device_mesh=None, cp_group=None, layout: str = "contiguous"):
    import fla_cp  # noqa: F401
    from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM
    from fla_cp.utils.configs import model_config_kwargs
    torch.manual_seed(0)
    sizes = {**{k: v for k, v in MODEL.items() if k != "vocab_size"}, **(HYBRID if RUN["hybrid"] else {})}
    kwargs = model_config_kwargs("tiny", MODEL["vocab_size"], **sizes)
    config = GatedDeltaNetCPConfig(**kwargs, cp_size=cp_size, cp_layout=layout)
    model = GatedDeltaNetCPForCausalLM(config, device_mesh=device_mesh, cp_group=cp_group)
    for layer in model.model.layers:
        if hasattr(layer.attn, "window_size") and not hasattr(layer.attn, "A_log"):    # AttentionCP
            layer.attn.backend = RUN["attention_kernel"]
    return model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)


def _forward(model, batch, device):
    kw = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
    return model(**kw, gather_logits=True) if model.cp_size > 1 else model(**kw)


def run_once(model, batch, device) -> dict:
    """Logits (full sequence), loss and every parameter's gradient of one forward+backward."""
    from fla_cp.models import sync_gradients
    model.zero_grad(set_to_none=True)
    out = _forward(model, batch, device)
    out.loss.backward()
    sync_gradients(model)
    return {"logits": out.logits.detach().float().cpu(), "loss": out.loss.item(),
            "grads": {n: p.grad.detach().float().cpu().clone()
                      for n, p in model.named_parameters() if p.grad is not None}}


def train(model, batches, optimizer: str, device) -> dict:
    from fla_cp.models import sync_gradients
    lr = TRAIN_LR[optimizer]
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        out = _forward(model, batch, device)
        out.loss.backward()
        sync_gradients(model)
        opt.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        losses.append(_forward(model, batches[0], device).loss.item())   # after the last step, on batch 0
    return {"losses": losses, "params": {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}}


def compute(dtype: str, train_steps: int, cp_size: int = 1, device="cpu", device_mesh=None, cp_group=None,
            layout: str = "contiguous") -> dict:
    """Everything the check compares, for one dtype: single-process when cp_size == 1."""
    res = {}
    model = build_model(dtype, cp_size, device_mesh, cp_group, layout).to(device)
    for name, batch in make_batches().items():
        res[name] = run_once(model, batch, device)
    if dtype == "fp32" and train_steps > 0:
        batches = train_batches(train_steps)
        for opt in ("sgd", "adamw"):
            res[f"train_{opt}"] = train(build_model(dtype, cp_size, device_mesh, cp_group, layout).to(device),
                                        batches, opt, device)
    return res


# ----------------------------------------------------------------------------------------------
# comparison and report
# ----------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    value: str
    bound: str
    passed: bool


@dataclass
class Report:
    title: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name, value, bound, passed):
        self.checks.append(Check(name, value, bound, bool(passed)))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def render(self) -> str:
        w = max(len(c.name) for c in self.checks) if self.checks else 10
        lines = ["=" * 96, self.title, "=" * 96]
        for c in self.checks:
            lines.append(f"  [{'PASS' if c.passed else 'FAIL'}] {c.name.ljust(w)}  {c.value:<28} bound {c.bound}")
        n_fail = sum(not c.passed for c in self.checks)
        lines += ["-" * 96, f"  {len(self.checks) - n_fail}/{len(self.checks)} checks passed"
                  + ("" if n_fail == 0 else f", {n_fail} FAILED"), "=" * 96]
        return "\n".join(lines)


def _short(name: str) -> str:
    return name.removeprefix("model.").replace("layers.", "L").replace(".weight", "")


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(cp: dict, ref: dict, dtype: str, report: Report) -> None:
    tol = TOLERANCES[dtype]
    for case in ("dense", "packed"):
        a, b = cp[case], ref[case]
        if a["logits"].shape != b["logits"].shape:
            report.add(f"{dtype} {case}: logits shape", str(tuple(a["logits"].shape)),
                       str(tuple(b["logits"].shape)), False)
            continue
        within = ((a["logits"] - b["logits"]).abs() <= tol["logits_atol"] + tol["logits_rtol"] * b["logits"].abs())
        share = within.float().mean().item()
        max_abs = (a["logits"] - b["logits"]).abs().max()
        report.add(f"{dtype} {case}: logits within tol", f"{100 * share:.3f}% (max abs {max_abs:.2e})",
                   f">= {100 * tol['logits_share']:.0f}% within {tol['logits_atol']:g} + {tol['logits_rtol']:g}|ref|",
                   share >= tol["logits_share"])
        loss_rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        report.add(f"{dtype} {case}: loss rel diff", f"{loss_rel:.2e} ({a['loss']:.6f} vs {b['loss']:.6f})",
                   f"<= {tol['loss_rel']:g}", loss_rel <= tol["loss_rel"])
        missing = sorted(set(b["grads"]) ^ set(a["grads"]))
        if missing:
            report.add(f"{dtype} {case}: gradients present", f"mismatch {missing[:3]}", "same parameter set", False)
            continue
        worst_abs = max(((a["grads"][n] - b["grads"][n]).abs().max().item(), n) for n in b["grads"])
        worst_rel = max((rel_max(a["grads"][n], b["grads"][n]), n) for n in b["grads"])
        if tol["grad_rel"] is not None:
            report.add(f"{dtype} {case}: grad max rel diff ({len(b['grads'])} tensors)",
                       f"{worst_rel[0]:.2e} ({_short(worst_rel[1])})",
                       f"<= {tol['grad_rel']:g} (max|a-b|/max|ref| per tensor)", worst_rel[0] <= tol["grad_rel"])
        report.add(f"{dtype} {case}: grad max abs diff", f"{worst_abs[0]:.2e}",
                   f"<= {tol['grad_abs']:g}" if tol["grad_abs"] is not None else "(reported)",
                   tol["grad_abs"] is None or worst_abs[0] <= tol["grad_abs"])
    for opt in ("sgd", "adamw"):
        key = f"train_{opt}"
        if key not in ref or key not in cp or tol[f"{opt}_rel"] is None:
            continue
        a, b = cp[key], ref[key]
        steps = len(b["losses"]) - 1
        worst = max((rel_max(a["params"][n], b["params"][n]), n) for n in b["params"])
        report.add(f"{dtype} train {opt} x{steps}: params rel diff", f"{worst[0]:.2e} ({_short(worst[1])})",
                   f"<= {tol[f'{opt}_rel']:g} (max|a-b|/max|ref| per tensor)", worst[0] <= tol[f"{opt}_rel"])
        loss_rel = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))
        report.add(f"{dtype} train {opt} x{steps}: losses rel diff", f"{loss_rel:.2e}",
                   f"<= {tol[f'{opt}_rel']:g}", loss_rel <= tol[f"{opt}_rel"])
        report.add(f"{dtype} train {opt} x{steps}: loss falls", f"{a['losses'][0]:.4f} -> {a['losses'][-1]:.4f}",
                   "after < before", a["losses"][-1] < a["losses"][0])


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["single", "cp"], required=True)
    p.add_argument("--cp_size", type=int, default=None, help="cp mode: default the world size")
    p.add_argument("--cp_layout", default="contiguous", choices=["contiguous", "zigzag"])
    p.add_argument("--save_ref", action="store_true", help="single mode: save the reference to --ref")
    p.add_argument("--ref", default=DEFAULT_REF)
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {', '.join(TOLERANCES)}")
    p.add_argument("--train_steps", type=int, default=None,
                   help="golden training steps (fp32 only; 0: skip). single mode: default 3; cp mode: default "
                   "the reference's count, the only other value allowed is 0")
    p.add_argument("--hybrid", action="store_true",
                   help="a hybrid model: GDN layers plus softmax attention (full and windowed), FLA's attn config")
    p.add_argument("--attention_kernel", default="auto", choices=["auto", "torch", "sdpa", "flash"],
                   help="the attention layers' kernel (--hybrid): auto picks flash-attn on CUDA for bf16 "
                   "when installed, else SDPA on CUDA, else torch")
    args = p.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    bad = [dt for dt in args.dtypes if dt not in TOLERANCES]      # e.g. fp16: no bounds, no reference for it
    if bad:
        p.error(f"--dtypes: unsupported {bad} (supported: {', '.join(TOLERANCES)})")
    if args.train_steps is not None and args.train_steps < 0:
        p.error("--train_steps must be >= 0")
    return args


def cp_train_steps(requested: int | None, saved: int) -> int:
    """Training steps of a cp run: the reference's (it holds the parameters after exactly that many
    steps), or 0 to skip the training checks. Raises ValueError for any other count."""
    if requested is None or requested == saved:
        return saved
    if requested == 0:
        return 0
    raise ValueError(f"--train_steps {requested}: the reference has {saved} training steps "
                     f"(use {saved}, or 0 to skip the training checks)")


def main(argv=None) -> int:
    args = get_args(argv)
    RUN.update(hybrid=args.hybrid, attention_kernel=args.attention_kernel)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dtypes = args.dtypes
    if args.mode == "single":
        device = "cuda" if torch.cuda.is_available() else "cpu"      # where the CP run will compute too
        train_steps = 3 if args.train_steps is None else args.train_steps
        results = {dt: compute(dt, train_steps, device=device) for dt in dtypes}
        for dt, res in results.items():
            print(f"{dt}: dense loss {res['dense']['loss']:.6f}, packed loss {res['packed']['loss']:.6f}"
                  + "".join(f", {k} losses {[round(x, 4) for x in v['losses']]}"
                            for k, v in res.items() if k.startswith("train")))
        if args.save_ref:
            Path(args.ref).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"results": results, "train_steps": train_steps, "hybrid": args.hybrid}, args.ref)
            print(f"saved reference to {args.ref}")
        return 0

    import torch.distributed as dist

    from fla_cp.models import init_cp_mesh
    from fla_cp.ops.comm import collective_device
    from fla_cp.utils.dist import cleanup_distributed, init_distributed
    # one process would compare cp_size=1 with itself and pass: refuse before creating any group
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        print("error: --mode cp needs at least 2 ranks, e.g. `torchrun --nproc_per_node=2 "
              "tests/cp/test_numerical_correctness.py --mode cp`", file=sys.stderr)
        return 2
    info = init_distributed()
    cp_size = args.cp_size or info.world_size
    if info.world_size != cp_size:
        if info.is_main:
            print(f"error: the check runs one CP group: launch {cp_size} ranks (world is {info.world_size})",
                  file=sys.stderr)
        cleanup_distributed(info)
        return 2
    if not Path(args.ref).is_file():
        if info.is_main:
            print(f"error: no reference at {args.ref}: run --mode single --save_ref first", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    saved = torch.load(args.ref, weights_only=False)
    if saved.get("hybrid", False) != args.hybrid:
        if info.is_main:
            print(f"error: the reference at {args.ref} was saved {'with' if saved.get('hybrid') else 'without'} "
                  f"--hybrid: pass the same", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    try:
        train_steps = cp_train_steps(args.train_steps, saved["train_steps"])
    except ValueError as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        cleanup_distributed(info)
        return 2
    mesh = init_cp_mesh(cp_size, device_type=info.device.type)
    model_desc = {**MODEL, **HYBRID, "attention_kernel": args.attention_kernel} if args.hybrid else MODEL
    report = Report(f"Context parallelism vs single process | cp_size={cp_size} layout={args.cp_layout} "
                    f"backend={info.backend} device={info.device} | model {model_desc} | reference {args.ref}")
    for dt in dtypes:
        if dt not in saved["results"]:
            report.add(f"{dt}: reference present", "missing", f"saved with --dtypes {dt}", False)
            continue
        res = compute(dt, train_steps, cp_size, info.device, device_mesh=mesh, layout=args.cp_layout)
        compare(res, saved["results"][dt], dt, report)
    ok = torch.tensor([float(report.passed)], device=collective_device(dist.group.WORLD))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if info.is_main:
        print(report.render(), flush=True)
    cleanup_distributed(info)
    return 0 if ok.item() == 1.0 else 1


# ----------------------------------------------------------------------------------------------
# pytest: the same check, in-process, P = 2 over gloo
# ----------------------------------------------------------------------------------------------
def _cp_rank(rank, world_size, dtypes, train_steps):
    from fla_cp.models import init_cp_mesh
    torch.set_num_threads(1)
    mesh = init_cp_mesh(world_size, device_type="cpu")
    return {dt: compute(dt, train_steps, world_size, "cpu", device_mesh=mesh) for dt in dtypes}


def test_cp2_matches_single_fp32_bf16_and_training():
    """fp32 (strict, plus 2 golden SGD/AdamW steps) and bf16 (loose): both CP ranks vs one process."""
    from _dist import run_ranks  # tests/cp is on sys.path (conftest.py)
    torch.set_num_threads(1)
    dtypes, steps = ("fp32", "bf16"), 2
    per_rank = run_ranks(_cp_rank, 2, args=(dtypes, steps), timeout=400)   # one spawn for everything
    failures = []
    for dt in dtypes:
        ref = compute(dt, steps)
        for rank, res in enumerate(per_rank):
            report = Report(f"P=2 rank {rank} vs single ({dt})")
            compare(res[dt], ref, dt, report)
            assert len(report.checks) == (14 if dt == "fp32" else 6), report.render()
            if not report.passed:
                failures.append(report.render())
    assert not failures, "\n".join(failures)


def _cli_rank(rank, world_size, runs):
    return [main(argv) for argv in runs]


def test_cli_single_then_cp_exit_codes(tmp_path):
    """The command-line modes end to end: exit 0 against a true reference, 1 against a doctored one;
    --train_steps 0 skips the reference's training checks, another count than the reference's is refused."""
    from _dist import run_ranks     # tests/cp is on sys.path (conftest.py)
    ref, bad, trained = str(tmp_path / "ref.pt"), str(tmp_path / "bad.pt"), str(tmp_path / "trained.pt")
    common = ["--dtypes", "fp32", "--train_steps", "0"]
    assert main(["--mode", "single", "--save_ref", "--ref", ref, *common]) == 0
    saved = torch.load(ref, weights_only=False)
    fp32 = saved["results"]["fp32"]
    # a reference "trained" 1 step with parameters no run can match: a cp run that trains fails on it
    zeros = {n: torch.zeros_like(g) for n, g in fp32["dense"]["grads"].items()}
    torch.save({"results": {"fp32": {**fp32, **{f"train_{opt}": {"losses": [1.0, 1.0], "params": zeros}
                                                for opt in ("sgd", "adamw")}}}, "train_steps": 1}, trained)
    grads = fp32["packed"]["grads"]
    name = next(iter(grads))
    grads[name] = grads[name] * (1 + 1e-3)            # a 0.1% gradient error must fail the fp32 check
    torch.save(saved, bad)
    # the hybrid model (GDN + full and windowed attention layers); a reference of the other model is refused
    hybrid = str(tmp_path / "hybrid.pt")
    assert main(["--mode", "single", "--hybrid", "--save_ref", "--ref", hybrid, *common]) == 0
    runs = [["--mode", "cp", "--ref", ref, *common],
            ["--mode", "cp", "--ref", bad, *common],
            ["--mode", "cp", "--ref", trained, *common],
            ["--mode", "cp", "--ref", trained, "--dtypes", "fp32", "--train_steps", "2"],
            ["--mode", "cp", "--hybrid", "--ref", hybrid, *common],
            ["--mode", "cp", "--hybrid", "--cp_layout", "zigzag", "--attention_kernel", "sdpa", "--ref", hybrid,
             *common],
            ["--mode", "cp", "--ref", hybrid, *common]]
    codes = run_ranks(_cli_rank, 2, args=(runs,), timeout=300)
    assert codes == [[0, 1, 0, 2, 0, 0, 2], [0, 1, 0, 2, 0, 0, 2]]


def test_report_fails_on_a_wrong_gradient():
    """The comparison must catch a real error (guards against a check that cannot fail)."""
    g = torch.Generator().manual_seed(0)
    ref = {c: {"logits": torch.randn(1, 8, 5, generator=g), "loss": 2.0,
               "grads": {"a.w.x": torch.randn(4, 4, generator=g)}} for c in ("dense", "packed")}
    good = {c: {"logits": v["logits"].clone(), "loss": 2.0, "grads": {"a.w.x": v["grads"]["a.w.x"].clone()}}
            for c, v in ref.items()}
    report = Report("identical")
    compare(good, ref, "fp32", report)
    assert report.passed
    bad = {c: {**v, "grads": {"a.w.x": v["grads"]["a.w.x"] * (1 + 1e-4)}} for c, v in good.items()}
    report = Report("perturbed")
    compare(bad, ref, "fp32", report)
    assert not report.passed
    assert [c.name for c in report.checks if not c.passed] == ["fp32 dense: grad max rel diff (1 tensors)",
                                                                "fp32 packed: grad max rel diff (1 tensors)"]


if __name__ == "__main__":
    sys.exit(main())
