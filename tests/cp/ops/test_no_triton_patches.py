"""fla_cp patches nothing in Triton process-wide: importing it (every module of it) and running it leaves
Triton's autotuner and interpreter as Triton made them. The patches tests and tools need live in
`scripts/triton_patches.py`, applied by them (this suite: conftest.py, `_dist.run_ranks`); the library
only checks for them, and refuses a call that would need them with a message saying what to enable.

Fresh processes: this one has the suite's patches applied.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

CODE = textwrap.dedent("""
    import importlib, os, pkgutil
    import triton
    from triton.runtime import autotuner, interpreter

    def triton_state():
        return {
            "Autotuner.prune_configs": autotuner.Autotuner.prune_configs,
            "Autotuner.run": autotuner.Autotuner.run,
            "FunctionRewriter.ast_transformer": interpreter.FunctionRewriter.ast_transformer,
            "InterpreterBuilder.create_splat": interpreter.InterpreterBuilder.create_splat,
            "_patch_lang_tensor": getattr(interpreter, "_patch_lang_tensor", None),
        }

    original = triton_state()
    import torch
    import fla_cp
    for module in pkgutil.walk_packages(fla_cp.__path__, "fla_cp."):     # every library module
        importlib.import_module(module.name)

    from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM
    from fla_cp.ops import chunk_cp_gated_delta_rule
    small = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
                 vocab_size=64, hidden_ratio=2, norm_eps=1e-6)
    torch.manual_seed(0)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**small))
    ids = torch.randint(0, 64, (1, 10))
    out = model(ids, labels=ids)                                          # CPU, backend "auto": torch
    out.loss.backward()
    if torch.cuda.is_available():                                         # GPU, "auto": triton
        model.cuda()(ids.cuda(), labels=ids.cuda()).loss.backward()

    if os.environ.get("TRITON_INTERPRET") == "1":
        # FLA's kernels are interpreted here, but fla_cp does not patch the interpreter for them: the
        # triton backend on CPU is refused, saying what to enable
        model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**small, backend="triton"))
        for call in (lambda: model(ids),
                     lambda: chunk_cp_gated_delta_rule(*(torch.randn(1, 8, 1, 16) for _ in range(3)),
                                                       -torch.rand(1, 8, 1), torch.rand(1, 8, 1), backend="triton")):
            try:
                call()
                print("NOT REFUSED")
            except (RuntimeError, ValueError) as e:
                print(f"REFUSED: {type(e).__name__}: {e}")
        # our own kernels' fixed-config launch under the interpreter is no patch either
        if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9):   # 3.6 needs fix_scalar_index
            from fla_cp.ops.backends.triton_backend import wy_prep_torch
            from fla_cp.ops.triton import chunk_summary_fwd
            k = torch.randn(1, 40, 1, 16)
            cu = torch.tensor([0, 40])
            g, w, u = wy_prep_torch(k, torch.randn(1, 40, 1, 16), -torch.rand(1, 40, 1), torch.rand(1, 40, 1), cu)
            assert chunk_summary_fwd(k, w, u, g, cu, [0], True).shape == (1, 1, 16, 32)
            print("OUR KERNELS RAN")

    now = triton_state()
    changed = [name for name in original if now[name] is not original[name]]
    assert not changed, f"fla_cp patched Triton: {changed}"
    assert not any(getattr(f, "fla_cp_patch", False) for f in now.values())
    print("UNPATCHED")
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpreted"])
def test_import_and_run_patch_nothing_in_triton(interpret):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLA_CP_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=280)
    assert run.returncode == 0 and "UNPATCHED" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    if interpret:
        refusals = [line for line in run.stdout.splitlines() if line.startswith(("REFUSED", "NOT REFUSED"))]
        assert len(refusals) == 2 and all(line.startswith("REFUSED") for line in refusals), run.stdout
        assert refusals[0].startswith("REFUSED: RuntimeError: GatedDeltaNetCP(backend='triton') off CUDA")
        assert refusals[1].startswith("REFUSED: ValueError: chunk_cp_gated_delta_rule: backend='triton' off CUDA")
        for line in refusals:   # what to enable, and where
            assert "enable_fla_kernels_in_interpreter()" in line and "scripts/triton_patches.py" in line, line
        import triton
        if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9):
            assert "OUR KERNELS RAN" in run.stdout, run.stdout
