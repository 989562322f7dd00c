"""fla_cp's Triton summary kernels against an independent token-by-token reference and the torch backend.

On CPU they run in Triton's interpreter (`_interpret.load_kernels`); on a GPU the same tests run the
compiled kernels.

The reference is DESIGN.md §1 in fp64, one token at a time: the augmented state `[H | M]` started at
`[0 | I]` with values `[v | 0]`, and `G = ∂L/∂S_start` of `L = Σ_t <o_t, do_t>` by autograd from a
zero end-state gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _interpret import load_kernels, summary_kernels_backend

load_kernels()  # before anything else imports them: interpreted on CPU, compiled on a GPU

from fla_cp.ops.backends.torch_backend import TorchBackend  # noqa: E402
from fla_cp.ops.backends.triton_backend import TritonBackend, wy_prep_torch  # noqa: E402
from fla_cp.ops.triton import chunk_summary_bwd, chunk_summary_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def _inputs(H, HV, K, V, lens, slow, seed):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(1, T, H, K, generator=gen)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, HV, V, generator=gen)
    beta = torch.rand(1, T, HV, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, HV, generator=gen) + 2)
    if slow:
        # slow-decay heads keep a state for thousands of tokens: a leak across segments shows
        g[..., ::2] = -1e-3 * torch.rand(1, T, (HV + 1) // 2, generator=gen)
    do = torch.randn(1, T, HV, V, generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return q, k, v, g, beta, do, cu


def _reference(q, k, v, g, beta, do, cu, segments, scale):
    """fp64 token-by-token `[H | M]` and `[G | M]` of each listed segment: [n, HV, K, V+K] each."""
    H, HV = k.shape[2], v.shape[2]
    q, k = (x[0].double().repeat_interleave(HV // H, dim=1) for x in (q, k))
    v, g, beta, do = (x[0].double() for x in (v, g, beta, do))
    K, V = k.shape[-1], v.shape[-1]

    def step(S, t, vt):   # S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, per head
        S = g[t].exp()[:, None, None] * S
        return S + beta[t][:, None, None] * k[t][..., None] * (vt[:, None] - (k[t][..., None] * S).sum(1, keepdim=True))

    fwd, bwd = [], []
    for s in segments:
        a, b = int(cu[s]), int(cu[s + 1])
        # forward: augmented state with values [v | 0]
        S = torch.zeros(HV, K, V + K, dtype=torch.float64)
        S[..., V:] = torch.eye(K, dtype=torch.float64)
        for t in range(a, b):
            S = step(S, t, torch.cat([v[t], v.new_zeros(HV, K)], dim=-1))
        fwd.append(S)
        # backward: G = dL/dS_start with nothing flowing into the end state
        S0 = torch.zeros(HV, K, V, dtype=torch.float64, requires_grad=True)
        S, loss = S0, 0.
        for t in range(a, b):
            S = step(S, t, v[t])
            loss = loss + (scale * (S * q[t][..., None]).sum(1) * do[t]).sum()
        (G,) = torch.autograd.grad(loss, S0)
        bwd.append(torch.cat([G, fwd[-1][..., V:]], dim=-1))   # the contract returns M, not Mᵀ
    return torch.stack(fwd), torch.stack(bwd)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30)).item()


def _check(out, ref, V, with_m, what):
    """Relative error of each segment's state columns and M columns separately."""
    assert out.shape == (ref.shape[0], ref.shape[1], ref.shape[2], ref.shape[3] if with_m else V), (what, out.shape)
    assert out.dtype == torch.float32
    for n in range(ref.shape[0]):
        err = _rel(out[n, ..., :V], ref[n, ..., :V])
        assert err <= TOL, f"{what} segment #{n}: state columns rel err {err:.2e}"
        if with_m:
            err = _rel(out[n, ..., V:], ref[n, ..., V:])
            assert err <= TOL, f"{what} segment #{n}: M rel err {err:.2e}"


