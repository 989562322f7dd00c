"""When the model's cross-rank check runs (fla_cp/checks.py): the first call of a signature, every call
under the debug switch, never in steady state. What it costs is counted by wrapping torch.distributed
(tests/cp/_counting.py): a steady-state training step makes no checking collective and no host sync."""
from __future__ import annotations

import pytest
import torch

import fla_cp.models
from fla_cp import checks
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, sync_gradients
from fla_cp.ops import comm

from _counting import count_costs
from _dist import run_ranks

VOCAB = 128
TINY = dict(hidden_size=32, head_dim=8, num_heads=2, num_hidden_layers=2, vocab_size=VOCAB, hidden_ratio=2,
            norm_eps=1e-6, conv_size=4)


def make_model(**cfg):
    torch.manual_seed(0)
    return GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{**TINY, **cfg}))


def batch(step, B=2, T=40, packed=False):
    g = torch.Generator().manual_seed(100 + step)
    if packed:
        ids = torch.randint(0, VOCAB, (1, T), generator=g)
        cut = sorted(torch.randperm(T - 2, generator=g)[:3].add(1).tolist())    # new boundaries every step
        return dict(input_ids=ids, labels=ids, cu_seqlens=torch.tensor([0, *cut, T]))
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    return dict(input_ids=ids, labels=ids)


