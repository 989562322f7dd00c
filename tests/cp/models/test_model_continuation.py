"""Forwards under CP that start from a cache or are shorter than the CP split, vs cp_size=1.

- A multi-token continuation after a CP prefill (multi-turn chat, chunked prefill) runs CP: each
  rank's layers see its shard, every sequence starts from its cached recurrent state, and the conv
  windows before a sequence's start read the cached inputs. Dense (with left padding), packed
  (every document continues its own cached state) and zigzag, continuations shorter than W-1 tokens
  per part, then replicated decode steps; and `generate` after a prior `past_key_values`.
- A forward with fewer tokens than CP parts (a BOS-only prompt) runs replicated, like a decode step:
  same logits, the same loss, and after `sync_gradients` the single-device gradients.

Slow-decay heads (A_log from -6) keep a missing or leaked state visible in the logits.
"""
from __future__ import annotations

import pytest
import torch

import fla_cp  # noqa: F401
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, sync_gradients
from tests.cp._dist import run_ranks

TOL = 1e-5
VOCAB = 96
SMALL = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
             vocab_size=VOCAB, hidden_ratio=2, norm_eps=1e-6, conv_size=4)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_model(state=None, **cfg) -> GatedDeltaNetCPForCausalLM:
    torch.manual_seed(0)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{**SMALL, **cfg}))
    if state is not None:
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
    return model.eval()


def ids_of(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ continuation
# (name, layout, B, prefill length T0, continuation length T1, padding of row 0 (left; < 0: right), packed)
CASES = [
    ("dense", "contiguous", 1, 10, 13, 0, False),
    ("left-padded batch", "contiguous", 2, 11, 9, 3, False),
    ("zigzag, short parts", "zigzag", 2, 12, 7, 2, False),   # P=3: 6 parts of ~1 token < W-1
    # padding < 0: right padding of the prefill, so generate's [B, past + T] mask has a hole in the past
    ("right-padded prefill", "contiguous", 2, 11, 9, -3, False),
    ("packed", "contiguous", 1, None, None, 0, True),
]
PACKED_PREFILL = [0, 5, 13, 20]        # 3 documents ...
PACKED_CONTINUATION = [0, 3, 11, 17]   # ... each continued (document 0 by 3 tokens < W-1)
STEPS = 3


def _continue(model, case):
    """Logits of a prefill, a continuation and STEPS decode steps (each step feeds the argmax), the
    tokens picked, and the layer input's length in the continuation."""
    _, _, B, T0, T1, left, packed = case
    logits = []
    if packed:
        ids = ids_of(1, PACKED_PREFILL[-1] + PACKED_CONTINUATION[-1], seed=7)
        first, second = ids[:, :PACKED_PREFILL[-1]], ids[:, PACKED_PREFILL[-1]:]
        kw0, kw1 = dict(cu_seqlens=torch.tensor(PACKED_PREFILL)), dict(cu_seqlens=torch.tensor(PACKED_CONTINUATION))
    else:
        ids = ids_of(B, T0 + T1, seed=5)
        mask = torch.ones(B, T0 + T1, dtype=torch.long)
        if left >= 0:
            mask[0, :left] = 0
        else:
            mask[0, T0 + left:T0] = 0
        first, second = ids[:, :T0], ids[:, T0:]
        kw0, kw1 = dict(attention_mask=mask[:, :T0]), dict(attention_mask=mask)   # generate's [B, past + T]
    with torch.no_grad():
        out = model(first, use_cache=True, gather_logits=True, **kw0)
        logits.append(out.logits)
        out = model(second, past_key_values=out.past_key_values, use_cache=True, gather_logits=True,
                    output_hidden_states=True, **kw1)
        logits.append(out.logits)
        layer_input_len = out.hidden_states[0].shape[1]
        cache, tokens = out.past_key_values, []
        if packed:      # one token per document: the ends of the documents
            tok = out.logits[:, torch.tensor(PACKED_CONTINUATION[1:]) - 1].argmax(-1)
            step_kw = dict(cu_seqlens=torch.arange(len(PACKED_CONTINUATION)))
        else:
            tok, step_kw = out.logits[:, -1:].argmax(-1), {}
        for i in range(STEPS):
            if not packed:
                step_kw = dict(attention_mask=torch.cat([mask, mask.new_ones(B, i + 1)], 1))
            out = model(tok, past_key_values=cache, use_cache=True, gather_logits=True, **step_kw)
            cache = out.past_key_values
            logits.append(out.logits)
            tokens.append(tok)
            tok = out.logits.argmax(-1) if packed else out.logits[:, -1:].argmax(-1)
    return logits, torch.cat(tokens, 1), layer_input_len


def _generate_after_cache(model):
    """HF `generate` continuing a prompt whose first 12 tokens are already in a cache."""
    ids = ids_of(1, 21, seed=3)
    with torch.no_grad():
        cache = model(ids[:, :12], use_cache=True).past_key_values
        return model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)