# (H, HV, K, V, segment lengths, listed segments, slow-decay heads): GVA, K != V, every K and V in
# {16, 32, 64, 128}, packed spans with lengths off the chunk grid, subsets and unordered lists; K over
# 64 takes 2-4 row blocks of the state (K = 100: the last one part-masked, K = 256: FLA's default)
CASES = [
    (1, 1, 256, 32, [100], [0], True),
    (1, 2, 100, 24, [80, 30], [1, 0], True),
    (1, 2, 16, 32, [70, 5, 64], [0, 1, 2], True),
    (2, 4, 32, 16, [64, 130], [1], True),
    (1, 2, 128, 64, [200, 37], [1, 0], False),
    (2, 2, 64, 128, [1, 100, 9], [2, 0, 1], True),
    (1, 1, 128, 128, [129], [0], True),
    (1, 2, 16, 128, [33, 65], [0, 1], False),
]


@pytest.mark.parametrize("H,HV,K,V,lens,segments,slow", CASES)
def test_summary_kernels_vs_token_reference(H, HV, K, V, lens, segments, slow):
    q, k, v, g, beta, do, cu = _inputs(H, HV, K, V, lens, slow, seed=len(lens) * 1000 + K + V)
    scale = K ** -0.5
    ref_fwd, ref_bwd = _reference(q, k, v, g, beta, do, cu, segments, scale)
    q, k, v, g, beta, do, cu = (x.to(DEVICE) for x in (q, k, v, g, beta, do, cu))
    gl, w, u = wy_prep_torch(k, v, g, beta, cu, 64)
    for with_m in (True, False):
        hm = chunk_summary_fwd(k, w, u, gl, cu, segments, with_m)
        _check(hm, ref_fwd, V, with_m, f"fwd with_m={with_m}")
        gm = chunk_summary_bwd(q, k, w, gl, do, cu, segments, scale, with_m)
        _check(gm, ref_bwd, V, with_m, f"bwd with_m={with_m}")


def test_summary_kernels_refuse_k_over_256():
    q, k, v, g, beta, do, cu = _inputs(1, 1, 264, 8, [10], False, seed=0)
    with pytest.raises(ValueError, match="K <= 256"):
        chunk_summary_fwd(k, k, v, g, cu, [0], with_m=True)


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_summary_kernels_other_chunk_sizes(chunk_size):
    """Chunks of 16/32 tokens (FLA supports 16, 32, 64): the kernel walks the prep's chunk grid."""
    q, k, v, g, beta, do, cu = _inputs(1, 2, 32, 16, [50, 17], True, seed=chunk_size)
    ref_fwd, ref_bwd = _reference(q, k, v, g, beta, do, cu, [0, 1], 0.3)
    q, k, v, g, beta, do, cu = (x.to(DEVICE) for x in (q, k, v, g, beta, do, cu))
    gl, w, u = wy_prep_torch(k, v, g, beta, cu, chunk_size)
    _check(chunk_summary_fwd(k, w, u, gl, cu, [0, 1], True, chunk_size=chunk_size), ref_fwd, 16, True, "fwd")
    _check(chunk_summary_bwd(q, k, w, gl, do, cu, [0, 1], 0.3, True, chunk_size=chunk_size), ref_bwd, 16, True, "bwd")