class _CheckSpy:
    """Counts calls of the agreement protocol (the model's, the split's, the layers', the op's)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.real = checks.check_agreement

        def spy(group, error, fields, what):
            if comm.world_size(group) > 1:      # one-rank contexts (single-device ops) do not communicate
                self.calls.append(what)
            return self.real(group, error, fields, what)
        checks.check_agreement = spy
        return self

    def __exit__(self, *exc):
        checks.check_agreement = self.real


def _step(model, opt, inputs):
    opt.zero_grad()
    model(**inputs).loss.backward()
    sync_gradients(model)
    opt.step()


def _worker_policy(rank, world):
    res = {}
    for layout, packed in (("contiguous", False), ("zigzag", False), ("contiguous", True)):
        model = make_model(cp_size=world, cp_layout=layout)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        tag = f"{layout}{' packed' if packed else ''}"
        per_step = []
        for step in range(4):
            inputs = batch(step, packed=packed)
            with _CheckSpy() as spy, count_costs(device_data=(model, *inputs.values())) as c:
                _step(model, opt, inputs)
            per_step.append((list(spy.calls), dict(c.by_caller("collectives")), dict(c.by_caller("device_syncs"))))
        res[tag] = per_step
    # a new signature (another length) is checked once; going back and forth stays unchecked
    model = make_model(cp_size=world)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for T in (40, 48, 40, 48, 40):
        with _CheckSpy() as spy:
            _step(model, opt, batch(0, T=T))
        seen.append(spy.calls.count("GatedDeltaNetCPForCausalLM") + spy.calls.count("GatedDeltaNetCPModel"))
    res["lengths"] = seen
    # evaluation (no graph) between training steps (whose signature is agreed already): checked the first time only
    seen = []
    for _ in range(2):
        with _CheckSpy() as spy:
            _step(model, opt, batch(1))
            with torch.no_grad():
                model(**batch(2))
        seen.append(len([w for w in spy.calls if w.startswith("GatedDeltaNetCP")]))
    res["train/eval"] = seen
    # a new wrapper around the same model every step: sync_gradients' signature does not depend on the
    # wrapper object (an id could be reused on one rank only and make the ranks decide differently)
    seen = []
    for step in range(3):
        wrapper = torch.nn.ModuleDict({"lm": model})
        with _CheckSpy() as spy:
            opt.zero_grad()
            model(**batch(1)).loss.backward()
            sync_gradients(wrapper)
        seen.append(spy.calls.count("sync_gradients"))
    res["wrappers"] = seen
    # generation: the prompt check, the prefill's and the first decode step's; the later steps share
    # the first one's signature (the cache length is content)
    model.eval()
    with torch.no_grad(), _CheckSpy() as spy:
        tokens = model.generate(batch(5)["input_ids"][:, :20], max_new_tokens=6, do_sample=False)
    res["generate"] = (list(spy.calls), tuple(tokens.shape))
    return res


def test_steady_state_makes_no_checks():
    results = run_ranks(_worker_policy, 2, timeout=240)
    for rank, res in enumerate(results):
        for tag in ("contiguous", "zigzag", "contiguous packed"):
            steps = res[tag]
            first_calls, first_collectives, first_syncs = steps[0]
            # the first step: the forward's check and sync_gradients' (the split's and layers' are folded in),
            # with the content checks' host syncs (token ids, labels)
            assert first_calls == ["GatedDeltaNetCPModel", "sync_gradients"], (rank, tag, first_calls)
            assert any("check_agreement" in k for k in first_collectives), (rank, tag, first_collectives)
            assert {"token_ids_check", "loss_fields"} <= set(first_syncs), (rank, tag, first_syncs)
            for i, (calls, collectives, syncs) in enumerate(steps[1:], 1):
                assert calls == [], (rank, tag, i, calls)
                # the step's collectives are the first step's, less the checks': the computation's own
                want = {k: v for k, v in first_collectives.items() if "check_agreement" not in k}
                assert collectives == want, (rank, tag, i, collectives, want)
                # no host sync for checking: the torch backend (CPU) reads its segment lengths, and a packed
                # split reads its boundaries (a device cu_seqlens; a list or CPU tensor avoids it)
                allowed = {"TorchBackend.prepare"} | ({"_host_boundaries"} if "packed" in tag else set())
                assert set(syncs) <= allowed and syncs.get("_host_boundaries", 1) == 1, (rank, tag, i, syncs)
        assert res["lengths"] == [1, 1, 0, 0, 0], (rank, res["lengths"])
        assert res["train/eval"] == [1, 0], (rank, res["train/eval"])
        assert res["wrappers"] == [0, 0, 0], (rank, res["wrappers"])      # agreed on by the steps above
        calls, shape = res["generate"]
        assert shape == (2, 26) and calls == ["GatedDeltaNetCPForCausalLM.generate", "GatedDeltaNetCPModel",
                                              "GatedDeltaNetCPModel"], (rank, calls)


def _worker_debug(rank, world):
    model = make_model(cp_size=world)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    res = {}
    _step(model, opt, batch(0))
    with checks.debug_checks():
        with _CheckSpy() as spy:
            _step(model, opt, batch(1))
        res["debug calls"] = list(spy.calls)
        # ranks fed different "same" data in steady state: caught under the debug switch only
        other = batch(2)
        if rank == 1:
            other["input_ids"] = other["input_ids"].clone()
            other["input_ids"][0, 3] = (other["input_ids"][0, 3] + 1) % VOCAB
        try:
            _step(model, opt, other)
            res["mismatch"] = None
        except ValueError as e:
            res["mismatch"] = str(e)
    # after the switch: steady again
    with _CheckSpy() as spy:
        _step(model, opt, batch(3))
    res["after"] = list(spy.calls)
    # a new signature (batch size) with an out-of-range id on one rank: checked, raised everywhere
    bad = batch(4, B=3)
    if rank == 1:
        bad["input_ids"] = bad["input_ids"].clone()
        bad["input_ids"][2, 30] = VOCAB
    try:
        _step(model, opt, bad)
        res["bad id"] = None
    except ValueError as e:
        res["bad id"] = str(e)
    return res


def test_debug_switch_checks_every_call():
    for rank, res in enumerate(run_ranks(_worker_debug, 2, timeout=180)):
        assert res["debug calls"] == ["GatedDeltaNetCPModel", "sync_gradients"], (rank, res["debug calls"])
        assert res["mismatch"] and "content) differs" in res["mismatch"], (rank, res["mismatch"])
        assert res["after"] == [], (rank, res["after"])
        assert res["bad id"] and "rank 1: input_ids holds ids in [" in res["bad id"], (rank, res["bad id"])


def test_debug_switch_from_environment(monkeypatch):
    import os
    import subprocess
    import sys
    code = "import fla_cp.checks as c; print(c.debug_checks_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLA_CP_DEBUG": "1"},
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out == "True", out
    monkeypatch.setattr(checks, "_DEBUG", False)      # whatever this process's environment says
    with checks.debug_checks():
        assert checks.debug_checks_enabled()
    assert not checks.debug_checks_enabled()
    checks.set_debug_checks(True)
    assert checks.debug_checks_enabled()
    checks.set_debug_checks(False)


@pytest.mark.parametrize("keep", [1, 3])
def test_agreed_signatures_keep_the_last_ones(keep):
    agreed = checks.AgreedSignatures(keep=keep)
    group = object()
    assert agreed.needs_check("forward", group, ("a",))
    for s in ("a", "b", "c"):
        agreed.agreed("forward", group, (s,))
    assert not agreed.needs_check("forward", group, ("c",))
    assert agreed.needs_check("forward", group, ("a",)) == (keep < 3)
    assert agreed.needs_check("sync_gradients", group, ("c",))      # per check name
    assert agreed.needs_check("forward", object(), ("c",))          # per group


def _worker_bad_values_in_steady_state(rank, world):
    """Out-of-range labels or ids on one rank's shard, in steady state (no check): no rank raises alone
    (the others would wait in the next collective); the global loss is NaN on every rank, and the next
    good step is fine again."""
    model = make_model(cp_size=world)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _step(model, opt, batch(0))
    res = {}
    bad_label = batch(1)
    bad_id = batch(2)
    if rank == 1:        # position 35 of 40: rank 1's shard
        bad_label["labels"] = bad_label["labels"].clone()
        bad_label["labels"][1, 35] = VOCAB + 5
        bad_id["input_ids"] = bad_id["input_ids"].clone()
        bad_id["input_ids"][1, 35] = VOCAB
    with _CheckSpy() as spy:
        res["label"] = model(**bad_label).loss.item()
        res["id"] = model(**bad_id).loss.item()
        res["good"] = model(**batch(3)).loss.item()
    res["checks"] = list(spy.calls)
    return res


def test_bad_values_in_steady_state_poison_the_loss_everywhere():
    import math
    results = run_ranks(_worker_bad_values_in_steady_state, 2, timeout=120)
    for rank, res in enumerate(results):
        assert res["checks"] == [], (rank, res["checks"])
        assert math.isnan(res["label"]) and math.isnan(res["id"]), (rank, res)
        assert math.isfinite(res["good"]), (rank, res)
    assert results[0]["good"] == results[1]["good"]


def _worker_qwen_policy(rank, world):
    """transformers' Qwen3.5 under CP: the same policy (one check per signature, none per layer)."""
    from fla_cp.utils.configs import build_config, causal_lm_class
    config = build_config("qwen3_5-tiny", VOCAB, cp_size=world)
    torch.manual_seed(0)
    model = causal_lm_class(config)(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    per_step = []
    for step in range(3):
        inputs = batch(step)
        with _CheckSpy() as spy, count_costs(device_data=(model, *inputs.values())) as c:
            _step(model, opt, inputs)
        per_step.append((list(spy.calls), dict(c.by_caller("collectives"))))
    return per_step


def test_qwen_steady_state_makes_no_checks():
    """Qwen3.5's CP layers are checked once, by the model's forward: no check of their own (a collective
    per layer per step), and nothing in steady state."""
    if fla_cp.models.QWEN_FAMILIES_MISSING:
        pytest.skip(fla_cp.models.QWEN_FAMILIES_MISSING)
    for rank, steps in enumerate(run_ranks(_worker_qwen_policy, 2, timeout=240)):
        first_calls, first_collectives = steps[0]
        assert first_calls == ["Qwen3_5CPTextModel", "sync_gradients"], (rank, first_calls)
        want = {k: v for k, v in first_collectives.items() if "check_agreement" not in k}
        for i, (calls, collectives) in enumerate(steps[1:], 1):
            assert calls == [] and collectives == want, (rank, i, calls, collectives, want)
