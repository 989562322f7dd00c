"""The short conv's triton backend (`causal_conv(backend="triton")`, FLA's Triton `causal_conv1d`; in the
layer `GatedDeltaNetCP(backend="triton")`) against the pure-PyTorch window sum, on CPU: FLA's kernels
run in Triton's interpreter.

`triton.jit` picks interpreter vs compiler when a kernel is decorated, i.e. when FLA is imported, and
this test process imports FLA compiled. So the FLA side runs in spawned processes (gloo ranks) that
start with TRITON_INTERPRET=1 in their environment; references are computed here with the torch path.
Checked: y, final state and the gradients of x, weight, bias and the halo / initial inputs (fp32,
relative error <= 1e-5); the layer on P = 1 and P = 3 ranks with packed documents crossing rank
boundaries (the halo wiring), and at P = 3 a CP continuation from a CP prefill's cache (the cached
inputs in the halo); the clear error when FLA was imported without the interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _dist import run_ranks
from _interpret import interpret_env
from test_layer_cp import TOL, _cp_worker, assert_layer_case, make_case, make_layer, rel_err


def interpreted_ranks():
    """TRITON_INTERPRET=1 for processes spawned inside (FLA is imported afresh there), on any machine:
    the tensors of these tests live on the CPU."""
    return interpret_env(always=True)


# ------------------------------------------------------------------ kernel level
def random_bounds(g: torch.Generator, n_seg: int) -> list[tuple[int, int]]:
    """Packed segments of odd / tiny / chunk-crossing lengths (FLA's chunk is 64 tokens)."""
    lens = [1, 2, 67] + torch.randint(1, 40, (n_seg - 3,), generator=g).tolist()
    lens = [lens[i] for i in torch.randperm(len(lens), generator=g).tolist()]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return list(zip(cu[:-1], cu[1:]))


KERNEL_CASES = [   # W, D, halo, bias, activation, non-contiguous x
    (4, 40, True, True, "silu", False),
    (4, 40, False, True, "silu", False),
    (4, 24, True, False, None, True),
    (3, 17, True, True, "silu", False),
    (2, 16, False, False, None, False),
]


def kernel_case(seed: int, W: int, D: int, halo: bool, bias: bool):
    g = torch.Generator().manual_seed(seed)
    bounds = random_bounds(g, 7)
    N, S = bounds[-1][1], len(bounds)
    x = torch.randn(N, D, generator=g)
    weight = torch.randn(D, W, generator=g)
    b = torch.randn(D, generator=g) if bias else None
    init = torch.randn(S, W - 1, D, generator=g) if halo else None
    gy, gf = torch.randn(N, D, generator=g), torch.randn(S, D, W, generator=g)
    return bounds, x, weight, b, init, gy, gf


def run_kernel_case(seed: int, case: tuple, backend: str, device: str = "cpu"):
    """y, final state and the gradients of x, weight, bias, init of one case on one backend (on the
    CPU when they come back)."""
    from fla_cp.layers.short_conv_cp import causal_conv
    W, D, halo, bias, act, strided = case
    bounds, x, weight, b, init, gy, gf = (t.to(device) if torch.is_tensor(t) else t
                                          for t in kernel_case(seed, W, D, halo, bias))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b, init)]
    xin = leaves[0]
    if strided:   # a column slice of a wider tensor: FLA reads x through its strides
        xin = torch.cat([leaves[0], torch.zeros_like(leaves[0])], 1)[:, :D]
    y, final = causal_conv(xin, leaves[1], leaves[2], bounds, leaves[3], activation=act,
                           output_final_state=True, backend=backend)
    ((y * gy).sum() + (final * gf).sum()).backward()
    return [t.detach().cpu() if t is not None else None
            for t in [y, final] + [t.grad if t is not None else None for t in leaves]]


NAMES = ["y", "final", "dx", "dweight", "dbias", "dinit"]


def assert_kernel_case_close(case, seed, res, ref):
    for name, a, r in zip(NAMES, res, ref):
        assert (a is None) == (r is None), name
        if r is not None:
            assert a.shape == r.shape, f"{case} seed={seed}: {name} shape {a.shape} vs {r.shape}"
            assert rel_err(a, r) <= TOL, f"{case} seed={seed}: {name} {rel_err(a, r):.2e}"