def _worker_continuation(rank, world, state):
    res = {}
    for case in CASES:
        model = make_model(state, cp_size=world, cp_layout=case[1])
        res[case[0]] = _continue(model, case)
    model = make_model(state, cp_size=world)
    res["generate"] = _generate_after_cache(model)
    # a packed continuation needs one cached state per document
    with torch.no_grad():
        cache = model(ids_of(1, 12), use_cache=True).past_key_values
        try:
            model(ids_of(1, 10), past_key_values=cache, use_cache=True, cu_seqlens=torch.tensor([0, 4, 10]))
            res["packed vs dense cache"] = "no error"
        except ValueError as e:
            res["packed vs dense cache"] = str(e)
    return res


@pytest.fixture(scope="module")
def state():
    return make_model().state_dict()


@pytest.mark.parametrize("world", [2, 3])
def test_continuation_runs_cp(state, world):
    refs = {case[0]: _continue(make_model(state, cp_layout=case[1]), case) for case in CASES}
    ref_gen = _generate_after_cache(make_model(state))
    outs = run_ranks(_worker_continuation, world, args=(state,), timeout=400)
    for rank, res in enumerate(outs):
        for case in CASES:
            name = case[0]
            logits, tokens, local_len = res[name]
            rlogits, rtokens, full_len = refs[name]
            for i, (a, b) in enumerate(zip(logits, rlogits)):
                assert rel_err(a, b) <= TOL, f"P={world} rank {rank} {name}: forward {i}: {rel_err(a, b):.2e}"
            assert torch.equal(tokens, rtokens), f"P={world} rank {rank} {name}: tokens differ"
            # the continuation ran CP: this rank's layers saw its shard, not the whole chunk
            assert local_len < full_len, f"P={world} rank {rank} {name}: layer input {local_len} of {full_len}"
        assert torch.equal(res["generate"], ref_gen), f"P={world} rank {rank}: generate after a cache"
        assert "one per packed sequence (N=2)" in res["packed vs dense cache"], res["packed vs dense cache"]


# ------------------------------------------------------------------------- shorter than the CP split
def _short(model, sync):
    """generate from a BOS-only prompt; a T=2 forward + backward (loss, logits, grads)."""
    res = {"generate": model.generate(ids_of(1, 1, seed=4), max_new_tokens=5, do_sample=False)}
    model.train()
    ids = ids_of(2, 2, seed=6)
    out = model(ids, labels=ids, gather_logits=True)
    out.loss.backward()
    sync(model)
    res["loss"], res["logits"] = out.loss.detach(), out.logits.detach()
    res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return res


def _worker_short(rank, world, state):
    return _short(make_model(state, cp_size=world), sync_gradients)


def test_shorter_than_cp_parts_runs_replicated(state):
    ref = _short(make_model(state), lambda m: None)
    for rank, res in enumerate(run_ranks(_worker_short, 3, args=(state,), timeout=300)):
        assert torch.equal(res["generate"], ref["generate"]), f"rank {rank}: generate from one token"
        assert rel_err(res["loss"], ref["loss"]) <= TOL, f"rank {rank}: loss"
        assert rel_err(res["logits"], ref["logits"]) <= TOL, f"rank {rank}: logits"
        for n, g in ref["grads"].items():
            assert rel_err(res["grads"][n], g) <= TOL, f"rank {rank}: grad of {n} {rel_err(res['grads'][n], g):.2e}"


# ------------------------------------------------------------ backprop through an undetached cache
def _through_cache(model, sync):
    """Train on two chunks with the first chunk's cache not detached (truncated BPTT over two chunks):
    the second chunk's loss reaches the first chunk's parameters through the cached recurrent state
    and through the cached conv inputs, both of which a CP prefill gathers from the ranks that own them."""
    model.train()
    ids = ids_of(2, 30, seed=11)
    first = model(ids[:, :13], labels=ids[:, :13], use_cache=True)
    second = model(ids[:, 13:], labels=ids[:, 13:], past_key_values=first.past_key_values, use_cache=True)
    (first.loss + second.loss).backward()
    sync(model)
    return {"loss": (first.loss + second.loss).detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _worker_through_cache(rank, world, state, layout):
    return _through_cache(make_model(state, cp_size=world, cp_layout=layout), sync_gradients)


# (3, zigzag): the slow run (default suite time)
@pytest.mark.parametrize("world, layout", [(2, "contiguous"), pytest.param(3, "zigzag", marks=pytest.mark.slow)])
def test_backprop_through_an_undetached_cache(state, world, layout):
    ref = _through_cache(make_model(state, cp_layout=layout), lambda m: None)
    for rank, res in enumerate(run_ranks(_worker_through_cache, world, args=(state, layout), timeout=300)):
        assert rel_err(res["loss"], ref["loss"]) <= TOL, f"rank {rank}: loss"
        for n, g in ref["grads"].items():
            err = rel_err(res["grads"][n], g)
            assert err <= TOL, f"rank {rank}: grad of {n} through the cache: {err:.2e}"
