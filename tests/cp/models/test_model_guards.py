"""GatedDeltaNetCPForCausalLM guards and gradient conventions found by the 2026-11-23 red team.

- a loss on `gather_logits=True` logits (replicated on every CP rank) counts once after `sync_gradients`
  (it gave P x gradients), tied and untied embeddings, alone and added to `out.loss`; decode steps too;
- every CP forward, prefill or decode, runs one agreement check: a rank decoding while the others
  prefill raises on every rank (it hung), and a build error on one rank reaches all ranks; a decode
  step fed another token on one rank raises (ranks sampling differently drifted apart silently);
- `attention_mask` with a hole raises (it gave wrong logits), with cp_size 1 and under CP;
- `config.use_l2warp=True` is FLA's `l2_warp` (it was ignored), exactly under CP;
- every label -100 gives FLA's NaN loss;
- `sync_gradients` of a user's module holding the CP model reduces all its parameters (it reduced
  nothing); `copy.deepcopy` of a CP model works and shares the process groups (it raised);
  `resize_token_embeddings` then new ids under CP (they were refused); `num_logits_to_keep` is
  FLA's deprecated `logits_to_keep` (it was ignored).

The multi-rank checks of one world size share one spawn (process start-up dominates on CPU).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fla_cp  # noqa: F401  (registers the Auto classes)
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, sync_gradients
from tests.cp._dist import run_ranks

TOL = 1e-5
VOCAB = 128
TINY = dict(hidden_size=64, head_dim=16, num_heads=2, num_hidden_layers=1, vocab_size=VOCAB, hidden_ratio=2,
            norm_eps=1e-6)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_model(state=None, seed=0, **cfg) -> GatedDeltaNetCPForCausalLM:
    torch.manual_seed(seed)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{**TINY, **cfg}))
    if state is not None:
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
    return model


def ids_of(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def labels_of(ids):
    labels = ids.clone()
    labels[0, 3:7] = -100
    return labels


def custom_loss(logits, ids):
    """A loss the caller computes on global logits (not the model's)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + 1e-3 * logits.square().mean()


def fla_l2warp_loss(logits, labels, num_items_in_batch=None):
    """FLA's `_compute_logits_and_loss` with use_l2warp (unfused cross-entropy), on full logits."""
    from fla.modules.l2warp import l2_warp
    shift = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), ignore_index=-100, reduction=reduction)
    loss = l2_warp(loss, logits)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def expect_error(fn, *matches):
    try:
        fn()
    except (ValueError, NotImplementedError) as e:
        for m in matches:
            assert m in str(e), f"wrong message (expected {m!r}): {e}"
        return str(e)
    raise AssertionError(f"no error raised (expected {matches})")


