"""AttentionCP (FLA's `Attention` under CP) on P gloo ranks vs an independent fp64 single-process reference.

The reference (written here, sharing no code with the layer) runs FLA's math in fp64: the projections,
per-head RMSNorm of q/k (`qk_norm`), RoPE from FLA's formula (non-interleaved halves; angle
`pos * inv_freq` in fp32 with `inv_freq = 1 / base ** (arange(0, d, 2) / d)` in fp32, as FLA's
`RotaryEmbedding` builds its tables, then cos/sin in fp64) with `pos` the index in the row (dense; a
padding mask does not shift it) or in the document (packed), an explicit `[T, T]` mask per row (same
document, causal, window `t - s < W`, key not padding) and a plain softmax, padded rows 0, `o_proj`.
Checked (fp32, relative error <= 1e-5): the all-gathered output, the input gradient and every parameter
gradient (summed over ranks), P = 1..4, contiguous and zigzag, one spawn per P. Also: the single-process
path (cp_context=None), the parameters against FLA's own `Attention` (built with its flash-attn guard
bypassed), RoPE against FLA's torch reference, and the errors.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fla_cp.layers import AttentionCP
from fla_cp.ops import build_cp_context

from _dist import run_ranks

TOL = 1e-5
HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
EPS = 1e-5          # FLA's RMSNorm default (asserted below)

# 50 tokens: document [4, 45) crosses every part boundary for P <= 4 (both layouts); 1-token documents
PACKED = [0, 3, 4, 45, 46, 50]

CASES = [
    dict(name="dense_gqa_left_pad", B=2, T=37, Hkv=2, pad="left"),
    dict(name="dense_zigzag_window_qknorm_right_pad_bias", B=2, T=37, Hkv=1, W=6, qk_norm=True, pad="right",
         qkv_bias=True, layout="zigzag"),
    dict(name="dense_zigzag_full_no_mask_local_theta", B=2, T=37, Hkv=4, layout="zigzag", rope_theta=300.0),
    dict(name="dense_window_local_mask", B=2, T=23, Hkv=2, W=9, pad="left", local_mask=True),
    dict(name="packed_gqa_full_qknorm", cu=PACKED, Hkv=2, qk_norm=True, rope_theta=500.0),
    dict(name="packed_zigzag_window_bias", cu=PACKED, Hkv=2, W=5, qkv_bias=True, layout="zigzag"),
    dict(name="packed_window_longer_than_parts_qknorm", cu=PACKED, Hkv=1, W=20, qk_norm=True, layout="zigzag"),
]


def layer_kwargs(case: dict) -> dict:
    return dict(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=case["Hkv"], qkv_bias=case.get("qkv_bias", False),
                qk_norm=case.get("qk_norm", False), window_size=case.get("W"),
                rope_theta=case.get("rope_theta", 10000.0), max_position_embeddings=64, layer_idx=0)


def make_layer(case: dict, seed: int) -> AttentionCP:
    """The same weights on every rank: a fixed seed (the norms' weights perturbed so that they matter)."""
    torch.manual_seed(seed)
    layer = AttentionCP(**layer_kwargs(case))
    if layer.qk_norm:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            layer.q_norm.weight.copy_(1 + 0.5 * torch.randn(HEAD_DIM, generator=g))
            layer.k_norm.weight.copy_(1 + 0.5 * torch.randn(HEAD_DIM, generator=g))
    return layer


def make_inputs(case: dict, seed: int):
    g = torch.Generator().manual_seed(seed + 2)
    B = case.get("B", 1)
    T = case["cu"][-1] if "cu" in case else case["T"]
    x = 2.0 * torch.randn(B, T, HIDDEN, generator=g)       # scores far from uniform
    mask = None
    if case.get("pad"):
        mask = torch.ones(B, T, dtype=torch.long)
        for b in range(B):
            n = 3 + 5 * b
            if case["pad"] == "left":
                mask[b, :n] = 0
            else:
                mask[b, T - n:] = 0
    w = torch.randn(B, T, HIDDEN, generator=g)             # loss weights
    return x, mask, w


# ------------------------------------------------------------------ the fp64 reference
def fla_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """FLA's `RotaryEmbedding._compute_inv_freq`, fp32."""
    return 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def positions_and_docs(case: dict):
    T = case["cu"][-1] if "cu" in case else case["T"]
    cu = case.get("cu", [0, T])
    doc = torch.zeros(T, dtype=torch.long)
    pos = torch.zeros(T, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        doc[a:b] = i
        pos[a:b] = torch.arange(b - a)
    return pos, doc


def reference(case: dict, seed: int):
    """(o, dx, {name: dparam}) in fp64."""
    layer = make_layer(case, seed)
    x, mask, w = make_inputs(case, seed)
    P = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    xx = x.double().requires_grad_()
    B, T, _ = x.shape
    Hkv, Dh = case["Hkv"], HEAD_DIM

    def proj(name):
        y = xx @ P[f"{name}.weight"].T
        return y + P[f"{name}.bias"] if f"{name}.bias" in P else y

    q = proj("q_proj").reshape(B, T, HEADS, Dh)
    k = proj("k_proj").reshape(B, T, Hkv, Dh)
    v = proj("v_proj").reshape(B, T, Hkv, Dh)
    if case.get("qk_norm"):
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + EPS) * P["q_norm.weight"]
        k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + EPS) * P["k_norm.weight"]
    pos, doc = positions_and_docs(case)
    angle = (pos.float()[:, None] * fla_inv_freq(case.get("rope_theta", 10000.0), Dh)[None, :]).double()
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(t):
        t0, t1 = t[..., :Dh // 2], t[..., Dh // 2:]
        return torch.cat([t0 * cos - t1 * sin, t0 * sin + t1 * cos], -1)

    q, k = rope(q), rope(k)
    r = HEADS // Hkv
    k, v = k.repeat_interleave(r, 2), v.repeat_interleave(r, 2)
    t = torch.arange(T)
    allowed = (doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None])
    if case.get("W"):
        allowed &= t[:, None] - t[None, :] < case["W"]
    allowed = allowed.expand(B, T, T).clone()
    if mask is not None:
        allowed &= mask.bool()[:, None, :]
    s = torch.einsum("bthd,bshd->bhts", q, k) * Dh ** -0.5
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    o = torch.einsum("bhts,bshd->bthd", p, v)
    if mask is not None:
        o = o * mask[:, :, None, None]
    o = o.reshape(B, T, HEADS * Dh) @ P["o_proj.weight"].T
    (o * w.double()).sum().backward()
    return o.detach(), xx.grad, {n: p.grad for n, p in P.items()}


