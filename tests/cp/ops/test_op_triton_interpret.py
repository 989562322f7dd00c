"""The operator's multi-rank tests with `backend="triton"`: gloo ranks vs one process (torch backend)
and vs FLA's naive recurrence, fp32, relative error <= 1e-5.

On CPU the tests of our summary kernels run them in Triton's interpreter (`_interpret`) around the
torch backend's local chunk compute (`_interpret.summary_kernels_backend`); on a GPU the triton backend
runs FLA's chunk kernels and our compiled kernels, the gloo ranks sharing the one device.
`test_op_fla_kernels_interpreted` runs `backend="triton"` itself on CPU: FLA's chunk kernels in the
interpreter too, which checks every call this package makes into FLA (arguments, layouts, log2 gates,
per-segment h0/dht) without a GPU.

The cases, inputs, loss and references are the operator suite's own (`test_chunk_cp.py`): dense and
packed streams, zigzag, GVA, K != V and odd head dims, documents of 1-3 tokens on rank boundaries,
slow-decay heads, initial and final states, l2norm in the kernel. Checked: o, final state, and the
gradients of q, k, v, g, beta, initial_state.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from _interpret import interpret_env, load_kernels, summary_kernels_backend

load_kernels()  # interpreted on CPU, compiled on a GPU

from fla_cp.ops import build_cp_context, chunk_cp_gated_delta_rule  # noqa: E402

from _dist import run_ranks  # noqa: E402
from test_chunk_cp import CASES, assert_close, loss_of, make_inputs, naive_case, rel_err  # noqa: E402
from test_chunk_cp import run_case as run_chunk_cp_case  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(case: dict, seed: int, backend: str, ctx=None):
    return run_chunk_cp_case(case, seed, ctx, backend=backend, device=DEVICE)


def _triton_worker(rank, world_size, cases, seed, backend=None):
    """The cases on `backend` (None: `summary_kernels_backend()`) on this rank."""
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    results = []
    for case in cases:
        layout = case.get("layout", "contiguous")
        if "cu" in case:
            ctx = build_cp_context(None, cu_seqlens=torch.tensor(case["cu"]), layout=layout)
        else:
            ctx = build_cp_context(None, seq_len=case["T"], layout=layout)
        if world_size == 1:
            ctx = None   # the plain single-device op
        results.append(run_case(case, seed, backend or summary_kernels_backend(), ctx))
    return results


@pytest.mark.timeout(300)
# P=3 (~12 s on 2 cores) is slow, run by `pytest -m slow` (CI runs it)
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_op_triton_multirank(world_size):
    seed = torch.randint(0, 2**31 - 1, ()).item()    # fresh inputs every run; printed on failure
    with interpret_env():   # the spawned ranks import our kernels afresh
        got = run_ranks(_triton_worker, world_size, (CASES, seed))[0]
    for case, res in zip(CASES, got):
        label = f"triton P={world_size} {case['name']} seed={seed}"
        assert_close(res, run_case(case, seed, "torch"), label + " vs torch single process")
        assert_close(res, naive_case(case, seed), label + " vs naive")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU test_op_triton_multirank already runs FLA's compiled kernels")
@pytest.mark.timeout(420)
# P=3 interprets FLA's kernels on three ranks (~40 s on 2 cores): slow, run by `pytest -m slow` (CI runs it)
@pytest.mark.parametrize("world_size", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_op_fla_kernels_interpreted(world_size):
    """backend="triton" on CPU, the CUDA path: FLA's chunk kernels and ours, all interpreted. Ranks are
    spawned with TRITON_INTERPRET=1 so FLA's kernels are decorated for the interpreter (and get the
    suite's interpreter patches, `_dist.run_ranks`)."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    with interpret_env():
        got = run_ranks(_triton_worker, world_size, (CASES, seed, "triton"), timeout=400)[0]
    for case, res in zip(CASES, got):
        label = f"triton+FLA kernels (interpreted) P={world_size} {case['name']} seed={seed}"
        assert_close(res, run_case(case, seed, "torch"), label + " vs torch single process")
        assert_close(res, naive_case(case, seed), label + " vs naive")


