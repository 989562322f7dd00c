"""Hybrid GatedDeltaNet models (FLA `attn` configs: GDN layers plus softmax-attention layers) under CP
vs one process (cp_size=1, the same code path without a split).

The hybrid: 4 layers, GDN / full attention (GQA 4:2) / GDN / windowed attention (W=4, MQA 4:1), slow-decay
GDN heads. Per world size, both layouts:
- training: loss, gathered logits and every gradient after `sync_gradients`: dense batch, packed
  documents crossing ranks, a left-padded batch;
- caches: a CP prefill that fills the attention KV caches (replicated), a multi-token CP continuation
  from them (dense, left- and right-padded, zigzag with parts shorter than the window), replicated
  decode steps; greedy `generate` with a left-padded prompt; a second chunk's loss backpropagated
  through the undetached cache of the first;
- bad input raises on every rank, naming it: a packed continuation of attention caches, attention
  settings that differ between ranks, a rank-local mask with a cache.
One process is checked against a no-cache greedy loop (an independent yardstick for the caches).
"""
from __future__ import annotations

import pytest
import torch

import fla_cp  # noqa: F401
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, sync_gradients
from tests.cp._dist import run_ranks
from tests.cp.models.test_model_continuation import CASES as CONTINUATION_CASES
from tests.cp.models.test_model_continuation import _continue, ids_of

TOL = 1e-5
VOCAB = 96
ATTN = [{"layers": [1], "num_heads": 4, "num_kv_heads": 2},
        {"layers": [3], "num_heads": 4, "num_kv_heads": 1, "window_size": 4}]
HYBRID = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=4,
              vocab_size=VOCAB, hidden_ratio=2, norm_eps=1e-6, conv_size=4, attn=ATTN)
DENSE_CONTINUATIONS = [c for c in CONTINUATION_CASES if not c[-1]]


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_model(state=None, **cfg) -> GatedDeltaNetCPForCausalLM:
    torch.manual_seed(0)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{**HYBRID, **cfg}))
    if state is not None:
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.attn, "A_log"):      # slow-decay GDN heads expose state leaks
                    layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
                else:                                 # sharper attention: a wrong key changes the output
                    for name in ("q_proj", "k_proj"):
                        getattr(layer.attn, name).weight.mul_(3.0)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    dense = torch.randint(0, VOCAB, (2, 23), generator=g)
    packed = torch.randint(0, VOCAB, (1, 30), generator=g)
    cu = torch.tensor([0, 2, 9, 10, 21, 30])            # documents shorter than the window, crossing ranks
    padded = torch.randint(0, VOCAB, (2, 19), generator=g)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :5] = 0                                     # left padding
    return dict(dense=dense, packed=packed, cu=cu, padded=padded, mask=mask,
                padded_labels=padded.masked_fill(mask == 0, -100))


def run_case(model, name, b, cp: bool):
    """loss, gathered logits and (synced) gradients of one training batch."""
    model.zero_grad()
    if name == "dense":
        out = model(input_ids=b["dense"], labels=b["dense"], gather_logits=True)
    elif name == "packed":
        out = model(input_ids=b["packed"], labels=b["packed"], cu_seqlens=b["cu"], gather_logits=True)
    else:
        out = model(input_ids=b["padded"], labels=b["padded_labels"], attention_mask=b["mask"], gather_logits=True)
    out.loss.backward()
    if cp:
        sync_gradients(model)
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def through_cache(model, cp: bool):
    """A second chunk's loss backpropagated through the undetached cache of the first (left-padded batch)."""
    model.zero_grad()
    ids = ids_of(2, 25, seed=11)
    mask = torch.ones(2, 25, dtype=torch.long)
    mask[1, :4] = 0
    first = model(ids[:, :14], attention_mask=mask[:, :14], use_cache=True)
    second = model(ids[:, 14:], attention_mask=mask, labels=ids[:, 14:], past_key_values=first.past_key_values,
                   use_cache=True)
    second.loss.backward()
    if cp:
        sync_gradients(model)
    return second.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def greedy(model):
    ids = ids_of(2, 11, seed=4)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


def expect_error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _worker(rank, world, state):
    b = batches()
    res = {}
    for layout in ("contiguous", "zigzag"):
        model = make_model(state, cp_size=world, cp_layout=layout).train()
        for name in ("dense", "packed", "padded"):
            res[(layout, name)] = run_case(model, name, b, cp=True)
        res[(layout, "through cache")] = through_cache(model, cp=True)
    for case in DENSE_CONTINUATIONS:
        res[("continuation", case[0])] = _continue(make_model(state, cp_size=world, cp_layout=case[1]).eval(), case)
    model = make_model(state, cp_size=world).eval()
    res["generate"] = greedy(model)
    if world == 2:
        res["errors"] = _errors(rank, model, state)
    return res


