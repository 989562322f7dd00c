"""GatedDeltaNetCPForCausalLM: CP (2 and 4 ranks, dp x cp) == one process; FLA checkpoints; generation;
gradient checkpointing; sampling.

The multi-rank checks of one world size share one spawn (process start-up dominates on CPU).
"""
from __future__ import annotations

import tempfile

import pytest
import torch

import fla_cp  # noqa: F401  (registers the Auto classes)
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, init_cp_mesh, shift_labels_globally
from tests.cp._dist import run_ranks

TOL = 1e-5
VOCAB = 96
SAMPLE_SEED = 100
SMALL = dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
             vocab_size=VOCAB, hidden_ratio=2, norm_eps=1e-6)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_model(seed=0, **cfg) -> GatedDeltaNetCPForCausalLM:
    torch.manual_seed(seed)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**{**SMALL, **cfg}))
    with torch.no_grad():
        for layer in model.model.layers:          # slow-decay heads expose state leaks
            layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    dense = torch.randint(0, VOCAB, (2, 23), generator=g)
    packed = torch.randint(0, VOCAB, (1, 30), generator=g)
    cu = torch.tensor([0, 2, 9, 10, 21, 30])            # includes docs shorter than W-1 = 3
    padded = torch.randint(0, VOCAB, (2, 19), generator=g)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :5] = 0                                     # left padding
    padded_labels = padded.masked_fill(mask == 0, -100)
    return dict(dense=dense, packed=packed, cu=cu, padded=padded, mask=mask, padded_labels=padded_labels)


def run_case(model, name, b, **kw):
    """loss, full logits and (single-process or synced) grads of one batch; model may be CP."""
    model.zero_grad()
    if name == "dense":
        out = model(input_ids=b["dense"], labels=b["dense"], gather_logits=True, **kw)
    elif name == "packed":
        out = model(input_ids=b["packed"], labels=b["packed"], cu_seqlens=b["cu"], gather_logits=True, **kw)
    else:
        out = model(input_ids=b["padded"], labels=b["padded_labels"], attention_mask=b["mask"],
                    gather_logits=True, **kw)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compare(got, ref, tag):
    loss, logits, grads = got
    rloss, rlogits, rgrads = ref
    assert rel_err(loss, rloss) <= TOL, f"{tag}: loss {loss} vs {rloss}"
    assert rel_err(logits, rlogits) <= TOL, f"{tag}: logits {rel_err(logits, rlogits):.2e}"
    for n, rg in rgrads.items():
        assert rel_err(grads[n], rg) <= TOL, f"{tag}: grad of {n} {rel_err(grads[n], rg):.2e}"


def expect_error(fn, match):
    try:
        fn()
    except (ValueError, NotImplementedError) as e:
        assert match in str(e), f"wrong message: {e}"
        return str(e)
    raise AssertionError(f"no error raised (expected {match!r})")


def pretend_fla_loss_kernels(setattr_=setattr) -> list[str]:
    """Route the model's CUDA-only FLA loss kernels to torch stand-ins with the same interface and
    reduction (FLA's own kernels are tested by FLA; this checks what the model does around them).
    Returns the list the stand-ins append their names to when called."""
    import fla_cp.parallel.loss as modeling       # where the model's loss calls FLA's kernels
    calls = []

    class LinearCE(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, x, target, weight, bias=None):
            calls.append("linear")
            logits = torch.nn.functional.linear(x, weight, bias).flatten(0, -2).float()
            return torch.nn.functional.cross_entropy(logits, target.flatten(), ignore_index=self.ignore_index,
                                                     reduction=self.reduction)

    class CE(LinearCE):
        def __init__(self, ignore_index=-100, reduction="mean", inplace_backward=False):
            super().__init__(ignore_index, reduction)

        def forward(self, logits, target):
            calls.append("fused")
            return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                                                     reduction=self.reduction)

    setattr_(modeling, "fla_loss_kernels_run_on", lambda device: True)
    setattr_(modeling, "FusedLinearCrossEntropyLoss", LinearCE)
    setattr_(modeling, "FusedCrossEntropyLoss", CE)
    return calls


