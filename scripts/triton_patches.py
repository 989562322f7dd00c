"""Process-wide Triton patches for fla_cp's tests and tools. fla_cp itself never applies them.

Importing or running fla_cp changes nothing in Triton. What the test suite, `scripts/bench_op.py
--smoke` and `scripts/gpu_check.sh` need beyond that lives here, applied by whoever needs it:

- `untuned_autotuners()`: every `triton.autotune` kernel, FLA's included, honours `FLA_CP_AUTOTUNE=0`
  (its configs are pruned to the first one). fla_cp's own kernels read the variable themselves (an
  untuned launch, no patch); FLA's kernels only through this patch. For correctness runs on many tiny
  shapes on a fresh GPU, where tuning every kernel for every shape would compile for minutes.
- `enable_fla_kernels_in_interpreter()`: FLA's Triton kernels run in Triton's CPU interpreter
  (`TRITON_INTERPRET=1` set before FLA is imported), which `backend="triton"` off CUDA needs (tests).
  fla_cp checks for these patches (`fla_cp.utils.triton_interpreter.require_interpreted`) and raises
  a clear error without them. Out of the box three things stop FLA 0.6's kernels there:

  1. Loop variables. The interpreter runs a kernel as Python, so `for i_t in range(NT)` yields Python
     ints, while compiled Triton yields tensors; FLA's `chunk_gated_delta_rule_fwd_h` calls
     `i_t.to(tl.int64)`. The interpreter already rewrites each kernel's AST (it wraps assignments in
     `to_tensor`); we add one rule: the target of a `range` / `tl.range` loop becomes a tensor at the
     top of the body. `tl.static_range` loops keep Python ints, as when compiled.
  2. Autotuning. `triton.autotune` times every config on a GPU; under the interpreter an `Autotuner`
     now launches its first config (num_warps / num_stages mean nothing there).
  3. Splatted scalar comparisons. The interpreter (Triton 3.9) labels a comparison's result with its
     operands' dtype (bool data, `int64` label), and `splat` then materialises the label: `(t < n) & m`
     with a scalar `n` became an int64 mask that `tl.load` rejects (FLA's `compute_dh0_kernel`, the
     initial-state gradient of `causal_conv1d`). A splat whose result type is int1 now yields bools.

- `fix_scalar_index()` (part of the above, and useful alone for fla_cp's own interpreted kernels):
  the interpreter holds a scalar as a one-element 1-D array, and Triton 3.6's interpreter turns it
  into a Python int (`range(T)`) with `int(array)`, which NumPy 2.4 rejects ("only 0-dimensional
  arrays can be converted"); Triton 3.9 squeezes the array first, and so does the patch.

All patches are idempotent; the interpreter patches act only on interpreted kernels (compiled kernels
on a GPU are untouched) and the autotuner patch is a no-op while `FLA_CP_AUTOTUNE` is unset.

    python scripts/triton_patches.py SCRIPT [ARGS...]    # run SCRIPT as __main__ with the patches
                                                         # (torchrun accepts it as the script too)
"""
from __future__ import annotations

import ast
import os
import runpy
import sys

# set on every function / object these patches install; fla_cp looks for it (it never sets it)
MARK = "fla_cp_patch"


def autotune_enabled() -> bool:
    """`FLA_CP_AUTOTUNE=0` turns tuning off (fla_cp.ops.triton.utils reads the same variable)."""
    return os.environ.get("FLA_CP_AUTOTUNE", "1") != "0"


def _mark(obj):
    setattr(obj, MARK, True)
    return obj


def untuned_autotuners() -> None:
    """Make every `triton.autotune` kernel (FLA's included) honour `FLA_CP_AUTOTUNE=0`: its configs
    are pruned to the first one, so nothing is compiled or timed beyond the launch itself (Triton 3.7+
    then skips benchmarking; 3.6 times the one config once). Read whenever a kernel meets a new
    tuning key (keys met before keep their config; Triton's on-disk tuning cache is keyed by the
    config list, so untuned picks never stand in for tuned ones). A no-op while unset. Idempotent."""
    from triton.runtime import autotuner
    prune = autotuner.Autotuner.prune_configs
    if getattr(prune, MARK, False):
        return

    def prune_configs(self, *args, **kwargs):
        configs = prune(self, *args, **kwargs)
        return configs if autotune_enabled() else configs[:1]

    autotuner.Autotuner.prune_configs = _mark(prune_configs)


