"""`attention_cp` on P gloo ranks vs an independent fp64 single-process reference (fp32, rel <= 1e-5).

The reference builds the explicit `[T, T]` boolean mask of every row from document ids, positions, the
window and the padding mask, and runs a plain fp64 softmax. Each P runs every case in one spawn.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fla_cp.ops import attention_cp, build_cp_context

from _dist import run_ranks

TOL = 1e-5

# 50 tokens: document [4, 45) crosses every part boundary for P <= 4 (3+ parts, both layouts),
# documents of 1-5 tokens, some on part boundaries
PACKED = [0, 3, 4, 45, 46, 50]

CASES = [
    dict(name="dense_gqa_full", B=2, T=37, H=4, Hkv=2, D=8, Dv=6),
    dict(name="dense_gqa_full_zigzag", B=2, T=37, H=4, Hkv=2, D=8, Dv=6, layout="zigzag"),
    dict(name="dense_left_pad_window", B=2, T=37, H=2, Hkv=1, D=5, Dv=5, W=5, pad="left"),
    dict(name="dense_right_pad_full_zigzag", B=2, T=41, H=4, Hkv=2, D=8, Dv=8, pad="right", layout="zigzag"),
    dict(name="dense_left_pad_local_mask_big_window", B=2, T=23, H=2, Hkv=2, D=4, Dv=3, W=30, pad="left",
         local_mask=True),
    dict(name="packed_gqa_full", cu=PACKED, H=4, Hkv=2, D=8, Dv=8),
    dict(name="packed_gqa_full_zigzag_pad", cu=PACKED, H=4, Hkv=2, D=8, Dv=8, layout="zigzag", pad="right"),
    dict(name="packed_w1", cu=PACKED, H=2, Hkv=1, D=4, Dv=4, W=1),
    dict(name="packed_w4_zigzag", cu=PACKED, H=4, Hkv=2, D=8, Dv=6, W=4, layout="zigzag"),
    dict(name="packed_w20_bigger_than_part", cu=PACKED, H=2, Hkv=2, D=6, Dv=6, W=20),
    dict(name="packed_w20_zigzag_left_pad", cu=PACKED, H=2, Hkv=1, D=6, Dv=6, W=20, layout="zigzag", pad="left"),
    dict(name="packed_non_causal", cu=PACKED, H=2, Hkv=1, D=4, Dv=4, causal=False, layout="zigzag"),
    dict(name="dense_non_causal_pad", B=2, T=19, H=2, Hkv=2, D=4, Dv=4, causal=False, pad="left"),
    # the other kernels of a part (attention_kernels): SDPA with the boolean mask; flash-attn's varlen
    # function (on CPU: the stand-in of tests/cp/_flash_stand_in.py, flash-attn's documented semantics)
    dict(name="sdpa_dense_gqa_full_zigzag_pad", B=2, T=37, H=4, Hkv=2, D=8, Dv=6, layout="zigzag", pad="left",
         kernel="sdpa"),
    dict(name="sdpa_packed_w4", cu=PACKED, H=4, Hkv=2, D=8, Dv=6, W=4, kernel="sdpa"),
    dict(name="flash_dense_left_pad_window", B=2, T=37, H=2, Hkv=1, D=5, Dv=5, W=5, pad="left", kernel="flash"),
    dict(name="flash_packed_full_zigzag_pad", cu=PACKED, H=4, Hkv=2, D=8, Dv=8, layout="zigzag", pad="right",
         kernel="flash"),
    dict(name="flash_packed_w20_zigzag", cu=PACKED, H=2, Hkv=1, D=6, Dv=4, W=20, layout="zigzag", kernel="flash"),
    dict(name="flash_packed_non_causal", cu=PACKED, H=2, Hkv=1, D=4, Dv=4, causal=False, kernel="flash"),
]


def use_flash_stand_in():
    """flash-attn's varlen function replaced by the CPU stand-in, and allowed on CPU (in this process)."""
    import _flash_stand_in

    from fla_cp.ops import attention_kernels
    attention_kernels._FLASH_VARLEN = _flash_stand_in.flash_attn_varlen_func
    attention_kernels._flash_unavailable = lambda q, head_dim_v: None


