"""transformers' Qwen3.5, Qwen3.5-MoE and Qwen3-Next under CP vs transformers' own model in one process.

The reference is transformers' class itself (`Qwen3_5ForCausalLM`, ...; its PyTorch fallbacks on CPU),
with the same weights; our CP model runs on P gloo ranks, both layouts. Tiny configs with GVA (2 key
heads : 4 value heads), GQA attention (4 : 2), partial RoPE, slow-decay GDN heads, random norm weights;
Qwen3-Next mixes dense and MoE layers, Qwen3.5-MoE is MoE throughout (router load-balancing loss on).
- training: loss, gathered logits and every gradient after `sync_gradients`: a dense batch, a
  left-padded batch (real tokens compared), packed documents crossing ranks (transformers cannot pack
  on CPU: the reference runs one document at a time; the MoE aux loss pools the documents' router
  logits, as one packed batch would);
- caches (transformers' `DynamicCache`): a CP prefill, a multi-token CP continuation and replicated
  decode steps vs transformers' own cached run (dense, left-padded, zigzag with parts of ~1 token);
  greedy `generate` with a left-padded prompt equals transformers' tokens.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fla_cp.models
from fla_cp.models import output_cache, sync_gradients
from fla_cp.models.hf_compat import CACHE_KWARG
from tests.cp._dist import run_ranks

if fla_cp.models.QWEN_FAMILIES_MISSING:
    pytest.skip(fla_cp.models.QWEN_FAMILIES_MISSING, allow_module_level=True)

TOL = 1e-5
# Gradients that sum every token's contribution with heavy cancellation get their own bounds, set from
# a sweep (scripts/sweep_qwen_margins.py, 27 seeds at P=2, 4 at P=3 and 4; docs/RESULTS.md) against a
# true fp64 run of transformers' model: the per-head decay parameters (A_log, dt_bias) and the projection
# into the decay (in_proj_a), where transformers' own fp32 gradient is up to 5.3e-5 off fp64 and CP's
# up to 7e-5 (worst CP vs transformers 8.9e-5); the MoE router's weights (gradients through top-k
# routing: transformers' fp32 4.3e-6 off fp64, CP vs transformers 3.4e-6). The CP split only reorders
# these sums; everything else keeps TOL with at least 4x margin.
TOL_DECAY = 3e-4
DECAY_PARAMS = ("A_log", "dt_bias", "in_proj_a.weight")
TOL_ROUTER = 2e-5
ROUTER_PARAMS = ("mlp.gate.weight",)
VOCAB = 96
FAMILIES = ("qwen3_5", "qwen3_next", "qwen3_5_moe")
# the weights' seed and an offset added to every data seed; scripts/sweep_qwen_margins.py varies them (in
# spawned ranks too), the tests use these values
WEIGHT_SEED = 0
DATA_SEED = 0
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=256, rms_norm_eps=1e-6,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
           output_router_logits=True, router_aux_loss_coef=0.5)


def classes(family):
    """(transformers' config class, transformers' causal LM, ours)."""
    from fla_cp.models import Qwen3_5CPForCausalLM, Qwen3_5MoeCPForCausalLM, Qwen3NextCPForCausalLM
    from transformers import (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig,
                              Qwen3NextConfig, Qwen3NextForCausalLM)
    return {"qwen3_5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, Qwen3_5CPForCausalLM),
            "qwen3_next": (Qwen3NextConfig, Qwen3NextForCausalLM, Qwen3NextCPForCausalLM),
            "qwen3_5_moe": (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeCPForCausalLM)}[family]


def config_of(family):
    fields = dict(COMMON, intermediate_size=48)
    if family == "qwen3_next":      # layer 0 dense, the others MoE
        fields.update(MOE, decoder_sparse_step=1, mlp_only_layers=[0])
    elif family == "qwen3_5_moe":
        fields.update(MOE)
    config = classes(family)[0](**fields)
    config._attn_implementation = "eager"
    return config


def reference_model(family):
    """transformers' model with random, non-trivial weights (fixed seed)."""
    torch.manual_seed(WEIGHT_SEED)
    model = classes(family)[1](config_of(family)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("A_log"):         # slow-decay heads expose state leaks
                p.copy_(torch.linspace(-6.0, 1.0, p.numel()))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3.0)                      # sharper attention: a wrong key changes the output
    return model