def fix_scalar_index() -> None:
    """Let interpreted kernels use a scalar tensor as a Python int with any NumPy (idempotent)."""
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, MARK, False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _mark(patched)


def _to_tensor(name: str) -> ast.Assign:
    """`name = interpreter_semantic.to_tensor(name, False)`, the interpreter's own wrapping."""
    call = ast.Call(
        func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor",
                           ctx=ast.Load()),
        args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)], keywords=[])
    return ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=call)


def _is_dynamic_range(call: ast.expr) -> bool:
    """`range(...)` or `tl.range(...)`, not `tl.static_range(...)`."""
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    return (isinstance(f, ast.Name) and f.id == "range") or (isinstance(f, ast.Attribute) and f.attr == "range")


def is_interpreted(kernel) -> bool:
    """Whether a (possibly autotuned / heuristics-wrapped) Triton kernel runs in the interpreter (as
    `fla_cp.utils.triton_interpreter.is_interpreted`; not imported from there: importing fla_cp imports
    FLA, whose kernels must not be decorated before the caller has set TRITON_INTERPRET)."""
    from triton.runtime.interpreter import InterpretedFunction
    while kernel is not None and not isinstance(kernel, InterpretedFunction):
        kernel = getattr(kernel, "fn", None)
    return kernel is not None


def enable_fla_kernels_in_interpreter() -> None:
    """The interpreter patches above (idempotent). TRITON_INTERPRET=1 must have been set before FLA's
    kernels were imported (decorated): that, not this, makes them interpreted."""
    from triton.runtime import autotuner, interpreter
    fix_scalar_index()

    if not getattr(interpreter.FunctionRewriter.ast_transformer, MARK, False):
        class LoopVariablesAsTensors(interpreter.ASTTransformer):
            def visit_For(self, node):
                node = self.generic_visit(node)
                if isinstance(node.target, ast.Name) and _is_dynamic_range(node.iter):
                    node.body.insert(0, _to_tensor(node.target.id))
                return node

        interpreter.FunctionRewriter.ast_transformer = _mark(LoopVariablesAsTensors())

    tuned_run = autotuner.Autotuner.run
    if not getattr(tuned_run, MARK, False):
        def run(self, *args, **kwargs):
            if not is_interpreted(self.fn):
                return tuned_run(self, *args, **kwargs)
            config = self.configs[0]
            self.nargs = dict(zip(self.arg_names, args))
            self.best_config = config
            if config.pre_hook is not None:
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            return self.fn.run(*args, **kwargs, **config.all_kwargs())

        autotuner.Autotuner.run = _mark(run)

    splat = interpreter.InterpreterBuilder.create_splat
    if not getattr(splat, MARK, False):
        import numpy as np
        import triton.language as tl

        def create_splat(self, ret_ty, arg):
            out = splat(self, ret_ty, arg)
            if getattr(ret_ty, "element_ty", None) == tl.int1 and out.data.dtype != np.bool_:
                return interpreter.TensorHandle(out.data.astype(np.bool_), tl.int1)
            return out

        interpreter.InterpreterBuilder.create_splat = _mark(create_splat)


def enable_all() -> None:
    """Everything above: untuned autotuners (under FLA_CP_AUTOTUNE=0) and the interpreter patches."""
    untuned_autotuners()
    enable_fla_kernels_in_interpreter()


def main(argv: list[str] | None = None) -> None:
    """`python scripts/triton_patches.py SCRIPT [ARGS...]`: SCRIPT run as `__main__` with `enable_all()`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__ if argv else "usage: python scripts/triton_patches.py SCRIPT [ARGS...]")
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(script)      # as `python SCRIPT` would have it
    enable_all()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    # the repository root, for `fla_cp` from a checkout (the scripts insert it themselves too)
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
