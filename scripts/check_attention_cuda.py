"""On one GPU: `attend_flash` (flash-attn, bf16) and `attend_sdpa` (torch SDPA, bf16 and fp32) vs the torch
kernel `_attend` in fp64, on the parts `attention_cp` builds; exits 1 on a mismatch.

    python scripts/check_attention_cuda.py                 # one GPU
    python scripts/check_attention_cuda.py --seeds 3 --size 32
    python scripts/check_attention_cuda.py --smoke         # CPU, no GPU: the plumbing (flash-attn replaced
                                                           # by tests/cp/_flash_stand_in.py), not the kernels

A case is one local part of a global stream (documents from cu_seqlens, or dense rows with left and right
padding): its queries, and its keys as `attention_cp` gathers them (full: from the start of the first
query's document; window: the W - 1 halo rows before the part, rows before the stream in no document).
Inputs are drawn in fp32 and cast to the checked dtype; the reference runs `_attend` in fp64 on those same
values. Every kernel is checked on its output o and the gradients dq, dk, dv of sum(o * w): relative error
in norm (absolute where the reference is 0). Bounds: fp32 1e-5 (TF32 off: `allow_tf32 = False`; SDPA's
memory-efficient kernel computes fp32 matmuls as 3xTF32 on Ampere and later, fp32-accurate), bf16 2e-2
(FLA's tolerance for bf16 kernels). The "torch" rows (`_attend`: fp32 math on the same inputs) show what
error the dtype alone brings. Also checks `resolve_attention_kernel`'s choices on this device.

Only `_attend`, `attend_flash`, `attend_sdpa` and `resolve_attention_kernel` are called, not `attention_cp`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout without installing

import torch

BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# lengths at --size 1; positions, documents, parts and windows scale with --size (16 by default on GPU:
# 2048-token packed streams, 1024-token dense rows, windows of 256 / 128 / 64)
PACKED = [0, 19, 20, 88, 124, 128]     # part [32, 96): document [20, 88) starts before it, [88, 124) runs past
CASES = [
    {"name": "packed_full_gqa", "cu": PACKED, "part": (32, 96), "H": 8, "Hkv": 2, "D": 64},
    {"name": "packed_window_gqa", "cu": PACKED, "part": (32, 96), "H": 8, "Hkv": 2, "D": 64, "W": 16},
    {"name": "packed_non_causal_dv", "cu": PACKED, "part": (32, 96),
     "H": 8, "Hkv": 4, "D": 64, "Dv": 32, "causal": False},
    {"name": "stream_start_window_mqa", "cu": PACKED, "part": (0, 32), "H": 8, "Hkv": 1, "D": 64, "W": 4},
    {"name": "dense_pad_full_mha", "B": 2, "T": 64, "part": (16, 64), "H": 8, "Hkv": 8, "D": 128, "pad": (19, 6)},
    {"name": "dense_pad_window_mqa", "B": 2, "T": 64, "part": (16, 64),
     "H": 8, "Hkv": 1, "D": 64, "W": 8, "pad": (19, 6)},
]


def doc_of(cu: list[int], pos: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(torch.tensor(cu), pos, right=True) - 1


def make_case(case: dict, size: int, seed: int, dtype, device):
    """The part's inputs at `size` times the listed lengths (positions etc. on the host, tensors on device)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    B = case.get("B", 1)
    cu = [size * x for x in case.get("cu", [0, case.get("T", 0)])]
    T = cu[-1]
    causal = case.get("causal", True)
    W = case["W"] * size if case.get("W") else None
    p0, p1 = (size * x for x in case["part"])
    qpos = torch.arange(p0, p1)
    if W is not None:
        kpos = torch.arange(p0 - min(W - 1, T - 1), p1)
    else:
        k0 = cu[int(doc_of(cu, torch.tensor([p0])))]
        k1 = p1 if causal else cu[int(doc_of(cu, torch.tensor([p1 - 1]))) + 1]
        kpos = torch.arange(k0, k1)
    qdoc = doc_of(cu, qpos)
    kdoc = torch.where(kpos < 0, torch.full_like(kpos, -1), doc_of(cu, kpos.clamp_min(0)))
    key_valid = query_valid = None
    if case.get("pad"):
        valid = torch.ones(B, T, dtype=torch.bool)
        left, right = (size * x for x in case["pad"])
        valid[0, :left] = False
        valid[B - 1, T - right:] = False
        key_valid = torch.zeros(B, kpos.numel(), dtype=torch.bool)
        inside = kpos >= 0
        key_valid[:, inside] = valid[:, kpos[inside]]
        key_valid, query_valid = key_valid.to(device), valid[:, qpos].to(device)
    allowed = (qdoc[:, None] == kdoc[None, :]) & (kdoc[None, :] >= 0)
    if causal:
        allowed &= kpos[None, :] <= qpos[:, None]
    if W is not None:
        allowed &= qpos[:, None] - kpos[None, :] < W
    n, m = qpos.numel(), kpos.numel()
    H, Hkv, D = case["H"], case["Hkv"], case["D"]
    Dv = case.get("Dv", D)
    q, k, v, w = (torch.randn(*shape, generator=gen, device=device).to(dtype)
                  for shape in ((B, n, H, D), (B, m, Hkv, D), (B, m, Hkv, Dv), (B, n, H, Dv)))
    return {"q": q, "k": k, "v": v, "w": w, "qpos": qpos, "kpos": kpos, "qdoc": qdoc, "kdoc": kdoc,
            "key_valid": key_valid, "query_valid": query_valid, "allowed": allowed.to(device),
            "causal": causal, "window": W, "scale": D ** -0.5}


