"""Launch switches shared by fla_cp's own Triton kernels.

Under `TRITON_INTERPRET=1` (CPU tests) Triton's autotuner wants a GPU driver, so the kernels are
launched plain with one fixed config; on a GPU the autotuned wrapper of the same kernel is used.
`triton.jit` decides interpreter vs compiler when the kernel is *decorated* (module import), so the
switch looks at the kernel object itself: the environment variable must be set before
`fla_cp.ops.triton` is first imported.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton

# The M chain multiplies fp32 transitions chunk after chunk. Plain TF32 keeps 10 mantissa bits, so
# a near-identity M of a slow-decay head would lose ~1e-3 per chunk; IEEE fp32 dots run on the CUDA
# cores (~7x below TF32 tensor-core throughput on H100). 3xTF32 splits each fp32 operand into a big and a
# small TF32 part and sums three tensor-core products: ~fp32 accuracy (what FLA's own CP uses) at
# ~3x the TF32 cost. Non-NVIDIA targets get IEEE, the only fp32-exact choice Triton offers there.
FP32_DOT_PRECISION = 'tf32x3' if torch.version.hip is None else 'ieee'


def autotune_enabled() -> bool:
    """`FLA_CP_AUTOTUNE=0` launches our kernels' first config untuned (correctness runs on many tiny
    shapes, where tuning every shape would cost more than the tests). FLA's autotuned kernels follow
    it only where the caller applies `untuned_autotuners` of `scripts/triton_patches.py` (a
    process-wide patch of Triton's autotuner, which fla_cp itself never applies; the test suite and
    `scripts/gpu_check.sh` do)."""
    return os.environ.get('FLA_CP_AUTOTUNE', '1') != '0'


def autotuned(kernel, configs: list[triton.Config], key: list[str], prune=None):
    """Return `launch(grid, **kwargs)` that autotunes `kernel` on a GPU and runs it plain under
    the interpreter (num_warps / num_stages mean nothing there). `grid` may be a function of the
    launch's meta-parameters (kwargs plus the config's, e.g. a tuned block size). Untuned launches
    take the first config. The autotuner is built on the first compiled launch, so importing on a
    machine without a GPU driver never touches one. Tuning results are cached on disk where Triton
    supports it, so gloo ranks in separate processes tune once. `prune(configs, named_args, **kwargs)`
    drops configs unfit for a launch before tuning (Triton's `early_config_prune`)."""
    from triton.runtime.interpreter import InterpretedFunction
    interpreted = isinstance(kernel, InterpretedFunction)
    cache = {'cache_results': True} if 'cache_results' in inspect.signature(triton.autotune).parameters else {}
    tuned = []

    def launch(grid, **kwargs):
        if interpreted or not autotune_enabled():
            first = configs[0]
            meta = {**kwargs, **first.kwargs}
            extra = {} if interpreted else {'num_warps': first.num_warps, 'num_stages': first.num_stages}
            return kernel[grid(meta) if callable(grid) else grid](**meta, **extra)
        if not tuned:
            pruning = {'prune_configs_by': {'early_config_prune': prune}} if prune else {}
            tuned.append(triton.autotune(configs=configs, key=key, **pruning, **cache)(kernel))
        return tuned[0][grid](**kwargs)
    return launch