# ------------------------------------------------------------------------------------ multi-rank
def _worker_cp2(rank, world, state):
    from fla_cp.models import sync_gradients
    b = batches()
    res = {}
    for layout in ("contiguous", "zigzag"):
        model = make_model(cp_size=2, cp_layout=layout)
        model.load_state_dict(state)
        assert model.cp_size == 2 and model.dp_group is None
        for name in ("dense", "packed", "padded"):
            loss, logits, _ = run_case(model, name, b)
            sync_gradients(model)
            res[(layout, name)] = (loss, logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    # already-sharded inputs (and pre-shifted labels), packed: same loss and synced grads
    model.zero_grad()
    ctx = model.build_cp_context(cu_seqlens=b["cu"])
    out = model(input_ids=ctx.shard(b["packed"], 1), cu_seqlens=b["cu"], inputs_are_sharded=True,
                labels=ctx.shard(shift_labels_globally(b["packed"], b["cu"]), 1))
    out.loss.backward()
    sync_gradients(model)
    res["sharded"] = (out.loss.detach(), ctx.unshard(out.logits.detach(), 1),
                      {n: p.grad.clone() for n, p in model.named_parameters()})
    # gradient checkpointing recomputes each block (and its collectives) in backward: same results
    model = make_model(cp_size=2)
    model.load_state_dict(state)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
    for name in ("dense", "packed"):
        loss, logits, _ = run_case(model, name, b)
        sync_gradients(model)
        res[("checkpointed", name)] = (loss, logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    res["checkpointed forwards"] = len(calls)
    # the config's FLA loss kernels (CUDA; stand-ins here): the fused linear loss forms no local logits
    loss_calls = pretend_fla_loss_kernels()
    for fuse_linear in (False, True):
        model = make_model(cp_size=2, fuse_cross_entropy=not fuse_linear, fuse_linear_cross_entropy=fuse_linear)
        model.load_state_dict(state)
        loss, logits, _ = run_case(model, "packed", b)
        sync_gradients(model)
        res[("fla loss", fuse_linear)] = (loss, logits, {n: p.grad.clone() for n, p in model.named_parameters()})
        res[("fla loss logits", fuse_linear)] = model(input_ids=b["packed"], labels=b["packed"],
                                                      cu_seqlens=b["cu"]).logits
    res["fla loss calls"] = loss_calls
    # greedy generation with CP prefill; sampling draws from rank 0's random stream on every rank
    model.eval()
    with torch.no_grad():
        res["generate"] = model.generate(b["dense"][:, :11], max_new_tokens=7, do_sample=False,
                                         attention_mask=torch.ones(2, 11, dtype=torch.long))
        torch.manual_seed(SAMPLE_SEED + rank)
        res["sample"] = model.generate(b["dense"][:, :11], max_new_tokens=7, do_sample=True, top_k=0,
                                       attention_mask=torch.ones(2, 11, dtype=torch.long))
        res["rng after sampling"] = torch.get_rng_state()
    # errors, each raised on every rank without a hang
    # (full inputs shorter than the CP split run replicated: tests/cp/models/test_model_continuation.py)
    res["short"] = expect_error(lambda: model(input_ids=b["dense"][:1, :1], cu_seqlens=[0, 1], inputs_are_sharded=True),
                                "shorter")
    res["divide"] = expect_error(lambda: init_cp_mesh(3), "does not divide")
    return res


def _dp2xcp2(state, b):
    """dp=2 x cp=2 model: dp replica d takes row d of the global dense batch; CP ranks of a replica see it whole."""
    mesh = init_cp_mesh(2)
    model = GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig(**SMALL), device_mesh=mesh)
    model.load_state_dict(state)
    assert model.cp_size == 2 and model.dp_group is not None
    d = mesh.get_local_rank("dp")
    return model, mesh, b["dense"][d:d + 1]


def _worker_fsdp2(rank, world, state):
    """The documented FSDP2 recipes over dp x cp; returns the gathered (full) gradients of each."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    res = {}
    for recipe in ("scale", "divide"):
        model, mesh, row = _dp2xcp2(state, batches())
        fully_shard(model, mesh=mesh._flatten("dp_cp"))            # 1-D over the whole dp x cp world
        if recipe == "scale":
            scale = model.cp_size
        else:                                   # gloo has no PREMUL_SUM: force SUM + a post-division
            model.set_gradient_divide_factor(mesh["dp"].size())
            model.set_force_sum_reduction_for_comms(True)
            scale = 1
        (model(input_ids=row, labels=row).loss * scale).backward()
        grads = {}
        for n, p in model.named_parameters():
            assert isinstance(p.grad, DTensor), f"{n}: FSDP2 grads should be sharded DTensors"
            grads[n] = p.grad.full_tensor().clone()
        res[recipe] = grads
    return res


def _worker_world4(rank, world, state):
    from fla_cp.models import sync_gradients
    b = batches()
    res = {}
    model = make_model(cp_size=4)
    model.load_state_dict(state)
    for name in ("dense", "packed"):
        loss, logits, _ = run_case(model, name, b)
        sync_gradients(model)
        res[name] = (loss, logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    model, _, row = _dp2xcp2(state, b)
    model(input_ids=row, labels=row).loss.backward()
    sync_gradients(model)
    res["dpxcp"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the documented DDP recipe: DDP over the whole dp x cp world, loss scaled by cp_size
    from torch.nn.parallel import DistributedDataParallel as DDP
    model.zero_grad()
    ddp = DDP(model)
    (ddp(input_ids=row, labels=row).loss * model.cp_size).backward()
    res["ddp"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    res["divide"] = expect_error(lambda: init_cp_mesh(3), "does not divide")
    return res


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    b = batches()
    refs = {name: run_case(model, name, b) for name in ("dense", "packed", "padded")}
    model.eval()
    with torch.no_grad():
        gen = model.generate(b["dense"][:, :11], max_new_tokens=7, do_sample=False,
                             attention_mask=torch.ones(2, 11, dtype=torch.long))
        torch.manual_seed(SAMPLE_SEED)
        refs["sample"] = model.generate(b["dense"][:, :11], max_new_tokens=7, do_sample=True, top_k=0,
                                        attention_mask=torch.ones(2, 11, dtype=torch.long))
    return model, refs, gen


def test_model_cp2_matches_cp1(reference):
    model, refs, gen = reference
    results = run_ranks(_worker_cp2, 2, args=(model.state_dict(),))
    for rank, res in enumerate(results):
        for layout in ("contiguous", "zigzag"):
            for name in ("dense", "packed", "padded"):
                compare(res[(layout, name)], refs[name], f"cp=2 rank {rank} {layout} {name}")
        compare(res["sharded"], refs["packed"], f"cp=2 rank {rank} inputs_are_sharded")
        assert torch.equal(res["generate"], gen), f"rank {rank}: {res['generate']} vs {gen}"
        for name in ("dense", "packed"):
            compare(res[("checkpointed", name)], refs[name], f"cp=2 rank {rank} gradient checkpointing {name}")
        for fuse_linear in (False, True):
            compare(res[("fla loss", fuse_linear)], refs["packed"], f"cp=2 rank {rank} FLA loss, linear={fuse_linear}")
        assert res[("fla loss logits", False)].shape[1] == 15 and res[("fla loss logits", True)] is None
        assert res["fla loss calls"] == ["fused"] * 2 + ["linear"] * 2, res["fla loss calls"]
        # 2 batches x (forward + recompute in backward) x 1 first layer
        assert res["checkpointed forwards"] == 4, res["checkpointed forwards"]
        # seeded differently, every rank sampled what one process seeded like rank 0 samples
        assert torch.equal(res["sample"], refs["sample"]), f"rank {rank}: {res['sample']} vs {refs['sample']}"
        assert torch.equal(res["rng after sampling"], results[0]["rng after sampling"])
    assert gen.shape[1] == 18 and not torch.equal(refs["sample"][:, 11:], gen[:, 11:])


def test_model_cp4_and_dp2xcp2(reference):
    model, refs, _ = reference
    results = run_ranks(_worker_world4, 4, args=(model.state_dict(),))
    # the global batch of the dp x cp run is the dense batch: its rows have equal token counts, so
    # the mean over replicas of per-replica means is the global token mean
    for rank, res in enumerate(results):
        for name in ("dense", "packed"):
            compare(res[name], refs[name], f"cp=4 rank {rank} {name}")
        for n, rg in refs["dense"][2].items():
            assert rel_err(res["dpxcp"][n], rg) <= TOL, f"dp2xcp2 rank {rank}: grad of {n}"
            assert rel_err(res["ddp"][n], rg) <= TOL, f"DDP over dp x cp, rank {rank}: grad of {n}"


def test_fsdp2_over_dp2xcp2(reference):
    """The docstring's FSDP2 recipe (fully_shard over the flattened dp x cp mesh) on 4 gloo ranks."""
    model, refs, _ = reference
    results = run_ranks(_worker_fsdp2, 4, args=(model.state_dict(),))
    for rank, res in enumerate(results):
        for recipe in ("scale", "divide"):
            for n, rg in refs["dense"][2].items():
                err = rel_err(res[recipe][n], rg)
                assert err <= TOL, f"FSDP2 ({recipe}) over dp x cp, rank {rank}: grad of {n} {err:.2e}"


# -------------------------------------------------------------------------------- single process
def test_fla_checkpoint_loads_unchanged():
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    fla_model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**SMALL))
    with tempfile.TemporaryDirectory() as d:
        fla_model.save_pretrained(d)
        ours, info = GatedDeltaNetCPForCausalLM.from_pretrained(d, cp_size=1, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = fla_model.state_dict()
    got = ours.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert ours.config.model_type == "gated_deltanet_cp" and ours.cp_size == 1

    with tempfile.TemporaryDirectory() as d:       # save_pretrained round trip through the Auto class
        ours.save_pretrained(d)
        again = AutoModelForCausalLM.from_pretrained(d, cp_size=1)
    assert type(again) is GatedDeltaNetCPForCausalLM
    assert all(torch.equal(again.state_dict()[k], v) for k, v in got.items())


def test_loss_is_hf_shifted_mean_and_respects_documents():
    model = make_model()
    b = batches()
    ids, cu = b["packed"], b["cu"]
    out = model(input_ids=ids, labels=ids, cu_seqlens=cu)
    targets = shift_labels_globally(ids, cu)
    assert (targets[0, cu[1:] - 1] == -100).all()              # a document never predicts the next one
    ref = torch.nn.functional.cross_entropy(out.logits[0], targets[0], ignore_index=-100)
    assert rel_err(out.loss, ref) <= TOL
    # packed documents are independent: the logits of document 2 equal running it alone
    alone = model(input_ids=ids[:, 2:9]).logits
    assert rel_err(out.logits[:, 2:9], alone) <= TOL


def test_errors_single_process():
    expect_error(lambda: init_cp_mesh(2), "torch.distributed")
    expect_error(lambda: make_model(cp_size=2), "torch.distributed")
    expect_error(lambda: GatedDeltaNetCPConfig(cp_layout="ring"), "cp_layout")


def test_config_picks_the_kernels(monkeypatch):
    """backend goes from the config (and from_pretrained's kwargs, over the saved one) to every layer:
    the operator is called with the configured backend, and backend="triton" reaches the conv."""
    import fla_cp.layers.gated_delta_cp as layer_module     # the CP forward every GDN layer runs
    seen, real = [], layer_module.chunk_cp_gated_delta_rule

    def spy(*args, backend="auto", **kwargs):
        seen.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(layer_module, "chunk_cp_gated_delta_rule", spy)
    ids = torch.randint(0, VOCAB, (1, 12))
    model = make_model(backend="torch")
    with torch.no_grad():
        model(ids)
    assert seen == ["torch"] * SMALL["num_hidden_layers"]
    with pytest.raises(ValueError, match="backend must be one of"):
        GatedDeltaNetCPConfig(**SMALL, backend="cuda")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        kept = GatedDeltaNetCPForCausalLM.from_pretrained(d)
        loaded = GatedDeltaNetCPForCausalLM.from_pretrained(d, backend="triton")
    assert kept.config.backend == "torch" and kept.model.layers[0].attn.backend == "torch"
    assert loaded.config.backend == "triton" and loaded.model.layers[0].attn.backend == "triton"
    if not torch.cuda.is_available():   # FLA was imported compiled here: its conv cannot run on CPU
        with pytest.raises(RuntimeError, match=r"GatedDeltaNetCP\(backend='triton'\) off CUDA"):
            loaded(ids)


def test_packed_list_cu_seqlens_and_one_projection():
    """cu_seqlens as a list works without CP too (as under CP), and a forward with labels projects
    to the vocabulary once: the loss's logits are the returned ones."""
    model = make_model()
    b = batches()
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    ref = model(input_ids=b["packed"], labels=b["packed"], cu_seqlens=b["cu"])
    got = model(input_ids=b["packed"], labels=b["packed"], cu_seqlens=b["cu"].tolist())
    assert calls == [1, 1]
    assert torch.equal(got.loss, ref.loss) and torch.equal(got.logits, ref.logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FLA's loss kernels need CUDA")
def test_fla_loss_kernels_on_cuda():
    """With FLA's real fused loss kernels (CUDA): the same loss and gradients as torch's cross-entropy."""
    b = batches()
    ids, cu = b["packed"].cuda(), b["cu"].cuda()
    results = {}
    for name, cfg in {"torch": dict(fuse_cross_entropy=False), "fused": dict(fuse_cross_entropy=True),
                      "linear": dict(fuse_cross_entropy=False, fuse_linear_cross_entropy=True)}.items():
        model = make_model(**cfg).cuda()
        out = model(input_ids=ids, labels=ids, cu_seqlens=cu)
        out.loss.backward()
        results[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        assert (out.logits is None) == (name == "linear")
    ref_loss, ref_grads = results["torch"]
    for name in ("fused", "linear"):
        loss, grads = results[name]
        assert rel_err(loss, ref_loss) <= 1e-4, f"{name}: loss {loss} vs {ref_loss}"
        for n, g in ref_grads.items():
            assert rel_err(grads[n], g) <= 1e-4, f"{name}: grad of {n} {rel_err(grads[n], g):.2e}"