def run(kernel: str, c: dict, cdt=None):
    """o, dq, dk, dv of sum(o * w) through one kernel; "torch" computes in cdt (fp32 or fp64) on c's dtype
    (fp64: inputs upcast first, the reference)."""
    from fla_cp.ops.attention import _attend
    from fla_cp.ops.attention_kernels import attend_flash, attend_sdpa
    q, k, v, w = c["q"], c["k"], c["v"], c["w"]
    if cdt == torch.float64:
        q, k, v, w = q.double(), k.double(), v.double(), w.double()
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    B, m, Hkv, D = k.shape
    Dv = v.shape[-1]
    if kernel == "torch":
        kv = torch.cat([k.reshape(B, m, Hkv * D), v.reshape(B, m, Hkv * Dv)], -1)
        o = _attend(q, kv, c["allowed"], c["key_valid"], c["query_valid"], Hkv, D, Dv, c["scale"],
                    cdt or torch.float32).to(q.dtype)
    elif kernel == "sdpa":
        o = attend_sdpa(q, k, v, c["allowed"], c["key_valid"], c["query_valid"], c["scale"])
    else:
        o = attend_flash(q, k, v, c["qpos"], c["kpos"], c["qdoc"], c["kdoc"], c["key_valid"], c["query_valid"],
                         c["causal"], c["window"], c["scale"])
    assert o.dtype == q.dtype and tuple(o.shape) == (*q.shape[:3], Dv), (o.dtype, o.shape)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    return [x.detach() for x in (o, *grads)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in norm; absolute (max) where the reference is 0 up to rounding."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    if b.norm() <= 1e-6 * b.numel() ** 0.5:
        return (a - b).abs().max().item() if b.numel() else 0.0
    return ((a - b).norm() / b.norm()).item()


def timed(fn, device, reps: int) -> float:
    """Median wall time of fn() in ms (forward + backward), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def check_resolve(device, flash_ok: bool) -> list[str]:
    """`resolve_attention_kernel`'s choices on this device; the list of failures."""
    from fla_cp.ops.attention_kernels import resolve_attention_kernel
    failures = []
    bf16 = torch.zeros(1, 4, 2, 64, device=device, dtype=torch.bfloat16)
    fp32 = bf16.float()
    on_cuda = device.type == "cuda"
    want = [("auto", bf16, "flash" if flash_ok and on_cuda else ("sdpa" if on_cuda else "torch")),
            ("auto", fp32, "sdpa" if on_cuda else "torch"), ("sdpa", fp32, "sdpa"), ("torch", bf16, "torch")]
    for backend, q, expected in want:
        got = resolve_attention_kernel(backend, q)
        print(f"resolve_attention_kernel({backend!r}, {q.dtype} on {q.device.type}) = {got!r}")
        if got != expected:
            failures.append(f"resolve {backend} {q.dtype}: {got!r}, expected {expected!r}")
    for q in (fp32,) + (() if flash_ok and on_cuda else (bf16,)):
        try:
            resolve_attention_kernel("flash", q)
            failures.append(f"resolve flash {q.dtype}: no ValueError")
        except ValueError as e:
            print(f"resolve_attention_kernel('flash', {q.dtype}): ValueError: {e}")
    return failures


def main(argv=None) -> int:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="random inputs per case (default 2)")
    parser.add_argument("--size", type=int, default=None,
                        help="length multiplier of the cases (default 16 on GPU: 2048-token streams; 1 with --smoke)")
    parser.add_argument("--time", type=int, default=0, metavar="REPS",
                        help="also time forward + backward of each kernel (median of REPS calls, ms)")
    parser.add_argument("--smoke", action="store_true",
                        help="run on CPU with flash-attn replaced by the test stand-in (checks this script)")
    args = parser.parse_args(argv)
    for name in ("seeds", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.time < 0:
        parser.error(f"--time must be >= 0, got {args.time}")

    from fla_cp.ops import attention_kernels as ak
    if args.smoke:
        device, size = torch.device("cpu"), args.size or 1
        sys.path.insert(0, str(ROOT / "tests" / "cp"))
        from _flash_stand_in import flash_attn_varlen_func
        ak._FLASH_VARLEN = flash_attn_varlen_func
        flash_ok = True
        print("--smoke: CPU, flash-attn replaced by tests/cp/_flash_stand_in.py (fp64 inside); the errors "
              "check the plumbing only")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: nothing checked (--smoke runs the plumbing on CPU)")
            return 2
        device, size = torch.device("cuda", torch.cuda.current_device()), args.size or 16
        # fp32 means fp32: cuBLAS matmuls of the references and of the torch kernel without TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        flash_ok = ak.flash_attn_varlen() is not None
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        if flash_ok:
            import flash_attn
            print(f"flash-attn {getattr(flash_attn, '__version__', '?')}")
        else:
            print("NOTE: flash-attn is not installed: attend_flash is skipped")

    failures = check_resolve(device, flash_ok)
    kernels = [("torch", torch.float32), ("sdpa", torch.float32), ("torch", torch.bfloat16),
               ("sdpa", torch.bfloat16)]
    if flash_ok:
        kernels.append(("flash", torch.bfloat16))
    header = f"{'kernel':6} {'dtype':8} {'case':26} {'o':>8} {'dq':>8} {'dk':>8} {'dv':>8} {'bound':>7}"
    print("\n" + header + ("  fwd+bwd ms" if args.time else "") + "\n" + "-" * len(header))
    for case in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            worst = {}
            for seed in range(args.seeds):
                c = make_case(case, size, seed, dtype, device)
                ref = run("torch", c, torch.float64)
                for kernel, kdt in kernels:
                    if kdt != dtype:
                        continue
                    try:
                        errs = [rel_err(a, b) for a, b in zip(run(kernel, c), ref)]
                    except Exception as e:  # noqa: BLE001 - a kernel that fails is a failed check, reported
                        errs = [float("inf")] * 4
                        failures.append(f"{kernel} {dtype} {case['name']} seed={seed}: {type(e).__name__}: {e}")
                    old = worst.get(kernel, [0.0] * 4)
                    worst[kernel] = [max(x, y) for x, y in zip(old, errs)]
            for kernel, errs in worst.items():
                bound = BOUND[dtype]
                ok = max(errs) <= bound
                line = (f"{kernel:6} {str(dtype).replace('torch.', ''):8} {case['name']:26} "
                        + " ".join(f"{e:8.1e}" for e in errs) + f" {bound:7.0e}")
                if args.time:
                    c = make_case(case, size, 0, dtype, device)
                    line += f"  {timed(lambda k=kernel, c=c: run(k, c), device, args.time):10.2f}"
                print(line + ("" if ok else "  FAIL"))
                if not ok:
                    failures.append(f"{kernel} {dtype} {case['name']}: errors {errs} > {bound}")
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(failures))
        return 1
    print("\nall kernels within bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
