"""Run fla_cp's own Triton kernels in Triton's CPU interpreter when there is no GPU, without leaking
TRITON_INTERPRET=1 into the rest of the suite.

`triton.jit` picks interpreter vs compiler when a kernel is *decorated*, so `load_kernels()` sets the
variable only while it imports `fla_cp.ops.triton`; spawned gloo ranks get it through
`interpret_env()` (a context manager around `run_ranks`). On a machine with CUDA both do nothing and
the kernels compile.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

ON_CPU = not torch.cuda.is_available()


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
