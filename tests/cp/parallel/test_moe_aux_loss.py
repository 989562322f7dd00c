"""`load_balancing_loss_cp` (fla_cp/parallel/moe.py) against transformers' `load_balancing_loss_func`.

One spawn of 3 gloo ranks runs every multi-rank case: groups of 1, 2 and 3 ranks (subgroups of the
world), token splits (contiguous, zigzag, a random partition, one with an empty rank), no mask / left
padding / random zeros, top_k 1 and 2, 1 and 3 MoE layers. Every rank's loss must equal transformers'
function on the full batch, and the ranks' logit gradients (each on its own rows) must sum to the
single-process gradient. The data is drawn from a fresh seed (FLA_CP_TEST_SEED to replay one), built
here and passed to the ranks.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist
from fla_cp.parallel.moe import load_balancing_loss_cp

from _dist import run_ranks

SEED = int(os.environ.get("FLA_CP_TEST_SEED", random.randrange(2 ** 31)))
B, T, E = 2, 13, 8


def _splits(P: int, gen: torch.Generator) -> dict[str, list[list[int]]]:
    """Ways to deal the T positions to P ranks (each rank's positions in increasing order)."""
    pos = torch.arange(T)
    out = {"contiguous": [p.tolist() for p in torch.tensor_split(pos, P)]}
    chunks = torch.tensor_split(pos, 2 * P)
    out["zigzag"] = [torch.cat([chunks[r], chunks[2 * P - 1 - r]]).tolist() for r in range(P)]
    perm = torch.randperm(T, generator=gen)
    cuts = sorted(torch.randint(0, T + 1, (P - 1,), generator=gen).tolist())
    out["random"] = [sorted(p.tolist()) for p in torch.tensor_split(perm, cuts)]
    if P > 1:
        out["empty_rank"] = [p.tolist() for p in torch.tensor_split(pos, P - 1)] + [[]]
    return out


def _mask(kind: str, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "left":
        pads = torch.randint(0, T - 1, (B,), generator=gen)
        return (torch.arange(T)[None, :] >= pads[:, None]).long()
    mask = (torch.rand(B, T, generator=gen) < 0.7).long()
    mask[0, 0] = 1  # never all padding (R = 0: 0/0)
    return mask


def _cases(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for P in (1, 2, 3):
        for split_name, split in _splits(P, gen).items():
            for mask_kind in ("none", "left", "random"):
                for top_k in (1, 2):
                    for layers in (1, 3):
                        cases.append(dict(P=P, split=split, name=f"P={P} {split_name} mask={mask_kind} "
                                          f"top_k={top_k} layers={layers}", top_k=top_k,
                                          logits=torch.randn(layers, B, T, E, generator=gen) * 2,
                                          mask=_mask(mask_kind, gen)))
    return cases


def _transformers_functions():
    """Both models' copies of the function. Imported here, not at the top: the spawned ranks import this
    module too and need none of transformers' modeling code."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func as qwen35
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func as qwen3_next
    return qwen3_next, qwen35


def _reference(case: dict, fn=None):
    """transformers' value (Qwen3-Next's function unless `fn`) and its gradient w.r.t. the `[L, B, T, E]`
    logits."""
    fn = fn or _transformers_functions()[0]
    logits = case["logits"].clone().requires_grad_(True)
    loss = fn(tuple(logits[i].reshape(B * T, E) for i in range(logits.shape[0])), E, case["top_k"],
              case["mask"])
    loss.backward()
    return loss.detach(), logits.grad


def _local_call(case: dict, rank: int, group, **kwargs):
    """This rank's shard of the case: its loss and the gradient on its own logits `[L, B, T_loc, E]`."""
    idx = case["split"][rank]
    local = case["logits"][:, :, idx].clone().requires_grad_(True)
    mask = case["mask"][:, idx] if case["mask"] is not None else None
    loss = load_balancing_loss_cp(tuple(local[i].reshape(B * len(idx), E) for i in range(local.shape[0])),
                                  E, case["top_k"], mask, group=group, **kwargs)
    loss.backward()
    return loss.detach(), local.grad


def _ranks_worker(rank, world_size, cases):
    # every rank creates every subgroup, in the same order (new_group is collective over the world)
    groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    results = []
    for i, case in enumerate(cases):
        P = case["P"]
        if rank >= P:
            results.append(None)
            continue
        # half the cases also run the cross-rank argument check: it must not change the value
        results.append(_local_call(case, rank, groups[P], verify_agreement=bool(i % 2)))

    # bad input: every rank must raise (none left waiting in a collective)
    errors = {}
    good = cases[-1]
    idx = good["split"][rank]
    logits = tuple(good["logits"][i][:, idx].reshape(B * len(idx), E) for i in range(good["logits"].shape[0]))
    mask = good["mask"][:, idx] if good["mask"] is not None else None
    bad_calls = {
        # only rank 1 has a wrong number of experts: the agreement check makes every rank raise
        "one_rank_wrong_E": lambda: load_balancing_loss_cp(
            tuple(g[:, :E - 1] for g in logits) if rank == 1 else logits, E, 2, mask, group=dist.group.WORLD,
            verify_agreement=True),
        # rank 2 passes no logits while the others pass a tuple
        "one_rank_no_logits": lambda: load_balancing_loss_cp(
            None if rank == 2 else logits, E, 2, mask, group=dist.group.WORLD, verify_agreement=True),
        # every rank passes the global mask instead of its shard: each raises locally, before any collective
        "global_mask_everywhere": lambda: load_balancing_loss_cp(
            logits, E, 2, torch.ones(B, T + 1, dtype=torch.long), group=dist.group.WORLD),
    }
    for name, call in bad_calls.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    # still in step: a good call after the failures
    errors["after"] = load_balancing_loss_cp(logits, E, 2, mask, group=dist.group.WORLD, verify_agreement=True)
    return results, errors


def test_cp_equals_transformers_value_and_gradient():
    cases = _cases(SEED)
    per_rank = run_ranks(_ranks_worker, 3, (cases,), timeout=200)
    for i, case in enumerate(cases):
        ref_loss, ref_grad = _reference(case)
        msg = f"{case['name']} (FLA_CP_TEST_SEED={SEED})"
        grad_sum = torch.zeros_like(ref_grad)
        for rank in range(case["P"]):
            loss, grad = per_rank[rank][0][i]
            if case["P"] == 1:
                # one rank: transformers' computation, bit for bit
                assert torch.equal(loss, ref_loss), msg
            torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=0, msg=lambda m: f"{msg}: loss: {m}")
            grad_sum[:, :, case["split"][rank]] += grad
        torch.testing.assert_close(grad_sum, ref_grad, rtol=1e-5, atol=1e-8,
                                   msg=lambda m: f"{msg}: summed logit gradients: {m}")

    _, errors = per_rank[0]
    for rank, (_, errs) in enumerate(per_rank):
        assert "rank 1" in errs["one_rank_wrong_E"] and "num_experts" in errs["one_rank_wrong_E"], errs
        assert "gate_logits given as a tuple" in errs["one_rank_no_logits"], errs
        assert f"rank {rank}:" in errs["global_mask_everywhere"] and "attention_mask" in \
            errs["global_mask_everywhere"], errs
    after = [errs["after"] for _, errs in per_rank]
    assert all(torch.equal(a, after[0]) for a in after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "left", "random"])
