"""Run FLA's Triton chunk kernels in Triton's CPU interpreter (`TRITON_INTERPRET=1`), for tests.

Out of the box three things stop FLA 0.6's kernels there:

1. Loop variables. The interpreter runs a kernel as Python, so `for i_t in range(NT)` yields Python
   ints, while compiled Triton yields tensors; FLA's `chunk_gated_delta_rule_fwd_h` calls
   `i_t.to(tl.int64)`. The interpreter already rewrites each kernel's AST (it wraps assignments in
   `to_tensor`); we add one rule: the target of a `range` / `tl.range` loop becomes a tensor at the
   top of the body. `tl.static_range` loops keep Python ints, as when compiled.
2. Autotuning. `triton.autotune` times every config on a GPU; under the interpreter an
   `Autotuner` now launches its first config (num_warps / num_stages mean nothing there).
3. Splatted scalar comparisons. The interpreter (Triton 3.9) labels a comparison's result with its
   operands' dtype (bool data, `int64` label), and `splat` then materialises the label: `(t < n) & m`
   with a scalar `n` became an int64 mask that `tl.load` rejects (FLA's `compute_dh0_kernel`, the
   initial-state gradient of `causal_conv1d`). A splat whose result type is int1 now yields bools.

One more patch, `fix_scalar_index`, serves our own kernels too: the interpreter holds a scalar as a
one-element 1-D array, and Triton 3.6's interpreter turns it into a Python int (`range(T)`) with
`int(array)`, which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted"); Triton 3.9
squeezes the array first, and so does the patch.

    from fla_cp.utils.triton_interpreter import enable_fla_kernels_in_interpreter
    enable_fla_kernels_in_interpreter()   # idempotent; TRITON_INTERPRET=1 must have been set
                                          # before FLA's kernels were imported (decorated)

`require_interpreted(kernel, who)` is the check callers run before FLA's kernels on CPU: a clear
RuntimeError naming `who` (the argument that asked for them) when FLA was imported compiled.

All patches act only on interpreted kernels; compiled kernels on a GPU are untouched.
"""
from __future__ import annotations

import ast

_ENABLED = False


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
    """Whether a (possibly autotuned / heuristics-wrapped) Triton kernel runs in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    while kernel is not None and not isinstance(kernel, InterpretedFunction):
        kernel = getattr(kernel, "fn", None)
    return kernel is not None


def fix_scalar_index() -> None:
    """Let interpreted kernels use a scalar tensor as a Python int with any NumPy (idempotent)."""
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "fla_cp_fixed", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.fla_cp_fixed = True
    interpreter._patch_lang_tensor = patched


def require_interpreted(kernel, who: str) -> None:
    """FLA's kernels off CUDA only run in Triton's interpreter, which is chosen when they are imported
    (decorated): raise a clear error naming `who` if `kernel` was not, else enable the patches above."""
    if not is_interpreted(kernel):
        raise RuntimeError(f"{who} off CUDA runs FLA's kernels in Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before FLA is first imported")
    enable_fla_kernels_in_interpreter()


def enable_fla_kernels_in_interpreter() -> None:
    global _ENABLED
    if _ENABLED:
        return
    from triton.runtime import autotuner, interpreter
    fix_scalar_index()

    class LoopVariablesAsTensors(interpreter.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name) and _is_dynamic_range(node.iter):
                node.body.insert(0, _to_tensor(node.target.id))
            return node

    interpreter.FunctionRewriter.ast_transformer = LoopVariablesAsTensors()

    tuned_run = autotuner.Autotuner.run

    def run(self, *args, **kwargs):
        if not is_interpreted(self.fn):
            return tuned_run(self, *args, **kwargs)
        config = self.configs[0]
        self.nargs = dict(zip(self.arg_names, args))
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    autotuner.Autotuner.run = run

    import numpy as np
    import triton.language as tl
    splat = interpreter.InterpreterBuilder.create_splat

    def create_splat(self, ret_ty, arg):
        out = splat(self, ret_ty, arg)
        if getattr(ret_ty, "element_ty", None) == tl.int1 and out.data.dtype != np.bool_:
            return interpreter.TensorHandle(out.data.astype(np.bool_), tl.int1)
        return out

    interpreter.InterpreterBuilder.create_splat = create_splat
    _ENABLED = True