def make_inputs(case: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    B = case.get("B", 1)
    T = case["cu"][-1] if "cu" in case else case["T"]
    q = torch.randn(B, T, case["H"], case["D"], generator=gen)
    k = torch.randn(B, T, case["Hkv"], case["D"], generator=gen)
    v = torch.randn(B, T, case["Hkv"], case["Dv"], generator=gen)
    mask = None
    if case.get("pad"):
        mask = torch.ones(B, T, dtype=torch.long)
        for b in range(B):
            n = 3 + 5 * b                                      # rows padded differently
            if case["pad"] == "left":
                mask[b, :n] = 0
            else:
                mask[b, T - n:] = 0
    w = torch.randn(B, T, case["H"], case["Dv"], generator=gen)   # loss weights
    return q, k, v, mask, w


def reference(case: dict, seed: int):
    """fp64 softmax attention with an explicit [T, T] mask per row; padded / keyless rows output 0."""
    q, k, v, mask, w = make_inputs(case, seed)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    q, k, v = leaves
    B, T, H, D = q.shape
    r = H // k.shape[2]
    kk, vv = k.repeat_interleave(r, 2), v.repeat_interleave(r, 2)
    cu = case.get("cu", [0, T])
    doc = torch.zeros(T, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        doc[a:b] = i
    pos = torch.arange(T)
    allowed = doc[:, None] == doc[None, :]
    if case.get("causal", True):
        allowed &= pos[None, :] <= pos[:, None]
    if case.get("W"):
        allowed &= pos[:, None] - pos[None, :] < case["W"]
    allowed = allowed.expand(B, T, T).clone()
    if mask is not None:
        allowed &= mask.bool()[:, None, :]
    s = torch.einsum("bthd,bshd->bhts", q, kk) * D ** -0.5
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = torch.einsum("bhts,bshd->bthd", p, vv)
    if mask is not None:
        o = o * mask[:, :, None, None]
    (o * w.double()).sum().backward()
    return o.detach(), [x.grad for x in leaves]


def run_cp(case: dict, seed: int, ctx):
    """CP forward + backward; returns the unsharded output and the full gradients (summed over ranks)."""
    q, k, v, mask, w = make_inputs(case, seed)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    local = [ctx.shard(x) for x in leaves]
    m = ctx.shard(mask) if mask is not None and case.get("local_mask") else mask
    o = attention_cp(*local, ctx, causal=case.get("causal", True), window_size=case.get("W"), attention_mask=m,
                     backend=case.get("kernel", "auto"))
    assert o.dtype == torch.float32 and torch.isfinite(o).all()
    (o * ctx.shard(w)).sum().backward()
    grads = [x.grad.clone() for x in leaves]
    for g in grads:
        dist.all_reduce(g)
    return ctx.unshard(o.detach(), verify_agreement=False), grads


def _worker(rank, world_size, cases, seeds):
    use_flash_stand_in()
    out = []
    for case in cases:
        layout = case.get("layout", "contiguous")
        ctx = (build_cp_context(None, cu_seqlens=case["cu"], layout=layout) if "cu" in case
               else build_cp_context(None, seq_len=case["T"], layout=layout))
        out.append([run_cp(case, seed, ctx) for seed in seeds])
    return out


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def errors(got, ref) -> dict:
    return {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), [got[0], *got[1]], [ref[0], *ref[1]])}


SEEDS = [int(s) for s in torch.randint(0, 2**31 - 1, (2,))]   # fresh every session (printed on failure)