def error_of(fn) -> str:
    """The ValueError `fn` raises, or "no error" (in workers: the test asserts, so one defect does not
    hide the others computed in the same spawn)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


# ------------------------------------------------------------------- what each case computes
# case name -> (model kwargs, fn(model, sync) -> (loss, grads)); the same on one process and under CP
def _case_gathered_custom(model, sync, ids):
    out = model(ids, gather_logits=True, use_cache=False)
    loss = custom_loss(out.logits, ids)
    loss.backward()
    sync(model)
    return loss.detach(), grads_of(model)


def _case_labels(model, sync, ids, gather):
    out = model(ids, labels=labels_of(ids), gather_logits=gather, use_cache=False)
    out.loss.backward()
    sync(model)
    return out.loss.detach(), grads_of(model)


def _case_labels_plus_gathered(model, sync, ids):
    out = model(ids, labels=labels_of(ids), gather_logits=True, use_cache=False)
    loss = out.loss + custom_loss(out.logits, ids)
    loss.backward()
    sync(model)
    return loss.detach(), grads_of(model)


def _case_l2warp(model, sync, ids, num_items_in_batch=None):
    out = model(ids, labels=labels_of(ids), use_cache=False, num_items_in_batch=num_items_in_batch)
    out.loss.backward()
    sync(model)
    return out.loss.detach(), grads_of(model)


def _case_decode_grad(model, sync, ids):
    """A decode step run with gradients after a (no-grad) CP prefill: replicated on every rank."""
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
    out = model(ids[:, -1:], past_key_values=cache, use_cache=True)
    loss = F.cross_entropy(out.logits[:, -1].float(), ids[:, 0]) + 1e-3 * out.logits.square().mean()
    loss.backward()
    sync(model)
    return loss.detach(), grads_of(model)


CASES = {
    "gathered custom": (_case_gathered_custom, {}),
    "labels, local logits": (lambda m, s, i: _case_labels(m, s, i, False), {}),
    "labels, gathered logits": (lambda m, s, i: _case_labels(m, s, i, True), {}),
    "labels + loss on gathered logits": (_case_labels_plus_gathered, {}),
    "decode step with grad": (_case_decode_grad, {}),
}


def _run_cases(model_of, sync, ids, names):
    res = {}
    for name in names:
        fn, _ = CASES[name]
        for tied in (False, True):
            model = model_of(tied)
            model.zero_grad()
            res[(name, tied)] = fn(model, sync, ids)
    return res


def _no_sync(model):
    pass


def _states():
    return {tied: make_model(tie_word_embeddings=tied).state_dict() for tied in (False, True)}


def _worker_grads(rank, world, states, layout):
    from fla_cp.models import sync_gradients
    ids = ids_of(2, 26)

    def model_of(tied):
        return make_model(states[tied], tie_word_embeddings=tied, cp_size=world, cp_layout=layout)

    res = _run_cases(model_of, sync_gradients, ids, list(CASES))
    # FLA's l2_warp, exactly under CP (mean and num_items_in_batch reductions)
    model = make_model(states[False], cp_size=world, cp_layout=layout, use_l2warp=True)
    res["l2warp"] = _case_l2warp(model, sync_gradients, ids)
    model.zero_grad()
    res["l2warp nib"] = _case_l2warp(model, sync_gradients, ids, torch.tensor(13.0))
    # every label -100: NaN, as FLA's mean cross-entropy
    res["all ignored"] = model(ids, labels=torch.full_like(ids, -100), use_cache=False).loss.detach()
    if world == 2:
        res["unshard"] = _unshard_grads(model)
        res["one check"] = _count_checks(model, ids)
        res["errors"] = _mask_errors(model, ids)
    return res


def _unshard_grads(model):
    """`CPContext.unshard(grad=...)`: the same loss on every rank, through a plain gather."""
    ctx = model.build_cp_context(seq_len=10)
    w = torch.arange(30.0).view(1, 10, 3)
    out = {}
    for mode in ("sum", "mean"):
        x = ctx.shard(w.clone(), 1).requires_grad_()
        (ctx.unshard(x, 1, grad=mode) * w).sum().backward()
        out[mode] = (x.grad, ctx.shard(w, 1))
    return out


def _count_checks(model, ids):
    """Agreement checks (tiny all_gathers) per forward: prefill and decode run exactly one each."""
    from fla_cp import checks
    from fla_cp.ops import comm
    calls, real = [], checks.check_agreement

    def spy(group, *args, **kwargs):
        if comm.world_size(group) > 1:      # one-rank contexts (single-device ops) do not communicate
            calls.append(group)
        return real(group, *args, **kwargs)

    checks.check_agreement = spy
    try:
        counts = []
        with torch.no_grad():
            model.eval()
            cache = model(ids[:, :-1], use_cache=True).past_key_values
            counts.append(len(calls))
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
            counts.append(len(calls) - counts[0])
            model.train()
    finally:
        checks.check_agreement = real
    return counts


def _mask_errors(model, ids):
    mask = torch.ones_like(ids)
    mask[0, 9:12] = 0                                   # a hole on rank 0's tokens (T_loc = 13)
    out = {"global": error_of(lambda: model(ids, attention_mask=mask))}
    ctx = model.build_cp_context(seq_len=ids.shape[1])
    local = ctx.shard(mask, 1) if ctx.rank == 0 else torch.ones(2, ctx.local_len, dtype=torch.long)
    out["local"] = error_of(lambda: model(ids, attention_mask=local))
    both = torch.ones_like(ids)
    both[1, :4] = 0
    both[1, -5:] = 0                                    # padding on both sides is padding, not a hole
    out["both sides"] = model(ids, attention_mask=both, use_cache=False, gather_logits=True).logits.detach()
    return out


def _worker_mismatch(rank, world):
    """Bad or mismatched input on one rank only: every rank must raise (no hang)."""
    model = make_model(cp_size=world).eval()
    single = make_model().eval()     # every rank builds it: building a model may create process groups
    ids = ids_of(2, 20)
    res = {}
    with torch.no_grad():
        if rank == 1:   # this rank decodes (non-empty cache) while rank 0 prefills
            cache = single(ids, use_cache=True).past_key_values
            step = lambda: model(ids[:, -1:], past_key_values=cache, use_cache=True)  # noqa: E731
        else:
            step = lambda: model(ids[:, :4], use_cache=True)  # noqa: E731
        res["decode vs prefill"] = error_of(step)
        # a split only rank 1 cannot build: reported by the forward's check, on every rank
        packed = ids_of(1, 20)
        cu = torch.tensor([0, 12, 20] if rank == 0 else [0, 12, 5])
        res["bad cu_seqlens"] = error_of(lambda: model(packed, cu_seqlens=cu))
        res["lengths differ"] = error_of(lambda: model(ids[:, :18 + rank]))
        bad_ids = ids.clone()
        bad_ids[0, 15] = 128 if rank == 1 else 0     # vocab 128, in rank 1's shard: its embedding would IndexError
        res["token id"] = error_of(lambda: model(bad_ids))
        # ranks passing different "same" global data: content codes differ, every rank raises
        other = ids.clone()
        other[1, 2] = (other[1, 2] + rank) % VOCAB
        res["prompt differs"] = error_of(lambda: model(other))
        labels = labels_of(ids)
        bad_labels = labels.clone()
        bad_labels[0, 15] = 1000 if rank == 1 else bad_labels[0, 15]   # in rank 1's own shard
        res["labels out of range"] = error_of(lambda: model(ids, labels=bad_labels))
        res["labels float"] = error_of(lambda: model(ids, labels=labels.float() if rank == 1 else labels))
        res["num_items differs"] = error_of(lambda: model(ids, labels=labels, num_items_in_batch=10 + rank))
        res["labels vs shift_labels"] = error_of(
            lambda: model(ids, labels=labels) if rank == 0 else model(ids, shift_labels=labels))
        mask = torch.ones_like(ids)
        mask[0, :2 + rank] = 0
        res["mask differs"] = error_of(lambda: model(ids, attention_mask=mask))
        # a replicated step whose cache holds another batch on one rank: it raised there only
        cache = single(ids[:1 + rank, :6], use_cache=True).past_key_values
        res["cache rows differ"] = error_of(lambda: model(ids[:1, 6:7], past_key_values=cache, use_cache=True))
        # a decode step fed a different token on one rank (ranks whose sampling diverged)
        cache = model(ids[:, :8], use_cache=True).past_key_values
        res["decode token differs"] = error_of(
            lambda: model(ids[:, 8:9] if rank == 0 else ids[:, 9:10], past_key_values=cache, use_cache=True))
        res["generate differs"] = error_of(lambda: model.generate(ids[:, :8], max_new_tokens=3 + rank, do_sample=False))
    # one rank under no_grad while the other records a graph: its backward would wait alone
    model.train()
    with torch.set_grad_enabled(rank == 0):
        res["grad mode differs"] = error_of(lambda: model(ids, labels=labels_of(ids)))
    with torch.no_grad():
        # and the group still works afterwards
        res["after"] = model(ids, gather_logits=True).logits
    return res


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def references():
    states = _states()
    ids = ids_of(2, 26)

    def model_of(tied):
        return make_model(states[tied], tie_word_embeddings=tied)

    refs = _run_cases(model_of, _no_sync, ids, list(CASES))
    # FLA's formula on the plain model's logits
    for name, nib in (("l2warp", None), ("l2warp nib", torch.tensor(13.0))):
        model = make_model(states[False])
        logits = model(ids, use_cache=False).logits
        loss = fla_l2warp_loss(logits, labels_of(ids), nib)
        loss.backward()
        refs[name] = (loss.detach(), grads_of(model))
    with torch.no_grad():
        both = torch.ones_like(ids)
        both[1, :4] = 0
        both[1, -5:] = 0
        refs["both sides"] = make_model(states[False])(ids, attention_mask=both, use_cache=False).logits
    return states, refs


def _compare(got, ref, tag):
    loss, grads = got
    rloss, rgrads = ref
    assert rel_err(loss, rloss) <= TOL, f"{tag}: loss {loss} vs {rloss}"
    assert set(grads) == set(rgrads), f"{tag}: grads of {sorted(set(grads) ^ set(rgrads))}"
    for n, rg in rgrads.items():
        err = rel_err(grads[n], rg)
        assert err <= TOL, f"{tag}: grad of {n} {err:.2e} (|grad|/|ref| = {(grads[n].norm() / rg.norm()):.3f})"


@pytest.fixture(scope="module")
def cp2(references):
    states, _ = references
    return run_ranks(_worker_grads, 2, args=(states, "contiguous"), timeout=120)


@pytest.fixture(scope="module")
def cp3(references):
    states, _ = references
    return run_ranks(_worker_grads, 3, args=(states, "zigzag"), timeout=120)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("world", [2, 3])
def test_replicated_logits_count_once(references, cp2, cp3, world):
    """Losses on gathered logits / decode steps: after sync_gradients, the single-device gradient."""
    _, refs = references
    for rank, res in enumerate(cp2 if world == 2 else cp3):
        for name in CASES:
            for tied in (False, True):
                _compare(res[(name, tied)], refs[(name, tied)], f"cp={world} rank {rank} {name} tied={tied}")


@pytest.mark.parametrize("world", [2, 3])
def test_l2warp_is_flas(references, cp2, cp3, world):
    _, refs = references
    for rank, res in enumerate(cp2 if world == 2 else cp3):
        for name in ("l2warp", "l2warp nib"):
            _compare(res[name], refs[name], f"cp={world} rank {rank} {name}")


def test_l2warp_single_process(references):
    states, refs = references
    ids = ids_of(2, 26)
    for name, nib in (("l2warp", None), ("l2warp nib", torch.tensor(13.0))):
        model = make_model(states[False], use_l2warp=True)
        _compare(_case_l2warp(model, _no_sync, ids, nib), refs[name], f"cp=1 {name}")


def test_all_labels_ignored_is_nan(cp2, cp3):
    model = make_model()
    ids = ids_of(2, 26)
    ref = F.cross_entropy(torch.randn(4, VOCAB), torch.full((4,), -100))     # torch's (and FLA's) mean
    assert torch.isnan(ref)
    assert torch.isnan(model(ids, labels=torch.full_like(ids, -100)).loss)
    for res in cp2 + cp3:
        assert torch.isnan(res["all ignored"])


def test_unshard_grad_modes(cp2):
    for res in cp2:
        (g_sum, w_sum), (g_mean, w_mean) = res["unshard"]["sum"], res["unshard"]["mean"]
        assert torch.equal(g_sum, 2 * w_sum) and torch.equal(g_mean, w_mean)
    from fla_cp.ops import build_cp_context
    ctx = build_cp_context(None, seq_len=4, _single=True)
    with pytest.raises(ValueError, match="grad must be"):
        ctx.unshard(torch.zeros(1, 4), 1, grad="avg")


def test_one_agreement_check_per_forward(cp2):
    for rank, res in enumerate(cp2):
        assert res["one check"] == [1, 1], f"rank {rank}: checks per (prefill, decode): {res['one check']}"


def test_one_rank_mismatch_raises_everywhere():
    results = run_ranks(_worker_mismatch, 2, timeout=60)
    for rank, res in enumerate(results):
        assert "continuation (cache length, new tokens) differs" in res["decode vs prefill"], res["decode vs prefill"]
        err = res["bad cu_seqlens"]
        assert "rank 1: cu_seqlens must" in err and "rank 0:" not in err, err
        assert "input_ids (given, inputs_are_sharded, length along dim 1, content) differs" in res["lengths differ"], \
            res["lengths differ"]
        err = res["token id"]
        assert "rank 1: input_ids holds ids in [" in err and "outside the vocabulary [0, 128)" in err, err
        for case, words in {"prompt differs": "content) differs", "labels out of range": "rank 1: labels holds values",
                            "labels float": "rank 1: labels must be an integer", "num_items differs":
                            "num_items_in_batch (given, value) differs", "labels vs shift_labels":
                            "shift_labels given", "mask differs": "attention_mask (given, content) differs",
                            "generate differs": "max_new_tokens differs",
                            "cache rows differ": "rank 1: a continuation needs the cache to hold one per row (B=1)",
                            "grad mode differs": "records a graph (grad mode on, parameters or inputs requiring grad)",
                            "decode token differs": "length along dim 1, content) differs"}.items():
            assert words in res[case], f"rank {rank}, {case}: {res[case]}"
    assert torch.equal(results[0]["after"], results[1]["after"])


def test_mask_hole_raises_under_cp(references, cp2):
    _, refs = references
    for rank, res in enumerate(cp2):
        errors = res["errors"]
        for m in ("attention_mask row 0 has a hole", "rank 0", "rank 1"):
            assert m in errors["global"], errors["global"]
        for m in ("attention_mask row 0 has a hole", "rank 0", "this rank's shard"):
            assert m in errors["local"], errors["local"]
        assert "rank 1" not in errors["local"], errors["local"]
        err = rel_err(errors["both sides"], refs["both sides"])
        assert err <= TOL, f"rank {rank}: padding on both sides, logits {err:.2e}"


def test_mask_hole_raises_single_process():
    model = make_model()
    ids = ids_of(2, 20)
    mask = torch.ones_like(ids)
    mask[1, 8:11] = 0
    expect_error(lambda: model(ids, attention_mask=mask), "attention_mask row 1 has a hole", "8..10")
    expect_error(lambda: model(ids, attention_mask=mask * 2), "0/1")
    # left, right and both-sided padding: the padded row's tokens are those of the unpadded tokens alone
    with torch.no_grad():
        for s, e in ((5, 20), (0, 13), (3, 16)):
            mask = torch.ones_like(ids)
            mask[1, :s] = 0
            mask[1, e:] = 0
            got = model(ids, attention_mask=mask, use_cache=False).logits[1, s:e]
            ref = model(ids[1:, s:e], use_cache=False).logits[0]
            assert rel_err(got, ref) <= TOL, (s, e)


# ------------------------------------------------------------------- a user's module, copies, resizing
class Wrapper(torch.nn.Module):
    """A user's module around the LM: a projector on the input embeddings (as a soft-prompt or VLM
    adapter does), upstream of the CP model."""

    def __init__(self, lm):
        super().__init__()
        self.proj = torch.nn.Linear(lm.config.hidden_size, lm.config.hidden_size)
        self.lm = lm

    def forward(self, ids):
        return self.lm(inputs_embeds=self.proj(self.lm.get_input_embeddings()(ids)), labels=ids).loss


def _wrapping_cases(model, sync):
    """Wrapper grads; a deep copy's logits; logits and loss with new ids after growing the vocabulary;
    `num_logits_to_keep=1` logits."""
    res = {}
    torch.manual_seed(4)
    wrapper = Wrapper(model)
    ids = ids_of(2, 14, seed=9)
    wrapper(ids).backward()
    sync(wrapper)
    res["wrapper grads"] = grads_of(wrapper)
    model.zero_grad()
    with torch.no_grad():
        twin = copy.deepcopy(model)
        res["copy logits"] = twin(ids, gather_logits=True).logits
        res["copy shares groups"] = twin.cp_group is model.cp_group and twin.model.cp_group is model.cp_group
        res["num_logits_to_keep"] = model(ids, num_logits_to_keep=1).logits
        model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
        new = ids.clone()
        new[0, 4], new[1, 11] = VOCAB + 5, VOCAB + 7      # on both ranks' shards at P = 2
        out = model(new, labels=new, gather_logits=True)
        res["resized"] = (out.loss, out.logits)
    return res


def _worker_wrapping(rank, world, state):
    res = _wrapping_cases(make_model(state, cp_size=world), sync_gradients)
    res["no CP model"] = error_of(lambda: sync_gradients(torch.nn.Linear(2, 2)))
    other = dist.new_group(list(range(world)))       # a second CP group over the same ranks
    both = torch.nn.ModuleList([make_model(state, cp_size=world),
                                GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**TINY), cp_group=other)])
    res["two groups"] = error_of(lambda: sync_gradients(both))
    # ranks holding gradients for different (same-sized) parameters: the flattened buffers would
    # misalign silently (q's gradient summed into k's), or abort gloo when the sizes differ
    model = make_model(state, cp_size=world).train()
    model(ids_of(2, 20), labels=labels_of(ids_of(2, 20))).loss.backward()
    attn = model.model.layers[0].attn
    (attn.q_proj if rank == 0 else attn.k_proj).weight.grad = None
    res["grads differ"] = error_of(lambda: sync_gradients(model))
    model.lm_head.weight.grad = None if rank == 1 else model.lm_head.weight.grad
    res["grad count differs"] = error_of(lambda: sync_gradients(model))
    return res


def test_wrapper_sync_deepcopy_resize_num_logits_to_keep():
    state = make_model().state_dict()
    ref = _wrapping_cases(make_model(state), lambda m: None)
    assert ref["num_logits_to_keep"].shape == (2, 1, VOCAB)
    for rank, res in enumerate(run_ranks(_worker_wrapping, 2, args=(state,), timeout=120)):
        _compare((torch.zeros(()), res["wrapper grads"]), (torch.zeros(()), ref["wrapper grads"]),
                 f"rank {rank} wrapper")
        assert rel_err(res["copy logits"], ref["copy logits"]) <= TOL and res["copy shares groups"], f"rank {rank}"
        got = res["num_logits_to_keep"]
        assert got.shape == (2, 1, VOCAB) and rel_err(got, ref["num_logits_to_keep"]) <= TOL, f"rank {rank}"
        for a, b in zip(res["resized"], ref["resized"]):
            assert rel_err(a, b) <= TOL, f"rank {rank}: after resize_token_embeddings {rel_err(a, b):.2e}"
        assert "no GatedDeltaNetCP model found in Linear" in res["no CP model"], res["no CP model"]
        assert "different process groups" in res["two groups"], res["two groups"]
        for case in ("grads differ", "grad count differs"):
            assert "sync_gradients: parameters with a gradient (count, which) differs" in res[case], res[case]
