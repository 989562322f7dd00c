"""CPU speed of our torch backend vs transformers' pure-PyTorch GDN (forward and forward+backward).

    python scripts/bench_cpu.py [--T 4096 --H 4 --K 64 --V 128 --repeats 3]

Both run in this process on the same inputs; transformers' `torch_chunk_gated_delta_rule` is called
through `__wrapped__` so its hub-kernel decorator cannot swap in another implementation. Prints a
table of median times and the speed-up; first checks that both agree: the forward outputs must be
within MAX_REL_DIFF = 1e-4 (relative Frobenius norm; both run in fp32), else it exits 1 without timing.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule  # noqa: E402

from fla_cp.ops import chunk_cp_gated_delta_rule  # noqa: E402

hf_gdn = getattr(torch_chunk_gated_delta_rule, "__wrapped__", torch_chunk_gated_delta_rule)

# Both run in fp32 and differ only in the order of their sums: measured 3e-8 to 3e-7 for T = 64..8192
# (K = 64/128). 1e-4 leaves ~300x room for that and still catches outputs 0.1% off (1e-3).
MAX_REL_DIFF = 1e-4


def inputs(B, T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen))
    beta = torch.rand(B, T, H, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def ours(q, k, v, g, beta):
    return chunk_cp_gated_delta_rule(q, k, v, g, beta, backend="torch")[0]


def theirs(q, k, v, g, beta):
    # transformers l2-normalises nothing unless asked; same scale (K^-0.5) and layout as ours
    return hf_gdn(q, k, v, g, beta, chunk_size=64)[0]


def timed(fn, xs, backward, repeats):
    times = []
    for _ in range(repeats + 1):          # first call warms up allocator and caches
        for x in xs:
            x.grad = None
        t0 = time.perf_counter()
        if backward:
            fn(*xs).sum().backward()
        else:
            with torch.no_grad():
                fn(*xs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def positive_int(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=positive_int, default=1)
    p.add_argument("--T", type=positive_int, default=4096)
    p.add_argument("--H", type=positive_int, default=4)
    p.add_argument("--K", type=positive_int, default=64)
    p.add_argument("--V", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per measurement (median)")
    args = p.parse_args(argv)
    xs = inputs(args.B, args.T, args.H, args.K, args.V)

    with torch.no_grad():
        a, b = ours(*xs), theirs(*xs)
    err = ((a - b).norm() / b.norm()).item()
    print(f"B={args.B} T={args.T} H={args.H} K={args.K} V={args.V}  threads={torch.get_num_threads()}  "
          f"torch {torch.__version__}  rel diff ours vs transformers: {err:.1e} (max {MAX_REL_DIFF:g})")
    if not err <= MAX_REL_DIFF:          # also catches nan
        print(f"FAIL: the outputs disagree (rel diff {err:.1e} > {MAX_REL_DIFF:g}): not timing them", file=sys.stderr)
        return 1
    print(f"{'pass':<18}{'transformers (s)':>18}{'fla_cp torch (s)':>18}{'speed-up':>10}")
    for name, backward in (("forward", False), ("forward+backward", True)):
        t_hf = timed(theirs, xs, backward, args.repeats)
        t_us = timed(ours, xs, backward, args.repeats)
        print(f"{name:<18}{t_hf:>18.3f}{t_us:>18.3f}{t_hf / t_us:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