def _errors(rank, model, state):
    """Each raised on every rank (a hang would time the test out)."""
    errors = {}
    with torch.no_grad():
        cache = model(ids_of(1, 12), use_cache=True).past_key_values
        errors["packed continuation"] = expect_error(lambda: model(
            ids_of(1, 10), past_key_values=cache, use_cache=True, cu_seqlens=torch.tensor([0, 10])))
        # a rank-local mask [B, T_loc] with a cache: RoPE positions count pads over the whole row
        ctx = model.build_cp_context(seq_len=10)
        errors["local mask"] = expect_error(lambda: model(
            ctx.shard(ids_of(1, 10), 1), inputs_are_sharded=True, cp_context=ctx, past_key_values=cache,
            attention_mask=torch.ones(1, ctx.local_len, dtype=torch.long)))
        # one rank's windowed layer built with another window: the ranks' attention settings differ
        other = make_model(state, cp_size=2,
                           attn=[ATTN[0], {**ATTN[1], "window_size": 4 if rank == 0 else 6}]).eval()
        errors["settings differ"] = expect_error(lambda: other(ids_of(1, 12)))
        # the same attention sizes on different layers: layer 1 would gather K/V on one rank and exchange
        # GDN states on the other
        moved = make_model(cp_size=2, attn=[{**ATTN[0], "layers": [1 if rank == 0 else 2]}, ATTN[1]]).eval()
        errors["layers differ"] = expect_error(lambda: moved(ids_of(1, 12)))
        # a rank-local mask with a fresh cache (eval mode's default use_cache=True creates one)
        errors["local mask, empty cache"] = expect_error(lambda: model(
            ctx.shard(ids_of(1, 10), 1), inputs_are_sharded=True, cp_context=ctx, use_cache=True,
            attention_mask=torch.ones(1, ctx.local_len, dtype=torch.long)))
    return errors


@pytest.fixture(scope="module")
def reference():
    model = make_model().train()
    b = batches()
    refs = {name: run_case(model, name, b, cp=False) for name in ("dense", "packed", "padded")}
    refs["through cache"] = through_cache(model, cp=False)
    model.eval()
    for case in DENSE_CONTINUATIONS:
        refs[("continuation", case[0])] = _continue(model, case)
    refs["generate"] = greedy(model)
    return model.state_dict(), refs


def compare(got, ref, tag):
    loss, logits, grads = got
    rloss, rlogits, rgrads = ref
    assert rel_err(loss, rloss) <= TOL, f"{tag}: loss {loss} vs {rloss}"
    assert rel_err(logits, rlogits) <= TOL, f"{tag}: logits {rel_err(logits, rlogits):.2e}"
    for n, rg in rgrads.items():
        assert rel_err(grads[n], rg) <= TOL, f"{tag}: grad of {n} {rel_err(grads[n], rg):.2e}"


def test_generate_matches_a_no_cache_loop(reference):
    """One process: cached generation (prefill into the KV caches, decode steps) == recomputing the whole
    sequence every step without a cache; the left-padded row's RoPE offset included."""
    state, refs = reference
    model = make_model(state).eval()
    ids = ids_of(2, 11, seed=4)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        for _ in range(6):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
    assert torch.equal(ids, refs["generate"]), (ids, refs["generate"])
    assert [type(layer.attn).__name__ for layer in model.model.layers] == \
        ["GatedDeltaNetCP", "AttentionCP", "GatedDeltaNetCP", "AttentionCP"]


@pytest.mark.timeout(600)
# P = 3, 4 spawn 3-4 ranks on CI's 2 cores: the slow run (`pytest -m slow`)
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_hybrid_cp_matches_one_process(reference, world_size):
    state, refs = reference
    results = run_ranks(_worker, world_size, args=(state,))
    for rank, res in enumerate(results):
        tag = f"P={world_size} rank {rank}"
        for layout in ("contiguous", "zigzag"):
            for name in ("dense", "packed", "padded"):
                compare(res[(layout, name)], refs[name], f"{tag} {layout} {name}")
            loss, grads = res[(layout, "through cache")]
            rloss, rgrads = refs["through cache"]
            assert rel_err(loss, rloss) <= TOL, f"{tag} {layout} through cache: loss"
            for n, rg in rgrads.items():
                assert rel_err(grads[n], rg) <= TOL, f"{tag} {layout} through cache: grad of {n}"
        for case in DENSE_CONTINUATIONS:
            logits, tokens, layer_len = res[("continuation", case[0])]
            rlogits, rtokens, _ = refs[("continuation", case[0])]
            for i, (a, r) in enumerate(zip(logits, rlogits)):
                assert rel_err(a, r) <= TOL, f"{tag} {case[0]}: call {i} logits {rel_err(a, r):.2e}"
            assert torch.equal(tokens, rtokens), f"{tag} {case[0]}"
            parts = world_size * (2 if case[1] == "zigzag" else 1)
            if case[4] >= parts:      # (fewer new tokens than CP parts run replicated, as decode steps do)
                assert layer_len < case[4], f"{tag} {case[0]}: the continuation did not run CP"
        assert torch.equal(res["generate"], refs["generate"]), f"{tag}: {res['generate']} vs {refs['generate']}"
        if world_size == 2:
            errors = res["errors"]
            assert "packed input (cu_seqlens) cannot continue" in errors["packed continuation"], errors
            assert "rank" in errors["packed continuation"]
            assert "pass the global mask" in errors["local mask"], errors
            assert "layer sizes (per kind of layer, then the kinds' order) differs" in errors["settings differ"], errors
            assert "layer sizes (per kind of layer, then the kinds' order) differs" in errors["layers differ"], errors
            assert "pass the global mask" in errors["local mask, empty cache"], errors