# ------------------------------------------------------------------ CP
def run_cp(case: dict, seed: int, ctx, verify_agreement: bool = True):
    """CP forward + backward: (the all-gathered output, the input gradient and the parameter gradients
    summed over ranks)."""
    layer = make_layer(case, seed)
    x, mask, w = make_inputs(case, seed)
    x.requires_grad_()
    m = ctx.shard(mask) if mask is not None and case.get("local_mask") else mask
    o, attn, cache = layer(ctx.shard(x), cp_context=ctx, attention_mask=m, verify_agreement=verify_agreement)
    assert attn is None and cache is None and o.dtype == torch.float32 and torch.isfinite(o).all()
    (o * ctx.shard(w)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    dx = x.grad.clone()
    if ctx.world_size > 1:
        for gr in [dx, *grads.values()]:
            dist.all_reduce(gr)
    return ctx.unshard(o.detach(), verify_agreement=False), dx, grads


def _worker(rank, world_size, cases, seeds):
    from fla_cp.layers.attention_cp import rope_positions
    out = []
    for case in cases:
        layout = case.get("layout", "contiguous")
        ctx = (build_cp_context(None, cu_seqlens=case["cu"], layout=layout) if "cu" in case
               else build_cp_context(None, seq_len=case["T"], layout=layout))
        # RoPE is relative: a constant shift of a document's positions leaves the output unchanged up to
        # rounding, so the outputs alone would not catch local indices; the positions themselves must be
        # the global per-document ones
        assert torch.equal(rope_positions(ctx, "cpu"), ctx.shard(positions_and_docs(case)[0], dim=0)), case["name"]
        out.append([run_cp(case, seed, ctx, verify_agreement=(i == 0)) for i, seed in enumerate(seeds)])
    messages = _mismatch_messages(rank) if world_size == 2 else None
    return out, messages


def _mismatch_messages(rank):
    """One rank's bad input raises on every rank (naming the argument), never hangs."""
    ctx = build_cp_context(None, seq_len=20)
    layer = make_layer(dict(Hkv=2, W=4), 0)
    x = torch.randn(1, ctx.local_len, HIDDEN)
    messages = []
    from fla.models.cache_utils import Cache
    bad = Cache()
    bad.update(attn_state=(torch.zeros(2, 5, 2 * HEAD_DIM), torch.zeros(2, 5, 2 * HEAD_DIM)), layer_idx=0, offset=5)
    for kwargs in (dict(past_key_values=bad) if rank == 1 else {},
                   dict(attention_mask=torch.ones(1, 7)) if rank == 0 else {}):
        try:
            layer(x, cp_context=ctx, **kwargs)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    with torch.set_grad_enabled(rank == 0):   # a rank recording no graph while the other does: a hang in backward
        try:
            layer(x, cp_context=ctx)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def case_errors(got, ref) -> dict:
    o, dx, grads = got
    ro, rdx, rgrads = ref
    assert set(grads) == set(rgrads)
    return {"o": rel_err(o, ro), "dx": rel_err(dx, rdx), **{f"d{n}": rel_err(grads[n], rgrads[n]) for n in rgrads}}


SEEDS = [int(s) for s in torch.randint(0, 2**31 - 1, (2,))]   # fresh every session (printed on failure)


@pytest.mark.timeout(300)
# P = 3 (odd) and 4 run in the slow run (`pytest -m slow`, CI's second step), for the default suite's time
@pytest.mark.parametrize("world_size", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_cp_layer_matches_fp64_reference(world_size):
    results = run_ranks(_worker, world_size, (CASES, SEEDS))
    got = results[0][0]
    worst = 0.0
    for case, per_seed in zip(CASES, got):
        for seed, res in zip(SEEDS, per_seed):
            for name, err in case_errors(res, reference(case, seed)).items():
                worst = max(worst, err)
                assert err <= TOL, f"P={world_size} {case['name']} seed={seed}: {name} rel err {err:.2e} > {TOL}"
    print(f"P={world_size}: worst relative error {worst:.2e} (seeds {SEEDS})")
    if world_size == 2:
        for _, msgs in results:
            cache, mask, graph = msgs
            assert cache and "rank 1" in cache and "one K/V row per input row" in cache
            assert mask and "rank 0" in mask and "attention_mask" in mask
            assert graph and "records a graph" in graph and "differs between ranks" in graph


# ------------------------------------------------------------------ without CP
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=lambda c: c["name"])
def test_single_process_matches_fp64_reference(case):
    """cp_context=None: dense rows with a padding mask, or packed `cu_seqlens` (B = 1)."""
    seed = SEEDS[0]
    layer = make_layer(case, seed)
    x, mask, w = make_inputs(case, seed)
    x.requires_grad_()
    cu = torch.tensor(case["cu"]) if "cu" in case else None
    o, _, _ = layer(x, attention_mask=mask, cu_seqlens=cu)
    (o * w).sum().backward()
    got = (o.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()})
    for name, err in case_errors(got, reference(case, seed)).items():
        assert err <= TOL, f"{case['name']} seed={seed}: {name} rel err {err:.2e} > {TOL}"