def test_backend_matches_torch_backend():
    """`TritonBackend.summarize/state_grad` (its own prep, our kernels) vs `TorchBackend` on the same
    packed stream, and the empty segment list."""
    q, k, v, g, beta, do, cu = (x.to(DEVICE) for x in _inputs(2, 4, 64, 32, [90, 3, 140], True, seed=7))
    scale = 64 ** -0.5
    ours, theirs = summary_kernels_backend(), TorchBackend()
    p_ours = ours.prepare(q, k, v, g, beta, cu, scale)
    p_theirs = theirs.prepare(q, k, v, g, beta, cu, scale)
    # FLA's own prep (CUDA) keeps tf32 in places; the kernel-level tests above hold the 1e-5 bar
    tol = TOL if DEVICE == "cpu" else 2e-3
    for segments in ([2, 0], [1]):
        for with_m in (True, False):
            a, b = ours.summarize(p_ours, segments, with_m), theirs.summarize(p_theirs, segments, with_m)
            assert a.shape == b.shape and _rel(a, b) <= tol, ("summarize", segments, with_m, _rel(a, b))
            a, b = ours.state_grad(p_ours, do, segments, with_m), theirs.state_grad(p_theirs, do, segments, with_m)
            assert a.shape == b.shape and _rel(a, b) <= tol, ("state_grad", segments, with_m, _rel(a, b))
    assert ours.summarize(p_ours, [], True).shape == (0, 4, 64, 32 + 64)


def test_backend_wide_values_match_torch_backend():
    """V = 512 (FLA's default GatedDeltaNet, our `base` preset): V is tiled over column blocks, only K is
    limited. Summaries of the triton backend (our kernels) vs the torch backend, and vs the reference."""
    q, k, v, g, beta, do, cu = _inputs(1, 2, 16, 512, [70, 9], True, seed=5)
    scale = 16 ** -0.5
    ref_fwd, ref_bwd = _reference(q, k, v, g, beta, do, cu, [0, 1], scale)
    q, k, v, g, beta, do, cu = (x.to(DEVICE) for x in (q, k, v, g, beta, do, cu))
    ours, theirs = summary_kernels_backend(), TorchBackend()
    p_ours, p_theirs = ours.prepare(q, k, v, g, beta, cu, scale), theirs.prepare(q, k, v, g, beta, cu, scale)
    tol = TOL if DEVICE == "cpu" else 2e-3
    a, b = ours.summarize(p_ours, [0, 1], True), theirs.summarize(p_theirs, [0, 1], True)
    assert a.shape == (2, 2, 16, 512 + 16) and _rel(a, b) <= tol, _rel(a, b)
    _check(a, ref_fwd, 512, True, "fwd V=512")
    a, b = ours.state_grad(p_ours, do, [0, 1], True), theirs.state_grad(p_theirs, do, [0, 1], True)
    assert a.shape == (2, 2, 16, 512 + 16) and _rel(a, b) <= tol, _rel(a, b)
    _check(a, ref_bwd, 512, True, "bwd V=512")


def test_chunk_size_must_be_a_power_of_two_at_least_16():
    """48 used to fail inside the kernel ('arange's range must be a power of 2'), 8 ran in the
    interpreter only (tl.dot needs blocks >= 16 when compiled)."""
    for bad in (48, 8, 0, 64.0, True):
        with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16"):
            TritonBackend(chunk_size=bad)
    q, k, v, g, beta, do, cu = _inputs(1, 1, 16, 16, [50], False, seed=0)
    gl, w, u = wy_prep_torch(k, v, g, beta, cu, 16)
    with pytest.raises(ValueError, match="power of two >= 16, got 48"):
        chunk_summary_fwd(k, w, u, gl, cu, [0], True, chunk_size=48)
    assert TritonBackend(chunk_size=16).chunk_size == 16