@pytest.mark.timeout(300)
def test_causal_conv_fla_matches_torch(single_rank):
    seed, got = single_rank["kernel"]
    for case, res in zip(KERNEL_CASES, got):
        assert_kernel_case_close(case, seed, res, run_kernel_case(seed, case, "torch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FLA's conv compiled needs a GPU")
def test_causal_conv_fla_compiled_cuda():
    """The same cases on a GPU: FLA's compiled kernels vs the window sum on the CPU."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    for case in KERNEL_CASES:
        assert_kernel_case_close(case, seed, run_kernel_case(seed, case, "triton", device="cuda"),
                                 run_kernel_case(seed, case, "torch"))


# ------------------------------------------------------------------ layer, P ranks
LAYER_SPECS = {1: [("packed", "contiguous"), ("dense", "contiguous")],
               3: [("packed", "zigzag"), ("short", "contiguous")]}


def _decode_worker(seed):
    """Prefill with a cache, then token-by-token decode, on the FLA conv: outputs of the whole pass."""
    from fla.models.cache_utils import Cache
    from test_layer_cp import D
    layer = make_layer(seed, backend="triton")
    x = torch.randn(2, 13, D, generator=torch.Generator().manual_seed(seed))
    cache = Cache()
    with torch.no_grad():
        outs = [layer(x[:, :9], past_key_values=cache, use_cache=True)[0]]
        for t in range(9, 13):
            outs.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
    return x, torch.cat(outs, 1)


# a CP prefill then a CP continuation from its cache: dense (zigzag at P=3: parts of ~1 token < W-1,
# so the windows of the continuation's first tokens read the cache on several ranks) and packed
CONTINUATION = {"dense": dict(B=2, cu0=[0, 9], cu1=[0, 7], layout="zigzag"),
                "packed": dict(B=1, cu0=[0, 4, 11], cu1=[0, 2, 9], layout="contiguous")}


def continuation_inputs(kind, seed):
    c = CONTINUATION[kind]
    from test_layer_cp import D
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c["B"], c["cu0"][-1], D, generator=g), torch.randn(c["B"], c["cu1"][-1], D, generator=g)


def continuation_reference(kind, seed):
    """Each sequence of the prefill and its continuation in one pass of the torch-conv layer, one
    process: the outputs of the prefill's and the continuation's tokens."""
    c = CONTINUATION[kind]
    x0, x1 = continuation_inputs(kind, seed)
    layer, outs0, outs1 = make_layer(seed), [], []
    with torch.no_grad():
        for (s0, e0), (s1, e1) in zip(zip(c["cu0"], c["cu0"][1:]), zip(c["cu1"], c["cu1"][1:])):
            o = layer(torch.cat([x0[:, s0:e0], x1[:, s1:e1]], 1))[0]
            outs0.append(o[:, :e0 - s0])
            outs1.append(o[:, e0 - s0:])
    return torch.cat(outs0, 1), torch.cat(outs1, 1)


def _continuation_worker(rank, world_size, kind, seed):
    """The same on P ranks with the FLA conv: the continuation's halo holds the cached inputs."""
    from fla.models.cache_utils import Cache

    from fla_cp.ops import build_cp_context
    c = CONTINUATION[kind]
    x0, x1 = continuation_inputs(kind, seed)
    layer, cache, outs = make_layer(seed, backend="triton"), Cache(), []
    with torch.no_grad():
        for x, cu in ((x0, c["cu0"]), (x1, c["cu1"])):
            ctx = build_cp_context(None, cu_seqlens=cu, layout=c["layout"]) if kind == "packed" else \
                build_cp_context(None, seq_len=cu[-1], layout=c["layout"])
            o = layer(ctx.shard(x, dim=1), cp_context=ctx, past_key_values=cache, use_cache=True)[0]
            outs.append(ctx.unshard(o, dim=1))
    return outs


def layer_specs(P: int) -> list[tuple[str, str, int]]:
    return [(kind, layout, 500 + 10 * P + i) for i, (kind, layout) in enumerate(LAYER_SPECS[P])]


def _worker(rank, world_size, kernel_seed):
    """Everything on FLA's conv, interpreted: the kernel cases (one rank), the layer under CP and, on
    one rank, prefill + decode with the cache."""
    out = {"layer": _cp_worker(rank, world_size, layer_specs(world_size), dict(backend="triton"))}
    if world_size > 1:
        out["continuation"] = {kind: _continuation_worker(rank, world_size, kind, 700 + i)
                               for i, kind in enumerate(CONTINUATION)}
    if world_size == 1:
        out["kernel"] = (kernel_seed, [run_kernel_case(kernel_seed, case, "triton") for case in KERNEL_CASES])
        out["decode"] = _decode_worker(layer_specs(1)[0][2])
    return out


@pytest.fixture(scope="module")
def single_rank():
    """One spawned process (imports dominate the cost) serves the kernel test and the P = 1 layer test."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    with interpreted_ranks():
        return run_ranks(_worker, 1, (seed,), timeout=240)[0]


@pytest.mark.timeout(300)
# P = 3 (the whole layer interpreted on 3 ranks, ~25 s) runs with `pytest -m slow`, as CI does
@pytest.mark.parametrize("P", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_layer_fla_conv_matches_torch_conv(P, request):
    """CP layer with FLA's conv (halo as initial_state, dh0 back to the owner) == one process, torch conv.
    backend="triton" runs the operator on FLA's chunk kernels and ours too (all interpreted on CPU)."""
    if P == 1:
        result = request.getfixturevalue("single_rank")
    else:
        with interpreted_ranks():
            result = run_ranks(_worker, P, (0,), timeout=240)[0]
    specs = layer_specs(P)
    for (kind, layout, seed), got in zip(specs, result["layer"]):
        # (the bounds of the layer test: parameter gradients against float64, see test_layer_cp.py)
        assert_layer_case(f"fla conv P={P} {layout} {kind}", make_layer(seed), make_case(kind, P, layout, seed), got)
    for i, kind in enumerate(result.get("continuation", {})):
        # a CP continuation from the cache of a CP prefill == each sequence in one pass, torch conv
        for name, got, ref in zip(("prefill", "continuation"), result["continuation"][kind],
                                  continuation_reference(kind, 700 + i)):
            assert rel_err(got, ref) <= TOL, f"fla conv P={P} {kind} {name}: {rel_err(got, ref):.2e}"
    if P == 1:   # decoding from FLA's-conv cache == one pass of the torch-conv layer
        x, decoded = result["decode"]
        assert rel_err(decoded, make_layer(specs[0][2])(x)[0].detach()) <= TOL


# ------------------------------------------------------------------ errors
def test_conv_backend_choice():
    from fla_cp.layers import GatedDeltaNetCP
    from fla_cp.layers.short_conv_cp import causal_conv, resolve_conv_backend
    x = torch.randn(5, 4)
    assert resolve_conv_backend("auto", x) == "torch" and resolve_conv_backend("torch", x) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        causal_conv(x, torch.randn(4, 4), None, [(0, 5)], backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        GatedDeltaNetCP(hidden_size=32, head_dim=8, num_heads=2, backend="fla")   # "fla": the conv's old name


@pytest.mark.skipif(torch.cuda.is_available(), reason="FLA's kernels run compiled on a GPU")
def test_fla_conv_needs_interpreter():
    """FLA imported without TRITON_INTERPRET cannot run on CPU: a clear error naming the argument."""
    code = textwrap.dedent("""
        import torch
        from fla_cp.layers import GatedDeltaNetCP
        from fla_cp.layers.short_conv_cp import causal_conv
        for call in (lambda: causal_conv(torch.randn(5, 4), torch.randn(4, 4), None, [(0, 5)], backend="triton"),
                     lambda: GatedDeltaNetCP(hidden_size=32, head_dim=8, num_heads=2, backend="triton")(
                         torch.randn(1, 5, 32))):
            try:
                call()
            except RuntimeError as e:
                print("RuntimeError:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("RuntimeError:")]
    assert len(lines) == 2, run.stdout + run.stderr[-2000:]
    assert lines[0].startswith("RuntimeError: causal_conv(backend='triton') off CUDA"), lines[0]
    assert lines[1].startswith("RuntimeError: GatedDeltaNetCP(backend='triton') off CUDA"), lines[1]
    assert all("TRITON_INTERPRET=1 before FLA is first imported" in line for line in lines)