@pytest.mark.skipif(DEVICE == "cuda", reason="FLA's kernels run compiled on a GPU")
@pytest.mark.parametrize("fla_first", [False, True])
def test_triton_backend_fla_needs_interpreter(fla_first):
    """FLA's kernels imported without TRITON_INTERPRET cannot run on CPU: a clear ValueError from the
    op's own checks (before any collective), not a Triton driver trace, whether ours were imported
    compiled too or interpreted (`fla_first`). One process runs no summary kernel of ours, so the message
    is about FLA's kernels (ours compiled on several ranks: test_chunk_cp_errors.py).
    A fresh interpreter, since this process imported the kernels interpreted (`load_kernels`)."""
    code = textwrap.dedent(f"""
        import os
        if {fla_first}:
            import fla.ops.common.chunk_delta_h   # FLA's kernels decorated compiled
            os.environ["TRITON_INTERPRET"] = "1"  # ours interpreted
        import torch
        from fla_cp.ops import chunk_cp_gated_delta_rule
        x = torch.randn(1, 8, 1, 4)
        chunk_cp_gated_delta_rule(x, x, x, -torch.rand(1, 8, 1), torch.rand(1, 8, 1), backend="triton")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "ValueError: chunk_cp_gated_delta_rule: " in run.stderr, run.stderr[-2000:]
    assert "backend='triton' needs CUDA tensors" in run.stderr, run.stderr[-2000:]
    assert "TRITON_INTERPRET=1 before FLA is first imported" in run.stderr


WIDE_V = [dict(name="wide_v", cu=[0, 40, 100], H=1, HV=2, K=16, V=512, h0=True, final=True)]


@pytest.mark.timeout(300)
def test_op_triton_wide_values():
    """V = 512 (FLA's default GatedDeltaNet) with the triton backend on 2 ranks (our summary kernels
    interpreted on CPU) vs the torch backend on one process and naive: once refused for V > 256."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    with interpret_env():
        (res,) = run_ranks(_triton_worker, 2, (WIDE_V, seed))[0]
    label = f"triton P=2 V=512 seed={seed}"
    assert_close(res, run_case(WIDE_V[0], seed, "torch"), label + " vs torch single process")
    assert_close(res, naive_case(WIDE_V[0], seed), label + " vs naive")


def test_op_triton_single_process():
    """P = 1 with the triton backend (no summaries cross ranks; on CPU `summary_kernels_backend`) vs the
    torch backend and naive."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    for case in CASES:
        res = run_case(case, seed, "triton" if DEVICE == "cuda" else summary_kernels_backend())
        label = f"triton P=1 {case['name']} seed={seed}"
        assert_close(res, run_case(case, seed, "torch"), label + " vs torch")
        assert_close(res, naive_case(case, seed), label + " vs naive")


# bf16 on a GPU: FLA's CP test tolerance (relative error <= 3e-3) vs the fp32 op on the same inputs.
# FLA's own plain op on the same bf16 inputs is measured too, so a failure says whether we lose more
# than FLA's bf16 pipeline itself does.
BF16_CASE = dict(name="bf16_packed_gva", cu=[0, 700, 701, 1500, 2048], H=2, HV=4, K=64, V=128, h0=True, final=True)
BF16_TOL = 3e-3


def _bf16_leaves(case, seed, dtype=torch.bfloat16):
    """q, k, v, beta rounded to bf16 (held in `dtype`), g and h0 fp32 (as FLA's layer feeds them), on
    DEVICE, requiring grad."""
    q, k, v, g, beta, h0 = (None if x is None else x.to(DEVICE) for x in make_inputs(case, seed))
    q, k, v, beta = (x.bfloat16().to(dtype).requires_grad_() for x in (q, k, v, beta))
    return [q, k, v, g.requires_grad_(), beta, h0.requires_grad_()]


def _outputs(o, ht, leaves):
    return o.detach().float().cpu(), ht.detach().cpu(), [x.grad.float().cpu() for x in leaves]


def _run_bf16(case, seed, ctx=None):
    leaves = _bf16_leaves(case, seed)
    h0 = leaves[5]
    local = [ctx.shard(x, dim=1) for x in leaves[:5]] if ctx is not None else leaves[:5]
    cu = torch.tensor(case["cu"], device=DEVICE) if ctx is None else None
    o, ht = chunk_cp_gated_delta_rule(*local, cp_context=ctx, initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu, backend="triton")
    if ctx is not None:
        o = ctx.unshard(o, dim=1)
    (loss_of(o.float(), ht) / (ctx.world_size if ctx is not None else 1)).backward()
    res = _outputs(o, ht, leaves)
    if ctx is not None:
        for gr in res[2]:          # each rank's share, summed in fp32
            dist.all_reduce(gr)
    return res


def _run_fla_plain(case, seed, dtype=torch.bfloat16):
    """FLA's own `chunk_gated_delta_rule` on the same inputs, one process: the error FLA itself has."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    leaves = _bf16_leaves(case, seed, dtype)
    o, ht = chunk_gated_delta_rule(*leaves[:5], scale=case["K"] ** -0.5, initial_state=leaves[5],
                                   output_final_state=True, cu_seqlens=torch.tensor(case["cu"], device=DEVICE))
    loss_of(o.float(), ht).backward()
    return _outputs(o, ht, leaves)


def _fp32_reference_of_bf16_inputs(case, seed):
    """The fp32 torch backend on the bf16-rounded inputs (one process)."""
    q, k, v, g, beta, h0 = make_inputs(case, seed)
    q, k, v, beta = (x.bfloat16().float() for x in (q, k, v, beta))
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]
    o, ht = chunk_cp_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                      cu_seqlens=torch.tensor(case["cu"]), backend="torch")
    loss_of(o, ht).backward()
    return o.detach(), ht.detach(), [x.grad for x in leaves]


def _bf16_worker(rank, world_size, case, seed):
    torch.cuda.set_device(0)
    ctx = build_cp_context(None, cu_seqlens=torch.tensor(case["cu"]))
    return _run_bf16(case, seed, ctx)


def _assert_bf16_close(got, ref, label, fla=None):
    """Every field within BF16_TOL of the fp32 reference; the message lists all fields, ours and FLA's."""
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    flat = lambda res: [res[0], res[1], *res[2]]   # noqa: E731
    ours = [rel_err(a, b) for a, b in zip(flat(got), flat(ref))]
    theirs = [rel_err(a, b) for a, b in zip(flat(fla), flat(ref))] if fla is not None else [float("nan")] * 8
    table = "\n".join(f"  {n:12s} ours {e:.2e}   FLA's plain op {f:.2e}" for n, e, f in zip(names, ours, theirs))
    assert max(ours) <= BF16_TOL, f"{label}: relative error vs fp32 above {BF16_TOL}:\n{table}"


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 through FLA's kernels needs a GPU")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2])
def test_op_triton_bf16_cuda(world_size):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    if world_size == 1:
        got = _run_bf16(BF16_CASE, seed)
    else:
        got = run_ranks(_bf16_worker, world_size, (BF16_CASE, seed))[0]
    _assert_bf16_close(got, _fp32_reference_of_bf16_inputs(BF16_CASE, seed), f"bf16 P={world_size} seed={seed}",
                       fla=_run_fla_plain(BF16_CASE, seed))
