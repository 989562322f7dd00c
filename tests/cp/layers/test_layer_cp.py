"""GatedDeltaNetCP layer: CP over P gloo ranks == the same layer on one process; layer == FLA's math.

Every CP case compares the all-gathered output and input gradient, and the group-summed parameter
gradients, against a single-process run on the whole sequence (fp32, relative error <= 1e-5).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fla_cp.layers import GatedDeltaNetCP
from tests.cp._dist import run_ranks

W = 4          # conv size
D = 32         # hidden size
TOL = 1e-5


def make_layer(seed: int = 0, **overrides) -> GatedDeltaNetCP:
    torch.manual_seed(seed)
    kw = dict(hidden_size=D, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, conv_size=W,
              conv_bias=True, layer_idx=0)
    kw.update(overrides)
    layer = GatedDeltaNetCP(**kw)
    with torch.no_grad():
        # slow-decay heads (g near 0) carry state far: a leak across ranks/documents shows up
        layer.A_log.copy_(torch.linspace(-6.0, 1.0, layer.num_v_heads))
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def n_parts(P: int, layout: str) -> int:
    return P if layout == "contiguous" else 2 * P


def make_case(kind: str, P: int, layout: str, seed: int) -> dict:
    """Global inputs of one case (same on every rank: seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = n_parts(P, layout)
    B, T, cu, mask = 2, 37, None, None
    if kind == "short":                      # parts of 2 tokens < W-1: the halo spans several ranks
        T = 2 * n
    if kind == "packed":
        B, T = 1, 41
        points = [i * T // n for i in range(n + 1)]
        b = points[n // 2] if n > 1 else T // 2
        # a 2-token document (< W-1) straddling a part boundary, a 1-token document, others around
        cu = sorted({0, 3, b - 1, b + 1, b + 2, T})
    if kind in ("left", "right"):
        lens = [T - 9, T - 2]
        mask = torch.zeros(B, T, dtype=torch.long)
        for r, n_tok in enumerate(lens):
            if kind == "left":
                mask[r, T - n_tok:] = 1
            else:
                mask[r, :n_tok] = 1
    x = torch.randn(B, T, D, generator=g)
    w = torch.randn(B, T, D, generator=g)     # weights of the scalar loss
    return dict(kind=kind, x=x, w=w, cu=cu, mask=mask, T=T)


def layer_reference(layer, case):
    """Single process, no CP: output, input grad, parameter grads."""
    layer.zero_grad()
    x = case["x"].clone().requires_grad_()
    kw = {}
    if case["cu"] is not None:
        kw["cu_seqlens"] = torch.tensor(case["cu"])
    if case["mask"] is not None:
        kw["attention_mask"] = case["mask"]
    o = layer(x, **kw)[0]
    (o * case["w"]).sum().backward()
    return o.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _cp_worker(rank, world_size, specs, overrides):
    from fla_cp.ops import build_cp_context, comm
    out = []
    for kind, layout, seed in specs:
        case = make_case(kind, world_size, layout, seed)
        layer = make_layer(seed, **overrides)
        if case["cu"] is not None:
            ctx = build_cp_context(None, cu_seqlens=case["cu"], layout=layout)
        else:
            ctx = build_cp_context(None, seq_len=case["T"], layout=layout)
        x = ctx.shard(case["x"], dim=1).clone().requires_grad_()
        o = layer(x, cp_context=ctx, attention_mask=case["mask"])[0]
        (o * ctx.shard(case["w"], dim=1)).sum().backward()
        grads = {n: comm.all_reduce_sum(p.grad, ctx.group) if world_size > 1 else p.grad
                 for n, p in layer.named_parameters()}
        out.append((ctx.unshard(o.detach(), dim=1), ctx.unshard(x.grad, dim=1), grads))
    return out


KINDS = ["dense", "short", "packed", "left", "right"]
# Parameter gradients are sums over every token, and those of A_log and dt_bias cancel: one process's
# own fp32 error on them reached 1.2e-4 against float64 over 50 fresh seeds per P (docs/RESULTS.md,
# "Margins"), and CP vs one process 8.5e-5, so no fixed bound on CP vs one process holds with room.
# Their bound is derived instead, as "CP is as accurate as one process":
#     err(CP vs float64) <= ratio * max(err(one process vs float64), floor)
# Worst seen (scripts/sweep_margins.py, 4,000 A_log/dt_bias and 28,000 other samples): 4.8 of the
# A_log/dt_bias floor's ratio (2x room under 10), 1.0 of the others' (4x room under 4). A later CI run
# (2026-12-05, P=3 contiguous dense, seed 238103447; the same on the code before that day's changes)
# met CP 1.22e-4 against one process's lucky 1.65e-6: 12x the old 1e-5 floor, though within the spread
# of one process's own error (up to 1.2e-4, above). The floor is that spread's scale, 3e-5 (4x room).
GRAD_BOUNDS = {"A_log": (10.0, 3e-5), "dt_bias": (10.0, 3e-5)}
GRAD_BOUND = (4.0, 3e-6)                 # (ratio, floor) of every other parameter gradient


def assert_layer_case(tag: str, layer, case: dict, got) -> None:
    """`got` = (output, input grad, group-summed parameter grads) of a CP run of `layer` on `case`:
    output and input gradient within TOL of one process and of float64; every parameter gradient's
    error against float64 at most `ratio` times one process's own (or the floor; GRAD_BOUNDS)."""
    o, dx, grads = got
    ro, rdx, rgrads = layer_reference(layer, case)
    to, tdx, tgrads = layer_reference_fp64(layer, case)
    assert rel_err(o, ro) <= TOL, f"{tag}: output {rel_err(o, ro):.2e}"
    assert rel_err(dx, rdx) <= TOL, f"{tag}: input grad {rel_err(dx, rdx):.2e}"
    assert rel_err(o, to) <= TOL, f"{tag}: output vs float64 {rel_err(o, to):.2e}"
    assert rel_err(dx, tdx) <= TOL, f"{tag}: input grad vs float64 {rel_err(dx, tdx):.2e}"
    for name, tg in tgrads.items():
        cp_err, own_err = rel_err(grads[name], tg), rel_err(rgrads[name], tg)
        ratio, floor = GRAD_BOUNDS.get(name, GRAD_BOUND)
        assert cp_err <= ratio * max(own_err, floor), \
            f"{tag}: grad of {name} vs float64: CP {cp_err:.2e}, one process {own_err:.2e} (bound {ratio} x max(that, {floor}))"


def layer_overrides(P: int) -> dict:
    return dict(allow_neg_eigval=(P == 3))


# P = 3 and 4 spawn 3-4 ranks on CI's 2 cores: the slow run (`pytest -m slow`, default suite time)
@pytest.mark.parametrize("P", [1, 2, *(pytest.param(P, marks=pytest.mark.slow) for P in (3, 4))])
def test_layer_cp_matches_single_process(P):
    """Output and input gradient: CP vs one process <= TOL. Parameter gradients: CP's error against the
    float64 reference at most a few times one process's own (GRAD_BOUNDS). Fresh seeds every run."""
    first = int(torch.randint(0, 2**31 - 1 - 100, ()))
    specs = [(kind, layout, first + i) for i, (kind, layout) in
             enumerate((k, lay) for lay in ("contiguous", "zigzag") for k in KINDS)]
    overrides = layer_overrides(P)
    # one rank needs no process group: run it here and save a process start-up
    results = [_cp_worker(0, 1, specs, overrides)] if P == 1 else run_ranks(_cp_worker, P, args=(specs, overrides))
    for (kind, layout, seed), got in zip(specs, results[0]):
        assert_layer_case(f"P={P} {layout} {kind} seed={seed}", make_layer(seed, **overrides),
                          make_case(kind, P, layout, seed), got)
    # every rank returns the same gathered tensors
    for other in results[1:]:
        for (o0, dx0, _), (o1, dx1, _) in zip(results[0], other):
            assert torch.equal(o0, o1) and torch.equal(dx0, dx1)


# ------------------------------------------------------------------ fp64 reference
def gated_delta_rule_fp64(q, k, v, beta, g):
    """The recurrence token by token in float64 (FLA's naive reference computes in fp32):
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = K^-1/2 S_t^T q_t.
    q, k [B, T, HV, K] (already repeated for GVA), v [B, T, HV, V], beta, g [B, T, HV]."""
    B, T, HV, K = k.shape
    S = q.new_zeros(B, HV, K, v.shape[-1])
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = (v[:, t] - torch.einsum('bhk,bhkv->bhv', k[:, t], S)) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append(torch.einsum('bhk,bhkv->bhv', q[:, t] * K ** -0.5, S))
    return torch.stack(out, 1)


def layer_math(layer, x, segments, recurrence=None):
    """The layer's math composed independently (F.conv1d, a recurrence, the gated RMSNorm; default the
    float64 one above, for a float64 `layer` and `x`), one segment of one row at a time: `segments` =
    [(row, start, end)] are the documents (packed) or the real tokens (padding); every other position
    of the output is 0."""
    recurrence = recurrence or gated_delta_rule_fp64
    out = torch.zeros(*x.shape[:2], layer.o_proj.out_features, dtype=x.dtype)
    rep = layer.num_v_heads // layer.num_heads
    for b, s, e in segments:
        h = x[b:b + 1, s:e]

        def conv(proj, c):
            y = F.conv1d(proj(h).transpose(1, 2), c.weight, c.bias, padding=W - 1, groups=c.weight.shape[0])
            return F.silu(y[..., :e - s]).transpose(1, 2)
        q, k, v = (conv(p, c) for p, c in ((layer.q_proj, layer.q_conv1d), (layer.k_proj, layer.k_conv1d),
                                            (layer.v_proj, layer.v_conv1d)))
        q, k = (t.unflatten(-1, (-1, layer.head_k_dim)) for t in (q, k))
        q, k = ((t * torch.rsqrt(t.square().sum(-1, keepdim=True) + 1e-6)).repeat_interleave(rep, 2) for t in (q, k))
        v = v.unflatten(-1, (-1, layer.head_v_dim))
        g = -layer.A_log.exp() * F.softplus(layer.a_proj(h) + layer.dt_bias)
        beta = layer.b_proj(h).sigmoid() * (2.0 if layer.allow_neg_eigval else 1.0)
        o = recurrence(q, k, v, beta, g)
        gate = layer.g_proj(h).unflatten(-1, (-1, layer.head_v_dim))
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight * F.silu(gate)
        out = out.index_put((torch.tensor([b]), torch.arange(s, e)), layer.o_proj(o.flatten(-2))[0])
    return out


def case_segments(case) -> list[tuple[int, int, int]]:
    """(row, start, end) of every independent stretch of real tokens in a case."""
    B, T = case["x"].shape[:2]
    if case["cu"] is not None:
        return [(0, s, e) for s, e in zip(case["cu"][:-1], case["cu"][1:])]
    if case["mask"] is not None:
        return [(b, int(r.nonzero().min()), int(r.nonzero().max()) + 1) for b, r in enumerate(case["mask"])]
    return [(b, 0, T) for b in range(B)]


def layer_reference_fp64(layer, case):
    """`layer_reference`'s output, input gradient and parameter gradients, in float64 (as float64)."""
    x = case["x"].double().requires_grad_()
    ref = copy.deepcopy(layer).double()
    out = layer_math(ref, x, case_segments(case))
    params = dict(ref.named_parameters())
    (out * case["w"].double()).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in params.items()}


# ------------------------------------------------------------------ single-process semantics
def fla_math_reference(layer, x, cu):
    """Independent composition of FLA's math: F.conv1d per document + FLA's naive recurrence."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    def recurrence(q, k, v, beta, g):
        return naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0]
    return layer_math(layer, x, [(b, s, e) for b in range(x.shape[0]) for s, e in zip(cu[:-1], cu[1:])], recurrence)


def test_layer_matches_fla_math():
    layer = make_layer(7)
    x = torch.randn(2, 29, D)
    assert rel_err(layer(x)[0], fla_math_reference(layer, x, [0, 29])) < 1e-4
    cu = [0, 2, 15, 16, 29]
    assert rel_err(layer(x[:1], cu_seqlens=torch.tensor(cu))[0], fla_math_reference(layer, x[:1], cu)) < 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_fla_unpadding(side):
    """A padded batch gives, per real token, what FLA's unpad -> packed -> repad gives; pads get 0."""
    layer = make_layer(3)
    T, lens = 19, [19, 11, 4]
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for r, n in enumerate(lens):
        mask[r, T - n:] = 1 if side == "left" else 0
        if side == "right":
            mask[r, :n] = 1
    x = torch.randn(len(lens), T, D, requires_grad=True)
    o = layer(x, attention_mask=mask)[0]
    (o.square().sum()).backward()
    dx = x.grad.clone()

    idx = mask.flatten().nonzero().flatten()
    xp = x.detach().flatten(0, 1)[idx].unsqueeze(0).requires_grad_()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    op = layer(xp, cu_seqlens=cu)[0]
    op.square().sum().backward()
    ref = torch.zeros(len(lens) * T, D).index_copy(0, idx, op.detach()[0]).view_as(o)
    ref_dx = torch.zeros(len(lens) * T, D).index_copy(0, idx, xp.grad[0]).view_as(o)
    assert rel_err(o, ref) <= TOL
    assert rel_err(dx, ref_dx) <= TOL


def test_fla_state_dict_loads():
    from fla.layers import GatedDeltaNet
    torch.manual_seed(0)
    fla_layer = GatedDeltaNet(hidden_size=D, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0,
                              use_gate=True, allow_neg_eigval=True, conv_size=W)
    ours = GatedDeltaNetCP(hidden_size=D, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0,
                           use_gate=True, allow_neg_eigval=True, conv_size=W)
    result = ours.load_state_dict(fla_layer.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in fla_layer.named_parameters()}


def test_decode_with_cache_continues_prefill():
    """Prefill then token-by-token decode with the cache == one pass over the whole sequence."""
    from fla.models.cache_utils import Cache
    layer = make_layer(5)
    x = torch.randn(2, 13, D)
    full = layer(x)[0]
    cache = Cache()
    with torch.no_grad():
        outs = [layer(x[:, :9], past_key_values=cache, use_cache=True)[0]]
        for t in range(9, 13):
            outs.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
    assert rel_err(torch.cat(outs, 1), full) <= TOL