# One program of each kernel reads a segment whose last chunks sit past 2^31 elements of u / do
# (token x HV x V: the int32 products once wrapped there, from ~262K tokens of one segment at HV=32,
# V=256). The tensors are lazily mapped zeros: only the pages the program reads cost memory. The
# zero head leaves the state as it is (k = w = u = q = 0, g = 0), so the summary must equal that of
# the tail alone.
_HUGE_OFFSETS = """
import mmap, sys
import torch
torch.set_num_threads(1)
from fla_cp.ops.triton import chunk_summary as cs
from fla_cp.ops.triton.utils import FP32_DOT_PRECISION
from triton_patches import fix_scalar_index   # scripts/: the suite's interpreter patch (fla_cp applies none)
assert cs.chunk_summary_fwd_kernel.__class__.__name__ == "InterpretedFunction"
fix_scalar_index()
H, HV, K, V, BT, BV = 1, 1024, 16, 256, 64, 32
TAIL = 2 * BT
T = 2 ** 31 // (HV * V) + TAIL

def zeros(*shape):
    n = 1
    for s in shape:
        n *= s
    return torch.frombuffer(mmap.mmap(-1, n * 4), dtype=torch.float32, count=n).view(*shape)

gen = torch.Generator().manual_seed(0)
big = dict(q=zeros(1, T, H, K), k=zeros(1, T, H, K), w=zeros(1, T, HV, K), u=zeros(1, T, HV, V),
           g=zeros(1, T, HV), do=zeros(1, T, HV, V))
tail = {n: torch.zeros(1, TAIL, *x.shape[2:]) for n, x in big.items()}
for n, x in tail.items():   # head 0 only: the one program launched reads nothing else
    if n == "g":            # a chunk-local cumsum of log-decays, log2 units
        x[0, :, 0] = -(torch.rand(TAIL, generator=gen) * 0.1).view(-1, BT).cumsum(-1).view(-1)
    else:
        x[0, :, 0] = torch.randn(TAIL, *x.shape[3:], generator=gen)
    big[n][0, T - TAIL:, 0] = x[0, :, 0]

def first_block(kernel, out_name, names, inputs, length):
    out = torch.zeros(1, HV, K, V)
    extra = dict(scale=0.5) if out_name == "gm" else {}
    kernel[(1, 1)](**{n: inputs[n] for n in names}, **extra, **{out_name: out}, cu_seqlens=torch.tensor([0, length]),
                   seg_ids=torch.tensor([0], dtype=torch.int32), H=H, HV=HV, K=K, V=V, W=V, BT=BT, BK=16, BV=BV,
                   IS_M=False, FP32_STATE=True, PRECISION=FP32_DOT_PRECISION)
    return out[0, 0, :, :BV]

for kernel, out_name, names in ((cs.chunk_summary_fwd_kernel, "hm", "kwug"),
                                (cs.chunk_summary_bwd_kernel, "gm", ("q", "k", "w", "g", "do"))):
    a, b = first_block(kernel, out_name, names, big, T), first_block(kernel, out_name, names, tail, TAIL)
    assert b.abs().max() > 0
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-6, (out_name, err)
print("OK")
"""


