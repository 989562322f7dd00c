"""Registers, spills and shared memory of fla_cp's Triton summary kernels, compiled without a GPU.

    python scripts/kernel_resources.py                  # sm_90 (H100/H200), every shape/dtype/config
    python scripts/kernel_resources.py --arch 80 --shapes main
    python scripts/kernel_resources.py --default-only    # what an untuned launch compiles to
    python scripts/kernel_resources.py --dtypes bf16 --fla  # and FLA's own fwd_h kernel for reference

Triton compiles for a named target on any machine (its wheel carries LLVM and ptxas), so the cost a
kernel pays in registers is known before a GPU is at hand. For each summary kernel (forward `[H|M]`,
backward `[G|M]`), shape, input dtype and each autotuning config the shape allows, this
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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

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


def compile_kernel(kind: str, shape: dict, dtype: str, config: triton.Config, arch: int, is_m: bool = False):
    """Compile one variant exactly as `chunk_summary_fwd/_bwd` launch it: the H/G columns, or (is_m)
    the M columns."""
    K, V = shape["K"], shape["V"]
    x = TYPES[dtype]
    if kind == "fwd":
        fn = cs.chunk_summary_fwd_kernel
        sig = dict(k=x, w=x, u=x, g="*fp32", hm="*fp32", cu_seqlens="*i64", seg_ids="*i32")
    else:
        fn = cs.chunk_summary_bwd_kernel
        sig = dict(q=x, k=x, w=x, g="*fp32", do=x, gm="*fp32", cu_seqlens="*i64", seg_ids="*i32", scale="fp32")
    const = dict(H=shape["H"], HV=shape["HV"], K=K, V=V, W=V + K, BT=64, BK=cs._block_k(K),
                 **config.kwargs, IS_M=is_m, FP32_STATE=dtype == "fp32", PRECISION=FP32_DOT_PRECISION)
    sig.update({name: "constexpr" for name in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def configs_for(K: int) -> list[triton.Config]:
    """The configs the autotuner would try for this K (after `chunk_summary._prune`)."""
    return cs._prune(cs._CONFIGS, {}, K=K)


def compile_fla_fwd_h(shape: dict, config: triton.Config, arch: int):
    """FLA's own state pass (`chunk_gated_delta_rule_fwd_kernel_h_blockdim64`, bf16, varlen, with h0 and
    final state) on the same shape: the reference for what a chunk-walking state kernel costs."""
    from fla.ops.common import chunk_delta_h
    fn = chunk_delta_h.chunk_gated_delta_rule_fwd_kernel_h_blockdim64
    while not isinstance(fn, triton.runtime.jit.JITFunction):   # under FLA's autotune / heuristics
        fn = fn.fn
    ptrs = dict(k="*bf16", v="*bf16", w="*bf16", v_new="*bf16", g="*fp32", h="*bf16", h0="*fp32", ht="*fp32",
                cu_seqlens="*i32", chunk_offsets="*i32", T="i32")
    const = dict(gk=None, H=shape["H"], HV=shape["HV"], K=shape["K"], V=shape["V"], BT=64, **config.kwargs,
                 USE_G=True, USE_GK=False, USE_INITIAL_STATE=True, STORE_FINAL_STATE=True, SAVE_NEW_VALUE=True,
                 IS_VARLEN=True, STATE_V_FIRST=False)
    sig = {n: ptrs.get(n, "constexpr") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


# FLA 0.6's fwd_h configs on Hopper: BV in {32, 64}, num_warps in {2, 4}, num_stages in {2, 3, 4}
# (2 warps left out: Triton caps those at 32 registers here and the report is all spills)
FLA_FWD_H_CONFIGS = [triton.Config({"BV": bv}, num_warps=4, num_stages=s) for bv in (32, 64) for s in (2, 3)]


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


def comma_list(choices):
    """An argparse type: a comma list whose every item is one of `choices`."""
    def parse(s: str) -> list[str]:
        items = s.split(",")
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad} (choose from {', '.join(choices)})")
        return items
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100/H200)")
    p.add_argument("--shapes", type=comma_list(SHAPES), default=list(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--dtypes", type=comma_list(TYPES), default=list(TYPES),
                   help=f"comma list of {list(TYPES)}")
    p.add_argument("--default-only", action="store_true", help="only the untuned default config")
    p.add_argument("--fla", action="store_true", help="also FLA's fwd_h kernel on each shape, for reference")
    args = p.parse_args(argv)
    header = f"{'kernel':6} {'shape':6} {'dtype':5} {'M':1} {'BK':>4} {'BV':>3} {'warps':>5} {'stages':>6} " \
             f"{'regs':>4} {'spill B':>7} {'stack B':>7} {'smem KiB':>8}  note"
    print(f"# sm_{args.arch} | triton {triton.__version__} | fp32 dots: {FP32_DOT_PRECISION} | "
          f"default = the untuned first config (FLA_CP_AUTOTUNE=0) | M: y = the M-columns launch, n = H / G")
    print(header)
    print("-" * len(header))
    rows = []
    for kind in ("fwd", "bwd"):
        for name in args.shapes:
            for dtype in args.dtypes:
                for is_m in (False, True):
                    configs = configs_for(SHAPES[name]["K"])
                    for config in configs[:1] if args.default_only else configs:
                        cc = compile_kernel(kind, SHAPES[name], dtype, config, args.arch, is_m)
                        r = ptxas_report(cc.asm["ptx"], args.arch)
                        note = ("default " if config is cs._CONFIGS[0] else "") + \
                            ("wgmma serialized" if r["wgmma_serialized"] else "")
                        rows.append(dict(kind=kind, shape=name, dtype=dtype, is_m=is_m, config=config, **r,
                                         smem=cc.metadata.shared))
                        print(f"{kind:6} {name:6} {dtype:5} {'y' if is_m else 'n'} "
                              f"{cs._block_k(SHAPES[name]['K']):>4} {config.kwargs['BV']:>3} {config.num_warps:>5} "
                              f"{config.num_stages:>6} {r['regs']:>4} {r['spill']:>7} {r['stack']:>7} "
                              f"{cc.metadata.shared / 1024:>8.1f}  {note}", flush=True)
    if args.fla:
        for name in args.shapes:
            for config in FLA_FWD_H_CONFIGS:
                cc = compile_fla_fwd_h(SHAPES[name], config, args.arch)
                r = ptxas_report(cc.asm["ptx"], args.arch)
                print(f"{'FLAh':6} {name:6} {'bf16':5} - {'64x' + str(triton.cdiv(SHAPES[name]['K'], 64)):>4} "
                      f"{config.kwargs['BV']:>3} {config.num_warps:>5} {config.num_stages:>6} {r['regs']:>4} "
                      f"{r['spill']:>7} {r['stack']:>7} {cc.metadata.shared / 1024:>8.1f}  "
                      f"FLA chunk_gated_delta_rule_fwd_h", flush=True)
    return rows


if __name__ == "__main__":
    main()
