"""Checks for Triton's CPU interpreter, which `backend="triton"` off CUDA needs (tests). No patches.

Off CUDA, FLA's Triton kernels and ours run only in Triton's interpreter: `TRITON_INTERPRET=1` must be
set before they are first imported (`triton.jit` picks interpreter vs compiler when a kernel is
decorated), and FLA 0.6's kernels need a few process-wide patches of the interpreter there (loop
variables as tensors, first autotune config, boolean splats). fla_cp never applies them: importing or
running it changes nothing in Triton. Tests and tools apply them from `scripts/triton_patches.py`
(`enable_fla_kernels_in_interpreter()`; the test suite does it in `tests/cp/_interpret.py`), and
`require_interpreted(kernel, who)` is the check callers run before FLA's kernels off CUDA: a clear
RuntimeError naming `who` (the argument that asked for them) otherwise.
"""
from __future__ import annotations

# the attribute scripts/triton_patches.py sets on everything it installs
PATCH_MARK = "fla_cp_patch"


def is_interpreted(kernel) -> bool:
    """Whether a (possibly autotuned / heuristics-wrapped) Triton kernel runs in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    while kernel is not None and not isinstance(kernel, InterpretedFunction):
        kernel = getattr(kernel, "fn", None)
    return kernel is not None


def interpreter_patched() -> bool:
    """Whether the interpreter patches FLA's kernels need (`scripts/triton_patches.py`) are applied."""
    from triton.runtime import autotuner, interpreter
    return all(getattr(obj, PATCH_MARK, False) for obj in (
        interpreter.FunctionRewriter.ast_transformer, autotuner.Autotuner.run,
        interpreter.InterpreterBuilder.create_splat))


def require_interpreted(kernel, who: str) -> None:
    """FLA's kernels off CUDA only run in Triton's interpreter, which is chosen when they are imported
    (decorated), with the patches of `scripts/triton_patches.py`: a RuntimeError naming `who` unless
    both hold. Checks only; applies nothing."""
    if not is_interpreted(kernel):
        raise RuntimeError(f"{who} off CUDA runs FLA's kernels in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before FLA is first imported (tests), or use backend='torch'")
    if not interpreter_patched():
        raise RuntimeError(f"{who} off CUDA runs FLA's kernels in Triton's interpreter, which needs the "
                           "process-wide interpreter patches fla_cp does not apply itself: call "
                           "enable_fla_kernels_in_interpreter() from scripts/triton_patches.py first (tests: "
                           "tests/cp/_interpret.py), or use backend='torch'")
