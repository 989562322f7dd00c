"""Cached generation == a greedy loop that recomputes the whole sequence at every step, without a cache.

The yardstick is independent of the cache: every reference token comes from a fresh single-process
forward over the prompt plus everything generated so far (`use_cache=False`). So a cache that loses
its history (as `generate` did on transformers 5.24+, which passes it as `cache=`) fails here even
when CP and one process agree with each other. Checked for P = 1-4, `contiguous` and `zigzag`:

- `generate` on a left-padded batch (CP prefill, cached decode steps), tokens and per-step logits;
- a packed prefill of 3 documents (crossing ranks), then cached decode steps of one token per document;
- `generate` continuing from a cache, with the cache passed as `cache=` and as `past_key_values=`;
- no deprecation warning from transformers while generating.

The weights are scaled up (as a trained model's are) so that the next-token distribution is far from
uniform and a lost history changes the tokens; A_log from -6 gives slow-decay heads.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import fla_cp  # noqa: F401
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM
from fla_cp.models.hf_compat import output_cache
from tests.cp._dist import run_ranks

TOL = 1e-5
VOCAB = 128
NEW = 6                                   # tokens generated
SMALL = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
             vocab_size=VOCAB, hidden_ratio=2, norm_eps=1e-6, conv_size=4)
PACKED = [0, 4, 13, 21]                   # 3 documents; with P = 4 zigzag (8 parts) every one crosses a part
LAYOUTS = ("contiguous", "zigzag")


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_model(state=None, **cfg) -> GatedDeltaNetCPForCausalLM:
    torch.manual_seed(0)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{**SMALL, **cfg}))
    if state is not None:
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
            for layer in model.model.layers:
                layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
    return model.eval()


def ids_of(B, T, seed):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def padded_prompt():
    ids = ids_of(2, 13, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                       # row 0 left-padded by 4
    return ids, mask


# ------------------------------------------------------------------------------ full recompute
@torch.no_grad()
def recompute_greedy(model, ids, mask=None, steps=NEW):
    """Tokens and last-position logits of a greedy loop that runs the whole sequence every step."""
    tokens, logits = [], []
    for _ in range(steps):
        out = model(ids, attention_mask=mask, use_cache=False)
        last = out.logits[:, -1]
        tok = last.argmax(-1, keepdim=True)
        tokens.append(tok)
        logits.append(last)
        ids = torch.cat([ids, tok], 1)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def recompute_packed(model, ids, steps=NEW):
    """Each packed document recomputed on its own (one row, no cache)."""
    rows = [recompute_greedy(model, ids[:, s:e], steps=steps) for s, e in zip(PACKED[:-1], PACKED[1:])]
    return torch.cat([t for t, _ in rows], 0), torch.cat([lg for _, lg in rows], 0)


# ----------------------------------------------------------------------------------- cached runs
@torch.no_grad()
def cached_runs(model):
    res = {}
    ids, mask = padded_prompt()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    res["padded"] = (out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1))

    # packed prefill (CP), then decode steps of one token per document from the cache
    ids = ids_of(1, PACKED[-1], seed=2)
    out = model(ids, cu_seqlens=torch.tensor(PACKED), use_cache=True, gather_logits=True)
    cache, last = output_cache(out), out.logits[0, torch.tensor(PACKED[1:]) - 1]
    tokens, logits = [], []
    for _ in range(NEW):
        tok = last.argmax(-1)
        tokens.append(tok)
        logits.append(last)
        out = model(tok[None], cache=cache, use_cache=True, cu_seqlens=torch.arange(len(PACKED)),
                    gather_logits=True)
        cache, last = output_cache(out), out.logits[0]
    res["packed"] = (torch.stack(tokens, 1), torch.stack(logits, 1))

    # generate continuing a prompt whose first 12 tokens are in a cache: both spellings of the cache
    ids = ids_of(1, 21, seed=3)
    for name in ("cache", "past_key_values"):
        cache = output_cache(model(ids[:, :12], use_cache=True))
        out = model.generate(ids, **{name: cache}, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        res[f"continuation ({name}=)"] = (out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1))
    return res


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def cached_runs_recording_warnings(model):
    """`cached_runs` plus every warning and transformers log message that mentions a deprecation."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = cached_runs(model)
    finally:
        logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + handler.messages
    res["deprecations"] = [m for m in messages if "deprecat" in m.lower()]
    return res


def _worker(rank, world, state):
    return {layout: cached_runs_recording_warnings(make_model(state, cp_size=world, cp_layout=layout))
            for layout in LAYOUTS}


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    ids, mask = padded_prompt()
    ids3 = ids_of(1, 21, seed=3)
    cont = recompute_greedy(model, ids3)
    return model.state_dict(), {"padded": recompute_greedy(model, ids, mask),
                                "packed": recompute_packed(model, ids_of(1, PACKED[-1], seed=2)),
                                "continuation (cache=)": cont, "continuation (past_key_values=)": cont}


# world 4 spawns 4 ranks on CI's 2 cores: the slow run (`pytest -m slow`), for the default suite's time
# world 3 and 4: the slow run (default suite time)
@pytest.mark.parametrize("world", [1, 2, *(pytest.param(w, marks=pytest.mark.slow) for w in (3, 4))])
def test_cached_generation_equals_full_recompute(reference, world):
    state, ref = reference
    outs = [_worker(0, 1, state)] if world == 1 else run_ranks(_worker, world, args=(state,), timeout=400)
    for rank, per_layout in enumerate(outs):
        for layout, res in per_layout.items():
            tag = f"P={world} {layout} rank {rank}"
            assert res["deprecations"] == [], f"{tag}: deprecation warnings while generating: {res['deprecations']}"
            for name, (rtokens, rlogits) in ref.items():
                tokens, logits = res[name]
                assert torch.equal(tokens, rtokens), f"{tag} {name}: tokens {tokens.tolist()} vs {rtokens.tolist()}"
                err = rel_err(logits, rlogits)
                assert err <= TOL, f"{tag} {name}: step logits vs full recompute {err:.2e}"


def test_reference_tokens_are_not_degenerate(reference):
    """The yardstick can tell a lost history: the recomputed tokens are not one repeated token, and a
    model that forgets the prompt (decoding from only the last token) picks different ones."""
    state, ref = reference
    model = make_model(state)
    tokens = ref["padded"][0]
    assert all(len(set(row.tolist())) > 2 for row in tokens), tokens
    ids, mask = padded_prompt()
    amnesic = recompute_greedy(model, ids[:, -1:], steps=NEW)[0]
    assert not torch.equal(amnesic, tokens)


def test_both_cache_names_at_once_must_agree(reference):
    state, _ = reference
    model = make_model(state)
    ids = ids_of(1, 9, seed=4)
    with torch.no_grad():
        a = output_cache(model(ids, use_cache=True))
        b = output_cache(model(ids, use_cache=True))
        with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
            model(ids[:, :1], cache=a, past_key_values=b, use_cache=True)
        out = model(ids[:, :1], cache=a, past_key_values=a, use_cache=True)     # the same object: fine
        assert output_cache(out) is a