# ------------------------------------------------------------------ FLA compatibility
@pytest.mark.parametrize("kw", [dict(num_kv_heads=2), dict(num_kv_heads=1, qk_norm=True, qkv_bias=True, window_size=8),
                                dict(num_kv_heads=None, rope_theta=500.0)])
def test_parameters_match_fla_attention(monkeypatch, kw):
    """FLA's `Attention` (its flash-attn guard bypassed: construction needs nothing else) and AttentionCP
    built with the same seed: the same submodules, parameter names, shapes, dtypes and values; state dicts
    load both ways (strict)."""
    import fla.layers.attn as fla_attn
    args = dict(hidden_size=HIDDEN, num_heads=HEADS, max_position_embeddings=64, layer_idx=3, **kw)
    torch.manual_seed(7)
    ours = AttentionCP(**args)                       # flash-attn absent here: AttentionCP builds FLA's modules
    monkeypatch.setattr(fla_attn, "flash_attn_func", object())
    torch.manual_seed(7)
    theirs = fla_attn.Attention(**args)
    assert isinstance(ours, fla_attn.Attention)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [type(m) for _, m in ours.named_modules()][1:] == [type(m) for _, m in theirs.named_modules()][1:]
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for n in sd_theirs:
        assert sd_ours[n].shape == sd_theirs[n].shape and sd_ours[n].dtype == sd_theirs[n].dtype, n
        assert torch.equal(sd_ours[n], sd_theirs[n]), n
    for attr in ("hidden_size", "num_heads", "num_kv_heads", "num_kv_groups", "head_dim", "kv_dim", "qkv_bias",
                 "qk_norm", "window_size", "rope_theta", "max_position_embeddings", "layer_idx"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert torch.equal(ours.rotary.inv_freq, theirs.rotary.inv_freq)
    theirs.load_state_dict(sd_ours, strict=True)
    fresh = AttentionCP(**args)
    fresh.load_state_dict(sd_theirs, strict=True)


def test_rope_matches_fla_reference():
    """The layer's RoPE == FLA's torch reference (`rotary_embedding_ref`) on rows of FLA's own cos/sin
    tables (`RotaryEmbedding._update_cos_sin_cache`), at arbitrary positions, fp32 and bf16."""
    from fla.modules.rotary.ops import rotary_embedding_ref
    layer = AttentionCP(hidden_size=64, num_heads=4, rope_theta=1000.0)
    pos = torch.tensor([0, 5, 1, 2, 40, 39, 63, 7])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, len(pos), 4, 16).to(dtype)
        layer.rotary._update_cos_sin_cache(64, device=x.device, dtype=dtype)
        cos, sin = layer.rotary._cos_cached[pos], layer.rotary._sin_cached[pos]
        # FLA's kernel rotates in fp32 and stores in x's dtype
        want = rotary_embedding_ref(x.float(), cos.float(), sin.float()).to(dtype)
        assert torch.equal(layer._rope(x, pos), want), dtype