def cp_model(family, state, output_router_logits=True, **cp):
    config = copy.deepcopy(config_of(family))
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = output_router_logits
    model = classes(family)[2]._from_config(config, **cp).float()
    model.load_state_dict(state)
    return model


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ids_of(B, T, seed):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(DATA_SEED + seed))


CU = [0, 2, 9, 10, 21, 30]          # documents shorter than the conv window, crossing ranks


def padded_batch():
    """(ids, mask, labels): row 0 left-padded; no label is predicted from a pad (a pad's output is
    transformers' garbage, ours zero): the pads' and the first real token's labels are -100."""
    ids = ids_of(2, 19, seed=2)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :5] = 0
    labels = ids.clone()
    labels[0, :6] = -100
    return ids, mask, labels


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ one process (transformers)
def reference_training(model):
    """transformers: {case: (loss, logits of the real tokens, grads)}."""
    refs = {}
    ids = ids_of(2, 23, seed=1)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    refs["dense"] = (out.loss.detach(), out.logits.detach(), grads_of(model))

    ids, mask, labels = padded_batch()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    refs["padded"] = (out.loss.detach(), out.logits.detach()[mask.bool()], grads_of(model))

    # packed: one run per document; the loss is the token mean over all documents (and the MoE aux loss
    # pools every document's router statistics, as one packed batch)
    ids = ids_of(1, CU[-1], seed=3)
    model.zero_grad()
    total, count, logits, routers = 0.0, 0, [], []
    moe = getattr(model.config, "num_experts", 0)
    for s, e in zip(CU[:-1], CU[1:]):
        out = model(input_ids=ids[:, s:e], use_cache=False, **({"output_router_logits": True} if moe else {}))
        logits.append(out.logits)
        if e - s > 1:
            total = total + torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, s + 1:e], reduction="sum")
            count += e - s - 1
        if moe:
            routers.append(out.router_logits)
    loss = total / count
    if moe:
        from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func
        pooled = tuple(torch.cat([r[i] for r in routers]) for i in range(len(routers[0])))
        loss = loss + model.config.router_aux_loss_coef * load_balancing_loss_func(
            pooled, model.config.num_experts, model.config.num_experts_per_tok, None)
    loss.backward()
    refs["packed"] = (loss.detach(), torch.cat(logits, 1).detach(), grads_of(model))
    return refs


CONTINUATIONS = [  # (name, layout, B, prefill T0, continuation T1, left padding of row 0)
    ("dense", "contiguous", 1, 10, 13, 0),
    ("left-padded", "contiguous", 2, 11, 9, 3),
    ("zigzag, short parts", "zigzag", 2, 12, 7, 2),
]
STEPS = 3


def continuation(model, case, cp: bool):
    """Logits (real tokens) of a prefill, a continuation and STEPS decode steps through the model's cache."""
    _, _, B, T0, T1, left = case
    ids = ids_of(B, T0 + T1 + STEPS, seed=5)
    mask = torch.ones(B, T0 + T1 + STEPS, dtype=torch.long)
    mask[0, :left] = 0
    kw = dict(gather_logits=True) if cp else {}
    logits = []
    with torch.no_grad():
        out = model(ids[:, :T0], attention_mask=mask[:, :T0], use_cache=True, **kw)
        logits.append(out.logits)
        cache = output_cache(out)
        for s, e in ((T0, T0 + T1),) + tuple((t, t + 1) for t in range(T0 + T1, T0 + T1 + STEPS)):
            # (the cache under the name this transformers passes it: `cache` from 5.24 on)
            out = model(ids[:, s:e], attention_mask=mask[:, :e], use_cache=True, **{CACHE_KWARG: cache}, **kw)
            logits.append(out.logits)
            cache = output_cache(out)
    return torch.cat(logits, 1)[mask.bool()]


def greedy(model):
    ids = ids_of(2, 11, seed=4)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


# ------------------------------------------------------------------------------------ CP ranks
def cp_training(model):
    res = {}
    ids = ids_of(2, 23, seed=1)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, gather_logits=True)
    out.loss.backward()
    sync_gradients(model)
    res["dense"] = (out.loss.detach(), out.logits.detach(), grads_of(model))

    ids, mask, labels = padded_batch()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, gather_logits=True)
    out.loss.backward()
    sync_gradients(model)
    res["padded"] = (out.loss.detach(), out.logits.detach()[mask.bool()], grads_of(model))

    ids = ids_of(1, CU[-1], seed=3)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, cu_seqlens=CU, gather_logits=True)
    out.loss.backward()
    sync_gradients(model)
    res["packed"] = (out.loss.detach(), out.logits.detach(), grads_of(model))
    return res


