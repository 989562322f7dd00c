"""Registers, spills and shared memory of fla_cp's Triton summary kernels, compiled without a GPU.

    python scripts/kernel_resources.py                  # sm_90 (H100/H200), every shape/dtype/config
    python scripts/kernel_resources.py --arch 80 --shapes main

Triton compiles for a named target on any machine (its wheel carries LLVM and ptxas), so the cost a
kernel pays in registers is known before a GPU is at hand. For each summary kernel (forward `[H|M]`,
backward `[G|M]`), shape, input dtype, with/without the M columns and each autotuning config, this
prints what `ptxas -v` reports: registers per thread, spill stores, stack, and whether ptxas had to
serialise the Hopper wgmma instructions for lack of registers. Spills and serialised wgmma are the
things to avoid in the configs the autotuner can pick, and above all in the first (untuned) one.
Running times still need a GPU (`scripts/bench_op.py`).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_resources.py compiles kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fla_cp.ops.triton import chunk_summary as cs  # noqa: E402
from fla_cp.ops.triton.utils import FP32_DOT_PRECISION  # noqa: E402

SHAPES = {
    "main": dict(H=16, HV=16, K=128, V=256),   # bench_op.py's main shape
    "fla": dict(H=6, HV=6, K=256, V=512),      # FLA's GatedDeltaNet layer defaults
    "small": dict(H=4, HV=8, K=64, V=64),
}
TYPES = {"bf16": "*bf16", "fp32": "*fp32"}


def compile_kernel(kind: str, shape: dict, dtype: str, with_m: bool, config: triton.Config, arch: int):
    """Compile one variant exactly as `chunk_summary_fwd/_bwd` would launch it."""
    K, V = shape["K"], shape["V"]
    BK, BV = cs._blocks(K, V)
    x = TYPES[dtype]
    if kind == "fwd":
        fn = cs.chunk_summary_fwd_kernel
        sig = dict(k=x, w=x, u=x, g="*fp32", hm="*fp32", cu_seqlens="*i64", seg_ids="*i32")
    else:
        fn = cs.chunk_summary_bwd_kernel
        sig = dict(q=x, k=x, w=x, g="*fp32", do=x, gm="*fp32", cu_seqlens="*i64", seg_ids="*i32", scale="fp32")
    const = dict(H=shape["H"], HV=shape["HV"], K=K, V=V, W=V + K if with_m else V, BT=64, BK=BK, BV=BV,
                 NV=triton.cdiv(V, BV), WITH_M=with_m, FP32_STATE=dtype == "fp32", PRECISION=FP32_DOT_PRECISION)
    sig.update({name: "constexpr" for name in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages)), BK, BV


def ptxas_report(ptx: str, arch: int) -> dict:
    """Parse `ptxas -v` on the kernel's PTX (the ptxas Triton itself uses for this arch)."""
    from triton.backends.nvidia.compiler import get_ptxas
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        run = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    log = run.stdout + run.stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill=num(r"(\d+) bytes spill stores"),
                stack=num(r"(\d+) bytes stack frame"), wgmma_serialized="serialized" in log)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100/H200)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=list(TYPES))
    args = p.parse_args(argv)
    header = f"{'kernel':6} {'shape':6} {'dtype':5} {'M':2} {'BK':>4} {'BV':>3} {'warps':>5} {'stages':>6} " \
             f"{'regs':>4} {'spill B':>7} {'stack B':>7} {'smem KiB':>8}  note"
    print(f"# sm_{args.arch} | triton {triton.__version__} | fp32 dots: {FP32_DOT_PRECISION} | "
          f"first config = untuned default (FLA_CP_AUTOTUNE=0)")
    print(header)
    print("-" * len(header))
    rows = []
    for kind in ("fwd", "bwd"):
        for name in args.shapes:
            for dtype in args.dtypes:
                for with_m in (False, True):
                    for i, config in enumerate(cs._CONFIGS):
                        cc, BK, BV = compile_kernel(kind, SHAPES[name], dtype, with_m, config, args.arch)
                        r = ptxas_report(cc.asm["ptx"], args.arch)
                        note = ("default " if i == 0 else "") + ("wgmma serialized" if r["wgmma_serialized"] else "")
                        rows.append(dict(kind=kind, shape=name, dtype=dtype, with_m=with_m, config=config, **r,
                                         smem=cc.metadata.shared))
                        print(f"{kind:6} {name:6} {dtype:5} {'y' if with_m else 'n':2} {BK:>4} {BV:>3} "
                              f"{config.num_warps:>5} {config.num_stages:>6} {r['regs']:>4} {r['spill']:>7} "
                              f"{r['stack']:>7} {cc.metadata.shared / 1024:>8.1f}  {note}", flush=True)
    return rows


if __name__ == "__main__":
    main()