# ------------------------------------------------------------------ errors
def test_errors():
    case = dict(Hkv=2, W=4)
    layer = make_layer(case, 0)
    ctx = build_cp_context(None, seq_len=12)           # one rank: the local checks
    x = torch.randn(1, 12, HIDDEN)
    from fla.models.cache_utils import Cache
    cache = Cache()
    layer(x, past_key_values=cache, use_cache=True)     # a prefill fills the cache: [1, W, Hkv*D]
    assert cache[0]["attn_state"][0].shape == (1, 4, 2 * HEAD_DIM) and cache.get_seq_length(0) == 12
    with pytest.raises(ValueError, match="one K/V row per input row"):
        layer(torch.randn(2, 1, HIDDEN), past_key_values=cache)
    with pytest.raises(ValueError, match="packed input .* cannot continue"):
        layer(x, past_key_values=cache, cu_seqlens=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="packed input .* cannot continue"):
        layer(x, cp_context=build_cp_context(None, cu_seqlens=[0, 5, 12]), past_key_values=cache)
    with pytest.raises(ValueError, match=r"attention_mask must be .*past \+ 1"):
        layer(torch.randn(1, 1, HIDDEN), past_key_values=cache, attention_mask=torch.ones(1, 1, 5))
    hole = torch.tensor([[1, 1, 0, 1] + [1] * 8])
    with pytest.raises(ValueError, match="hole.*window_size=4"):
        layer(x, attention_mask=hole)
    with pytest.raises(ValueError, match="hole.*window_size=4"):
        layer(x, cp_context=ctx, attention_mask=hole)
    with pytest.raises(ValueError, match="0/1"):
        layer(x, attention_mask=2 * torch.ones(1, 12))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(x, attention_mask=torch.ones(1, 11))
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(1, 12, HIDDEN + 1), cp_context=ctx)
    with pytest.raises(ValueError, match="shard inputs"):
        layer(torch.randn(1, 11, HIDDEN), cp_context=ctx)
    with pytest.raises(ValueError, match="cu_seqlens differs"):
        layer(x, cp_context=ctx, cu_seqlens=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="batch size 1"):
        layer(torch.randn(2, 12, HIDDEN), cu_seqlens=torch.tensor([0, 5, 12]))
    with pytest.raises(ValueError, match="backend"):
        AttentionCP(hidden_size=HIDDEN, num_heads=HEADS, backend="triton")
    with pytest.raises(ValueError, match="num_heads=5 does not divide hidden_size=32"):
        AttentionCP(hidden_size=HIDDEN, num_heads=5)
    with pytest.raises(ValueError, match="num_kv_heads=3 must be"):
        AttentionCP(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=3)
    with pytest.raises(ValueError, match="window_size must be"):
        AttentionCP(hidden_size=HIDDEN, num_heads=HEADS, window_size=0)
    # without a window a mask with a hole is exact (FLA's unpadded causal order is the stream's)
    no_window = make_layer(dict(Hkv=2), 0)
    o, _, _ = no_window(x, attention_mask=hole)
    assert torch.isfinite(o).all() and (o[0, 2] == 0).all()
    assert no_window.cp_sizes() == [HIDDEN, HEADS, 2, HEAD_DIM, 0] and layer.cp_sizes()[-1] == 4
    assert make_layer(dict(Hkv=2, qk_norm=True), 0).q_norm.eps == EPS


