"""Run fla_cp's own Triton kernels in Triton's CPU interpreter when there is no GPU, without leaking
TRITON_INTERPRET=1 into the rest of the suite.

`triton.jit` picks interpreter vs compiler when a kernel is *decorated*, so `load_kernels()` sets the
variable only while it imports `fla_cp.ops.triton`; spawned gloo ranks get it through
`interpret_env()` (a context manager around `run_ranks`). On a machine with CUDA both do nothing and
the kernels compile.

fla_cp applies no process-wide Triton patch; the suite's own live in `scripts/triton_patches.py`, and
`enable_test_patches()` applies them: in the pytest process (conftest.py) and in every spawned rank
(`_dist.run_ranks`). They are the interpreter patches FLA's kernels need off CUDA (`backend="triton"`
on CPU tensors, in processes that imported FLA with TRITON_INTERPRET=1) and `FLA_CP_AUTOTUNE=0`
reaching FLA's autotuners (scripts/gpu_check.sh).

`summary_kernels_backend()` is the triton backend the op's CPU tests use to exercise our summary
kernels without interpreting FLA's (slow): on CUDA `TritonBackend()`, elsewhere the torch backend's
local compute around our interpreted kernels.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import torch

ON_CPU = not torch.cuda.is_available()
SCRIPTS = str(Path(__file__).resolve().parents[2] / "scripts")
if SCRIPTS not in sys.path:
    sys.path.append(SCRIPTS)

from triton_patches import (  # noqa: E402
    enable_all,
    enable_fla_kernels_in_interpreter,
    fix_scalar_index,
    untuned_autotuners,
)

__all__ = ["ON_CPU", "enable_fla_kernels_in_interpreter", "enable_test_patches", "fix_scalar_index",
           "interpret_env", "load_kernels", "summary_kernels_backend", "untuned_autotuners"]


def enable_test_patches() -> None:
    """The suite's process-wide Triton patches (`scripts/triton_patches.py`; idempotent, and inert for
    compiled kernels while FLA_CP_AUTOTUNE is unset). fla_cp itself applies none."""
    enable_all()


def summary_kernels_backend(chunk_size: int = 64):
    """The triton backend of the op's tests of our summary kernels: FLA's kernels and ours on CUDA
    (`TritonBackend()`), elsewhere the torch backend's local chunk compute around our summary kernels
    (interpreted; see `load_kernels`), through the backend's private `_local="auto"`."""
    from fla_cp.ops.backends.triton_backend import TritonBackend
    return TritonBackend(chunk_size, _local="auto")


@contextlib.contextmanager
def interpret_env(always: bool = False):
    """TRITON_INTERPRET=1 inside (for kernels decorated there, and for spawned processes): on CPU, or
    on any machine with `always` (tests whose tensors live on the CPU even where there is a GPU)."""
    if not (ON_CPU or always):
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def load_kernels():
    """Import `fla_cp.ops.triton` (interpreted on CPU); fail loudly if it was already imported compiled."""
    with interpret_env():
        module = importlib.import_module("fla_cp.ops.triton.chunk_summary")
    if ON_CPU:
        from triton.runtime.interpreter import InterpretedFunction
        assert isinstance(module.chunk_summary_fwd_kernel, InterpretedFunction), \
            "fla_cp.ops.triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on CPU"
    return module