def test_single_process_is_transformers_exactly(dtype, mask_kind):
    """group None: exactly transformers' value and gradient (both models' copies of the function)."""
    gen = torch.Generator().manual_seed(SEED)
    case = dict(P=1, split=[list(range(T))], top_k=2, logits=torch.randn(3, B, T, E, generator=gen).to(dtype),
                mask=_mask(mask_kind, gen))
    loss, grad = _local_call(case, 0, None)
    for fn in _transformers_functions():
        ref_loss, ref_grad = _reference(case, fn)
        assert loss.dtype == ref_loss.dtype == torch.float32
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad), f"FLA_CP_TEST_SEED={SEED}"


def test_not_a_tuple_gives_zero_like_transformers():
    x = torch.randn(B * T, E)
    for gate_logits in (None, x, [x]):
        assert load_balancing_loss_cp(gate_logits, E, 2) == _transformers_functions()[0](gate_logits, E, 2) == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(gate_logits=()), "empty"),
    (dict(num_experts=E + 1), "num_experts"),
    (dict(num_experts=None), "num_experts"),
    (dict(top_k=E + 1), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(gate_logits=(torch.randn(B * T, E), torch.randn(B, T, E))), "gate_logits[1]"),
    (dict(gate_logits=(torch.randint(0, 3, (B * T, E)),)), "gate_logits[0]"),
    (dict(attention_mask=torch.ones(B, T + 1)), "attention_mask"),
    (dict(attention_mask=torch.ones(B * T)), "attention_mask"),
])
def test_bad_input_names_argument_and_rank(kwargs, words):
    args = dict(gate_logits=(torch.randn(B * T, E),), num_experts=E, top_k=2, attention_mask=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=r"rank 0: .*") as info:
        load_balancing_loss_cp(**args)
    assert words in str(info.value)