# ------------------------------------------------------------------ FLA's own forward, run on the CPU
# flash-attn's documented semantics on the CPU (fp64 inside): tests/cp/_flash_stand_in.py
from _flash_stand_in import flash_attn_func as _flash_attn_func  # noqa: E402
from _flash_stand_in import flash_attn_varlen_func as _flash_attn_varlen_func  # noqa: E402


FLA_CASES = [
    dict(name="dense_no_mask_qknorm", B=2, T=37, Hkv=2, qk_norm=True),              # flash_attn_func
    dict(name="dense_left_pad_window", B=2, T=37, Hkv=2, W=6, pad="left"),          # unpad + varlen
    dict(name="dense_right_pad_full_mha", B=2, T=37, Hkv=4, pad="right", rope_theta=300.0),
    dict(name="packed_window_qknorm_bias", cu=PACKED, Hkv=1, W=5, qk_norm=True, qkv_bias=True),   # varlen
    dict(name="packed_full_gqa", cu=PACKED, Hkv=2, rope_theta=500.0),
]


def _fla_forward_worker(rank, world_size, cases, seed):
    """In a process that imported FLA with TRITON_INTERPRET=1: FLA's `Attention.forward` itself (its Triton
    RoPE and RMSNorm interpreted, flash-attn replaced by the stand-in above) vs AttentionCP without CP."""
    import fla.layers.attn as fla_attn

    from fla_cp.layers.attention_cp import rope_positions
    from fla_cp.ops.chunk_cp import single_process_context
    fla_attn.flash_attn_func = _flash_attn_func
    fla_attn.flash_attn_varlen_func = _flash_attn_varlen_func
    out = []
    for case in cases:
        ours = make_layer(case, seed)
        theirs = fla_attn.Attention(**layer_kwargs(case))
        theirs.load_state_dict(ours.state_dict())
        x, mask, _ = make_inputs(case, seed)
        cu = torch.tensor(case["cu"]) if "cu" in case else None
        with torch.no_grad():
            want = theirs(x, attention_mask=mask, cu_seqlens=cu)[0]
            got = ours(x, attention_mask=mask, cu_seqlens=cu)[0]
            # RoPE alone (the outputs are blind to a constant shift of positions): FLA's rotary as its
            # forward calls it vs the layer's at its positions
            B, T = x.shape[:2]
            q, k = torch.randn(B, T, HEADS, HEAD_DIM), torch.randn(B, T, case["Hkv"], HEAD_DIM)
            fq, fk = theirs.rotary(q, k, seqlen_offset=0, max_seqlen=max(T, 64), cu_seqlens=cu)
            pos = rope_positions(single_process_context(T, cu), "cpu")
            rope_err = max((ours._rope(q, pos) - fq).abs().max().item(), (ours._rope(k, pos) - fk).abs().max().item())
        out.append((got, want, rope_err))
    return out


# KV caches, as generate uses them: a prefill into an empty cache, a multi-token continuation (FLA has
# none with a padding mask: its unpad takes q_len == k_len or 1), decode steps
FLA_CACHE_CASES = [
    dict(name="cache_left_pad_full", B=2, T=20, Hkv=2, pad="left", continuation=0, steps=4),
    dict(name="cache_no_mask_full_gqa", B=2, T=20, Hkv=2, continuation=5, steps=3),
    dict(name="cache_left_pad_window", B=2, T=20, Hkv=2, W=6, pad="left", continuation=0, steps=4),
    dict(name="cache_no_mask_window_mqa", B=2, T=20, Hkv=1, W=4, continuation=5, steps=3),
]