@pytest.mark.timeout(300)
# P = 3 (odd) and 4 run in the slow run (`pytest -m slow`, CI's second step), for the default suite's time
@pytest.mark.parametrize("world_size", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_matches_fp64_reference(world_size):
    got = run_ranks(_worker, world_size, (CASES, SEEDS))[0]
    for case, per_seed in zip(CASES, got):
        for seed, res in zip(SEEDS, per_seed):
            for name, err in errors(res, reference(case, seed)).items():
                assert err <= TOL, f"P={world_size} {case['name']} seed={seed}: {name} rel err {err:.2e} > {TOL}"


def test_single_process_packed_cu_seqlens():
    """cp_context=None with packed local boundaries is the P=1 result."""
    case = dict(cu=PACKED, H=4, Hkv=2, D=8, Dv=8, W=7)
    q, k, v, _, _ = make_inputs(case, 0)
    o = attention_cp(q, k, v, cu_seqlens=torch.tensor(PACKED), window_size=7)
    ref, _ = reference(case, 0)
    assert rel_err(o, ref) <= TOL


def test_keyless_rows_are_zero_not_nan():
    q, k, v = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    q.requires_grad_()
    o = attention_cp(q, k, v, attention_mask=mask, causal=False)
    o.sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()
    assert (o[0, [0, 1, 5]] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=torch.randn(1, 8, 3, 4), v=torch.randn(1, 8, 3, 4)), "H % Hkv"),
    (dict(k=torch.randn(1, 8, 2, 5)), "k has shape"),
    (dict(v=torch.randn(1, 7, 2, 4)), "v has shape"),
    (dict(k=torch.randn(1, 8, 2, 4, dtype=torch.float64)), "share a dtype"),
    (dict(window_size=0), "window_size"),
    (dict(window_size=3, causal=False), "window_size needs causal"),
    (dict(attention_mask=torch.ones(1, 5)), "attention_mask must be"),
    (dict(scale=float("nan")), "scale"),
    (dict(backend="triton"), "backend"),
])
def test_local_errors(kwargs, match):
    args = dict(q=torch.randn(1, 8, 4, 4), k=torch.randn(1, 8, 2, 4), v=torch.randn(1, 8, 2, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attention_cp(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while running fn (saved_tensors_hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


MEM_T = 64


def _saved_bytes_of_op(ctx, window=None) -> int:
    q, k, v = (torch.randn(1, MEM_T, 4, 16) for _ in range(3))
    local = [(ctx.shard(x) if ctx is not None else x).requires_grad_() for x in (q, k, v)]
    return _saved_bytes(lambda: attention_cp(*local, ctx, window_size=window))


def _error_worker(rank, world_size, seeds):
    ctx = build_cp_context(None, seq_len=20)
    q, k, v = torch.randn(1, 10, 2, 4), torch.randn(1, 10, 2, 4), torch.randn(1, 10, 2, 4)
    messages = []
    for kwargs in (dict(window_size=4 + rank),                               # differs between ranks
                   dict(k=torch.randn(1, 10, 2, 3)) if rank == 1 else {},    # bad shape on rank 1 only
                   dict(attention_mask=torch.ones(1, 7)) if rank == 0 else {}):
        args = {**dict(q=q, k=k, v=v), **kwargs}
        try:
            attention_cp(args.pop("q"), args.pop("k"), args.pop("v"), ctx, **args)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    # saved-tensor bytes of one call (same spawn: spawning costs more than the calls)
    mem_ctx = build_cp_context(None, seq_len=MEM_T, layout="zigzag")
    saved = [_saved_bytes_of_op(mem_ctx), _saved_bytes_of_op(mem_ctx, window=8)]
    return messages, saved, _past_worker(rank, world_size, seeds)     # (test_past_key_value_matches_...)


@pytest.fixture(scope="module")
def two_ranks():
    """One spawn of 2 ranks for the error, memory and continuation checks (spawning costs more than they do)."""
    return run_ranks(_error_worker, 2, (SEEDS,))      # (a spawned rank draws its own SEEDS at import)


@pytest.mark.timeout(120)
def test_errors_raise_on_every_rank_and_saved_tensors_are_local(two_ranks):
    """Mismatched or bad input raises on every rank, naming the argument and the rank. Autograd keeps
    this rank's q, k, v only (1/P of one process's bytes), never the gathered K/V or the scores."""
    single = _saved_bytes_of_op(None)
    assert single == 3 * MEM_T * 4 * 16 * 4, single
    for messages, saved, _ in two_ranks:
        window, shape, mask = messages
        assert window and "window_size" in window and "differs between ranks" in window
        assert shape and "rank 1" in shape and "k has shape" in shape
        assert mask and "rank 0" in mask and "attention_mask" in mask
        assert saved == [single // 2, single // 2], (saved, single)


# ------------------------------------------------------------------ continuation: cached keys before the call
PAST_CASES = [
    dict(name="past_full_gqa_padded_past", B=2, T=20, Lp=7, H=4, Hkv=2, D=4, past_pad=3),
    dict(name="past_window_zigzag", B=2, T=20, Lp=4, H=2, Hkv=1, D=4, W=5, layout="zigzag"),
    dict(name="past_window_longer_than_past_sdpa", B=1, T=16, Lp=3, H=2, Hkv=2, D=4, W=8, kernel="sdpa"),
    dict(name="past_window_flash_padded", B=2, T=20, Lp=5, H=2, Hkv=1, D=4, W=6, past_pad=2, kernel="flash"),
]


def past_inputs(case: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, T, Lp, H, Hkv, D = (case[k] for k in ("B", "T", "Lp", "H", "Hkv", "D"))
    q, k, v = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, Hkv, D, generator=gen), \
        torch.randn(B, T, Hkv, D, generator=gen)
    kp, vp = torch.randn(B, Lp, Hkv, D, generator=gen), torch.randn(B, Lp, Hkv, D, generator=gen)
    past_mask = None
    if case.get("past_pad"):
        past_mask = torch.ones(B, Lp, dtype=torch.long)
        past_mask[0, :case["past_pad"]] = 0                  # row 0 left-padded (its pads are in the cache)
    w = torch.randn(B, T, H, D, generator=gen)
    return q, k, v, kp, vp, past_mask, w


def past_reference(case: dict, seed: int):
    """fp64: the queries of the call over [cached keys; the call's keys] at positions -Lp..T-1."""
    q, k, v, kp, vp, past_mask, w = past_inputs(case, seed)
    leaves = [x.double().requires_grad_() for x in (q, k, v, kp, vp)]
    q, k, v, kp, vp = leaves
    B, T, H, D = q.shape
    Lp, r = kp.shape[1], H // k.shape[2]
    kk, vv = torch.cat([kp, k], 1).repeat_interleave(r, 2), torch.cat([vp, v], 1).repeat_interleave(r, 2)
    qpos, kpos = torch.arange(T), torch.arange(-Lp, T)
    allowed = kpos[None, :] <= qpos[:, None]
    if case.get("W"):
        allowed &= qpos[:, None] - kpos[None, :] < case["W"]
    allowed = allowed.expand(B, T, T + Lp).clone()
    if past_mask is not None:
        allowed[:, :, :Lp] &= past_mask.bool()[:, None, :]
    s = torch.einsum("bthd,bshd->bhts", q, kk) * D ** -0.5
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1), vv)
    (o * w.double()).sum().backward()
    return o.detach(), [x.grad for x in leaves]


def run_past(case: dict, seed: int, ctx):
    """CP forward + backward with cached keys; the call's gradients and the cached keys' partial ones summed."""
    q, k, v, kp, vp, past_mask, w = past_inputs(case, seed)
    leaves = [x.requires_grad_() for x in (q, k, v, kp, vp)]
    o = attention_cp(*(ctx.shard(x) for x in leaves[:3]), ctx, window_size=case.get("W"),
                     past_key_value=(leaves[3], leaves[4]), past_mask=past_mask, backend=case.get("kernel", "auto"))
    (o * ctx.shard(w)).sum().backward()
    grads = [x.grad.clone() for x in leaves]
    if ctx.world_size > 1:
        for g in grads:       # the call's: each rank its own rows; the cached keys': partial shares
            dist.all_reduce(g)
    return ctx.unshard(o.detach(), verify_agreement=False), grads


def _past_worker(rank, world_size, seeds):
    use_flash_stand_in()
    return [[run_past(case, seed, build_cp_context(None, seq_len=case["T"], layout=case.get("layout", "contiguous")))
             for seed in seeds] for case in PAST_CASES]


@pytest.mark.timeout(120)
def test_past_key_value_matches_fp64_reference(two_ranks):
    """P = 2: a continuation's cached keys (replicated on every rank) are seen by every query within the
    window, masked by `past_mask`; their gradient shares sum over ranks to one device's. (One process:
    the layer's cache tests against FLA's own forward, tests/cp/layers/test_attention_layer.py.)"""
    world_size, got = 2, two_ranks[0][2]
    for case, per_seed in zip(PAST_CASES, got):
        for seed, (o, grads) in zip(SEEDS, per_seed):
            ro, rgrads = past_reference(case, seed)
            for name, a, b in zip(("o", "dq", "dk", "dv", "dk_past", "dv_past"), [o, *grads], [ro, *rgrads]):
                err = rel_err(a, b)
                assert err <= TOL, f"P={world_size} {case['name']} seed={seed}: {name} rel err {err:.2e} > {TOL}"


def test_past_key_value_errors():
    q, k, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4)
    kp, vp = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="packed"):
        attention_cp(q, k, v, cu_seqlens=torch.tensor([0, 3, 8]), past_key_value=(kp, vp))
    with pytest.raises(ValueError, match="past_key_value must be k_past"):
        attention_cp(q, k, v, past_key_value=(kp, vp[:, :, :1]))
    with pytest.raises(ValueError, match="past_mask must be"):
        attention_cp(q, k, v, past_key_value=(kp, vp), past_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="past_mask needs past_key_value"):
        attention_cp(q, k, v, past_mask=torch.ones(1, 3))
