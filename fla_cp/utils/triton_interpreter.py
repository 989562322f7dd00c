"""Run FLA's Triton chunk kernels in Triton's CPU interpreter (`TRITON_INTERPRET=1`), for tests.

Out of the box two things stop FLA 0.6's kernels there:

1. Loop variables. The interpreter runs a kernel as Python, so `for i_t in range(NT)` yields Python
   ints, while compiled Triton yields tensors; FLA's `chunk_gated_delta_rule_fwd_h` calls
   `i_t.to(tl.int64)`. The interpreter already rewrites each kernel's AST (it wraps assignments in
   `to_tensor`); we add one rule: the target of a `range` / `tl.range` loop becomes a tensor at the
   top of the body. `tl.static_range` loops keep Python ints, as when compiled.
2. Autotuning. `triton.autotune` times every config on a GPU; under the interpreter an
   `Autotuner` now launches its first config (num_warps / num_stages mean nothing there).

    from fla_cp.utils.triton_interpreter import enable_fla_kernels_in_interpreter
    enable_fla_kernels_in_interpreter()   # idempotent; TRITON_INTERPRET=1 must have been set
                                          # before FLA's kernels were imported (decorated)

Both patches act only on interpreted kernels; compiled kernels on a GPU are untouched.
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


def enable_fla_kernels_in_interpreter() -> None:
    global _ENABLED
    if _ENABLED:
        return
    from triton.runtime import autotuner, interpreter

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
    _ENABLED = True