@pytest.mark.timeout(300)
def test_summary_kernels_offsets_past_int32():
    """Token offsets times row strides are taken in int64 (in the interpreter, as compiled: its int32
    arithmetic wraps the same way). A fresh interpreted process on CPU tensors, on any machine."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "scripts"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _HUGE_OFFSETS], env=env, capture_output=True, text=True, timeout=280)
    if "Cannot allocate memory" in run.stderr:
        pytest.skip("cannot map 9 GB of lazily allocated zeros here")
    assert run.returncode == 0 and "OK" in run.stdout, (run.returncode, run.stderr[-3000:])


def test_summary_composes_across_a_split():
    """Cutting one sequence in two and composing the halves' summaries gives the whole one's:
    H = M2 H1 + H2, M = M2 M1 forward; G = G1 + M1ᵀ G2 backward (the folds of DESIGN.md §2-3)."""
    q, k, v, g, beta, do, cu = (x.to(DEVICE) for x in _inputs(1, 2, 32, 32, [150], True, seed=3))
    whole = wy_prep_torch(k, v, g, beta, cu, 64)
    split = torch.tensor([0, 77, 150], device=DEVICE)
    halves = wy_prep_torch(k, v, g, beta, split, 64)
    V = 32
    f = chunk_summary_fwd(k, *whole[1:], whole[0], cu, [0], True)[0]
    f1, f2 = chunk_summary_fwd(k, *halves[1:], halves[0], split, [0, 1], True)
    assert _rel(f2[..., V:] @ f1[..., :V] + f2[..., :V], f[..., :V]) <= TOL
    assert _rel(f2[..., V:] @ f1[..., V:], f[..., V:]) <= TOL
    b = chunk_summary_bwd(q, k, whole[1], whole[0], do, cu, [0], 0.2, True)[0]
    b1, b2 = chunk_summary_bwd(q, k, halves[1], halves[0], do, split, [0, 1], 0.2, True)
    assert _rel(b1[..., :V] + b1[..., V:].transpose(-1, -2) @ b2[..., :V], b[..., :V]) <= TOL


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels need a GPU (the interpreter has no bf16 math)")
def test_summary_kernels_bf16_cuda():
    """bf16 inputs through FLA's prep and our kernels vs fp32 through the same path: the M chain
    stays fp32, so M is as accurate as its bf16 inputs allow."""
    q, k, v, g, beta, do, cu = (x.to(DEVICE) for x in _inputs(2, 4, 128, 128, [1000, 300], True, seed=11))
    ours = TritonBackend()
    p32 = ours.prepare(q, k, v, g, beta, cu, 0.1)
    p16 = ours.prepare(*(x.bfloat16() for x in (q, k, v)), g, beta.bfloat16(), cu, 0.1)
    for segs in ([0, 1],):
        a, b = ours.summarize(p16, segs, True), ours.summarize(p32, segs, True)
        assert _rel(a, b) <= 1e-2, _rel(a, b)
        a, b = ours.state_grad(p16, do.bfloat16(), segs, True), ours.state_grad(p32, do, segs, True)
        assert _rel(a, b) <= 1e-2, _rel(a, b)


@pytest.mark.timeout(300)
# sm_80 compiles the same kernels again (~30 s): slow, run by `pytest -m slow` (CI runs it)
@pytest.mark.parametrize("arch", [pytest.param(80, marks=pytest.mark.slow), 90])
def test_kernels_compile_for_gpus(arch):
    """Our kernels compiled (not interpreted) for A100 / H100 code, no GPU needed: Triton lowers them to
    PTX and cubin here, which catches what the interpreter lets through (types that differ between
    branches, constexpr misuse, shared memory over the limit). A fresh process: this one holds the
    interpreted kernels."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    nvidia = Path(__import__("triton").__file__).parent / "backends" / "nvidia"
    if not nvidia.is_dir():
        pytest.skip("this Triton build has no NVIDIA backend")
    script = Path(__file__).resolve().parents[3] / "scripts" / "kernel_resources.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--arch", str(arch), "--default-only", "--shapes", "main,small"],
                         env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("fwd ", "bwd "))]
    assert len(rows) == 2 * 2 * 2 * 2, run.stdout     # kernels x shapes x dtypes x (H/G, M launch)
    # every row reports a register count from ptxas: the cubin was really built
    assert all(int(line.split()[8]) > 0 for line in rows), run.stdout


def test_autotune_switch_covers_fla_kernels(monkeypatch):
    """FLA_CP_AUTOTUNE=0 prunes FLA's autotuned kernels to their first config too, so a correctness
    run on a fresh GPU compiles one config per kernel and shape; unset, every config stays."""
    from fla.ops.common import chunk_delta_h
    from triton.runtime.autotuner import Autotuner

    from _interpret import untuned_autotuners              # scripts/triton_patches.py: fla_cp applies none
    untuned_autotuners()                                    # done by conftest.py; idempotent
    tuner = chunk_delta_h.chunk_gated_delta_rule_fwd_kernel_h_blockdim64
    while not isinstance(tuner, Autotuner):                 # under FLA's heuristics
        tuner = tuner.fn
    tuner.nargs = {}
    monkeypatch.delenv("FLA_CP_AUTOTUNE", raising=False)
    assert len(tuner.configs) > 1 and tuner.prune_configs({}) == tuner.configs
    monkeypatch.setenv("FLA_CP_AUTOTUNE", "0")
    assert tuner.prune_configs({}) == tuner.configs[:1]