def _fla_cache_worker(rank, world_size, cases, seed):
    """FLA's `Attention.forward` with FLA's `Cache` (interpreted, flash-attn stand-in) vs AttentionCP without
    CP: every call's output and, after each, the cached K/V at the valid positions (the cached keys carry
    RoPE at FLA's positions: the seen tokens minus the row's pads)."""
    import fla.layers.attn as fla_attn
    from fla.models.cache_utils import Cache
    fla_attn.flash_attn_func = _flash_attn_func
    fla_attn.flash_attn_varlen_func = _flash_attn_varlen_func
    out = []
    for case in cases:
        ours = make_layer(case, seed)
        theirs = fla_attn.Attention(**layer_kwargs(case))
        theirs.load_state_dict(ours.state_dict())
        T0, T1, steps = case["T"], case["continuation"], case["steps"]
        x, mask, _ = make_inputs({**case, "T": T0 + T1 + steps}, seed)
        if mask is not None:
            mask[:, T0:] = 1                            # left padding: the prompt's
        calls = [(0, T0)] + ([(T0, T0 + T1)] if T1 else []) + [(t, t + 1) for t in range(T0 + T1, T0 + T1 + steps)]
        caches = [Cache(), Cache()]
        errs = []
        with torch.no_grad():
            for a, b in calls:
                m = mask[:, :b] if mask is not None else None          # generate's [B, past + T]
                got = ours(x[:, a:b], attention_mask=m, past_key_values=caches[0], use_cache=True)[0]
                want = theirs(x[:, a:b], attention_mask=m, past_key_values=caches[1], use_cache=True)[0]
                kv = [c[case.get("layer_idx", 0)]["attn_state"] for c in caches]
                L = kv[0][0].shape[1]
                valid = (mask[:, b - L:b] if mask is not None else torch.ones(x.shape[0], L)).bool()
                cache_err = max(rel_err(o[valid], t[valid]) for o, t in zip(*kv))
                errs.append((rel_err(got, want), cache_err, L, caches[0].get_seq_length(0) == caches[1].get_seq_length(0)))
        out.append(errs)
    return out


@pytest.mark.timeout(300)
def test_cache_matches_fla_forward_with_flash_attn_stand_in():
    """The KV cache semantics are FLA's: what is stored (the last W with a window), the RoPE offset with
    a cache (a left-padded row's first token at 0), the keys each query sees in continuation and decode."""
    from _interpret import interpret_env
    with interpret_env(always=True):
        got = run_ranks(_fla_cache_worker, 1, (FLA_CACHE_CASES, SEEDS[0]))[0]
    for case, errs in zip(FLA_CACHE_CASES, got):
        for i, (err, cache_err, L, same_len) in enumerate(errs):
            assert err <= TOL, f"{case['name']} call {i} seed={SEEDS[0]}: output rel err {err:.2e} vs FLA"
            assert cache_err <= TOL, f"{case['name']} call {i}: cached K/V rel err {cache_err:.2e} vs FLA"
            assert same_len, f"{case['name']} call {i}: seen tokens differ"
            if case.get("W"):
                assert L <= case["W"], f"{case['name']}: the cache holds {L} > W positions"


@pytest.mark.timeout(300)
def test_matches_fla_forward_with_flash_attn_stand_in():
    """FLA's own forward decides the semantics the layer follows: RoPE positions (row index, not shifted
    by a padding mask; per document with cu_seqlens), q/k norm, the window's `(W - 1, 0)`, padded rows 0."""
    from _interpret import interpret_env
    with interpret_env(always=True):
        got = run_ranks(_fla_forward_worker, 1, (FLA_CASES, SEEDS[0]))[0]
    for case, (ours, fla, rope_err) in zip(FLA_CASES, got):
        err = rel_err(ours, fla)
        assert err <= TOL, f"{case['name']} seed={SEEDS[0]}: rel err {err:.2e} vs FLA's forward"
        assert rope_err <= 1e-6, f"{case['name']}: RoPE differs from FLA's rotary by {rope_err:.2e}"