def _worker(rank, world, family, state):
    res = {}
    for layout in ("contiguous", "zigzag"):
        res[("train", layout)] = cp_training(cp_model(family, state, cp_size=world, cp_layout=layout).train())
    for case in CONTINUATIONS:
        res[("continuation", case[0])] = continuation(
            cp_model(family, state, cp_size=world, cp_layout=case[1], output_router_logits=False).eval(), case,
            cp=True)
    model = cp_model(family, state, cp_size=world, output_router_logits=False).eval()
    res["generate"] = greedy(model)
    if family != "qwen3_next":
        # Qwen3.5's multi-axis positions ([4, B, T]: text, then temporal / height / width; for text all equal)
        # are sharded like the tokens: the same logits as the default 1-D positions
        ids = ids_of(2, 23, seed=6)
        pos = torch.arange(23).expand(4, 2, 23)
        with torch.no_grad():
            res["mrope positions"] = (model(ids, position_ids=pos, use_cache=False, gather_logits=True).logits,
                                      model(ids, use_cache=False, gather_logits=True).logits)
    return res


# Qwen3.5-MoE is Qwen3.5's layers plus Qwen3-Next's MoE blocks, both in the default run: it runs in the
# slow run (default suite time)
@pytest.fixture(scope="module", params=[f if f != "qwen3_5_moe" else pytest.param(f, marks=pytest.mark.slow)
                                        for f in FAMILIES])
def reference(request):
    family = request.param
    model = reference_model(family).train()
    refs = {"train": reference_training(model)}
    # (transformers' aux loss fails on a continuation: it weighs this call's router rows with generate's
    # [B, past + T] mask; nothing to compare there anyway)
    model.config.output_router_logits = False
    model.eval()
    for case in CONTINUATIONS:
        refs[("continuation", case[0])] = continuation(model, case, cp=False)
    refs["generate"] = greedy(model)
    return family, model.state_dict(), refs


def compare_training(got, ref, tag):
    loss, logits, grads = got
    rloss, rlogits, rgrads = ref
    assert rel_err(loss, rloss) <= TOL, f"{tag}: loss {loss.item()} vs {rloss.item()}"
    assert rel_err(logits, rlogits) <= TOL, f"{tag}: logits {rel_err(logits, rlogits):.2e}"
    assert set(grads) == set(rgrads), f"{tag}: parameters with gradients differ: {set(grads) ^ set(rgrads)}"
    for n, rg in rgrads.items():
        tol = TOL_DECAY if n.endswith(DECAY_PARAMS) else TOL_ROUTER if n.endswith(ROUTER_PARAMS) else TOL
        assert rel_err(grads[n], rg) <= tol, f"{tag}: grad of {n} {rel_err(grads[n], rg):.2e}"


def test_one_process_equals_transformers(reference):
    """cp_size=1 (our layers, no split) == transformers' class: training cases, caches, generate."""
    family, state, refs = reference
    model = cp_model(family, state).train()
    ours = cp_training(model)      # sync_gradients: a no-op without CP
    for case in ("dense", "padded", "packed"):
        compare_training(ours[case], refs["train"][case], f"{family}, one process, {case}")
    model.eval()
    model.config.output_router_logits = False
    for case in CONTINUATIONS:
        got = continuation(model, case, cp=False)
        assert rel_err(got, refs[("continuation", case[0])]) <= TOL, f"{family}: continuation {case[0]}"
    assert torch.equal(greedy(model), refs["generate"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_cp_equals_transformers(reference, world_size):
    family, state, refs = reference
    results = run_ranks(_worker, world_size, args=(family, state), timeout=600)
    for rank, res in enumerate(results):
        for layout in ("contiguous", "zigzag"):
            for case in ("dense", "padded", "packed"):
                compare_training(res[("train", layout)][case], refs["train"][case],
                                 f"{family}, P={world_size} {layout}, rank {rank}, {case}")
        for case in CONTINUATIONS:
            got, want = res[("continuation", case[0])], refs[("continuation", case[0])]
            assert rel_err(got, want) <= TOL, \
                f"{family}, P={world_size}, rank {rank}: continuation {case[0]} {rel_err(got, want):.2e}"
        assert torch.equal(res["generate"], refs["generate"]), (family, rank, res["generate"], refs["generate"])
        if "mrope positions" in res:
            assert rel_err(*res["mrope positions"]) <= TOL, (family, rank, rel_err(*res["mrope positions"]))
