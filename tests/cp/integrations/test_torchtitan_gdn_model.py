"""fla_cp's GatedDeltaNet family as a torchtitan model (`fla_cp.integrations.torchtitan.gated_deltanet`)
against fla_cp's HF model (`GatedDeltaNetCPForCausalLM`, which computes FLA's `GatedDeltaNetForCausalLM`).

Configs: the presets `tiny` (pure GDN) and `hybrid-tiny` (GDN + one GQA attention layer), and `variant`,
which turns on every FLA option the torchtitan model implements (GVA, expand_v 2, conv width 3,
allow_neg_eigval, sigmoid output gate, FLA's fused-norm setting, explicit MLP width, tied embeddings with a
padding row, attention with qkv bias, another rope_theta, MQA and a sliding window).

- logits: the HF model's weights (random, O(1) activations, non-trivial norms and decays) go through the
  adapter's `from_hf` into the torchtitan model built on meta; logits agree on a dense batch (flattened
  to one packed row, as `CPTrainer` hands it) and on packed documents; on the packed row every gradient too;
  in bf16 (parameters bf16, as FSDP's mixed precision runs) the logits are the same bit for bit;
- the adapter: `to_hf(from_hf(sd))` gives back every tensor, and `to_hf` of the model's own state dict
  has exactly an FLA checkpoint's keys;
- `init_weights()` after `to_empty` sets every parameter (FLA's initialisation);
- the FLA options not implemented raise ValueError naming the config field;
- (slow) CP = 2 with both layouts: logits and gradients equal one process's.
"""
from __future__ import annotations

import itertools
import json
import math

import pytest

pytest.importorskip("torchtitan", reason="the torchtitan integration needs torchtitan 0.3.0 (fla_cp[torchtitan])")

import torch  # noqa: E402

from fla_cp.integrations.torchtitan.batch import build_cp_batch, shard_rows  # noqa: E402
from fla_cp.integrations.torchtitan.gated_deltanet import gdn_model_spec, gdn_text_config  # noqa: E402
from fla_cp.integrations.torchtitan.state_dict import GatedDeltaNetStateDictAdapter  # noqa: E402
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM  # noqa: E402
from fla_cp.utils.configs import CPU_SAFE, build_config  # noqa: E402
from _dist import run_ranks  # noqa: E402

VOCAB = 258
# max |diff| / max |ref|, fp32 on CPU, measured over seeds 0-19: logits <= 1.3e-6 (the packed rows match
# bit for bit). Gradients <= 1.3e-5: the two models sum the same terms in another order, and the A_log /
# dt_bias gradients cancel heavily (fp32 HF itself is up to 2.3e-4 from its float64 run there)
TOL = 1e-5
GRAD_TOL = 1e-4
VARIANT = dict(
    hidden_size=64, num_hidden_layers=4, num_heads=2, num_v_heads=4, head_dim=16, expand_v=2.0, conv_size=3,
    allow_neg_eigval=True, output_gate_activation="sigmoid", intermediate_size=96, norm_eps=1e-5,
    tie_word_embeddings=True, pad_token_id=0, vocab_size=VOCAB,
    attn=[{"layers": [1], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": True, "rope_theta": 5e5},
          {"layers": [3], "num_heads": 4, "num_kv_heads": 1, "window_size": 5}],
    **{**CPU_SAFE, "fuse_norm": True})       # FLA's RMSNorm in the HF model (its CPU path), nn.RMSNorm here
CONFIGS = ("tiny", "hybrid-tiny", "variant")
CU = [0, 3, 20, 21, 45, 70]                  # packed documents, some shorter than the window


def fla_config(name: str) -> GatedDeltaNetCPConfig:
    return GatedDeltaNetCPConfig(**VARIANT) if name == "variant" else build_config(name, VOCAB)


def fla_model(name: str, seed: int = 0) -> GatedDeltaNetCPForCausalLM:
    """The HF model with random weights whose every part shows in the logits: matrices N(0, 1/fan_in)
    (O(1) activations), convs N(0, 0.5), norm weights U(0.5, 1.5), decays from slow to fast."""
    torch.manual_seed(seed)
    model = GatedDeltaNetCPForCausalLM(fla_config(name)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "conv1d" in key:
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif key.endswith("A_log"):
                p.uniform_(-4, 1)
            elif key.endswith("dt_bias"):
                p.normal_()
            elif key.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    return model


def titan_model(config, state: dict | None = None):
    """(the torchtitan model built on meta, materialised and initialised on CPU, its adapter); with `state`
    (an FLA state dict), loaded from it through the adapter."""
    tt_config = gdn_text_config(config)
    with torch.device("meta"):
        model = tt_config.build()
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=None)
    adapter = GatedDeltaNetStateDictAdapter(tt_config, None)
    if state is not None:
        model.load_state_dict(adapter.from_hf(state))
    return model.eval(), adapter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def doc_positions(cu) -> torch.Tensor:
    return torch.cat([torch.arange(e - s) for s, e in itertools.pairwise(cu)])[None]


def titan_logits(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """What `CPTrainer` runs for one process: the `[B, L]` batch as one packed row, documents from `positions`."""
    batch = build_cp_batch(positions, None, "zigzag", verify_agreement=False)
    return model(shard_rows(ids, batch), positions=shard_rows(positions, batch), attention_masks=batch.masks())


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_match_fla_model(name):
    hf = fla_model(name)
    tt, adapter = titan_model(hf.config, hf.state_dict())
    g = torch.Generator().manual_seed(1)

    dense = torch.randint(0, VOCAB, (2, 37), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=dense).logits
        out = titan_logits(tt, dense, torch.arange(37).expand(2, 37))
    assert rel(out.view_as(ref), ref) <= TOL, f"{name} dense: {rel(out.view_as(ref), ref):.2e}"

    packed = torch.randint(0, VOCAB, (1, CU[-1]), generator=g)
    packed[0, 5] = 0                            # the variant's padding row: no gradient in either model
    weights = torch.randn(1, CU[-1], VOCAB, generator=g)
    ref = hf(input_ids=packed, cu_seqlens=torch.tensor(CU)).logits
    out = titan_logits(tt, packed, doc_positions(CU))
    assert rel(out, ref) <= TOL, f"{name} packed: {rel(out, ref):.2e}"
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    want = adapter.from_hf({k: p.grad for k, p in hf.named_parameters(remove_duplicate=False)})
    for key, p in tt.named_parameters(remove_duplicate=False):
        assert rel(p.grad, want[key]) <= GRAD_TOL, f"{name} grad {key}: {rel(p.grad, want[key]):.2e}"


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_logits_equal_fla_model(name):
    """In bf16, as FSDP's mixed precision runs it (parameters bf16, the RoPE table fp32), the same ops in the
    same order: the same logits bit for bit (FLA rounds cos/sin to q's dtype: `FLARoPE`)."""
    hf = fla_model(name)
    tt, _ = titan_model(hf.config, hf.state_dict())
    hf.to(torch.bfloat16)
    for p in tt.parameters():
        p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, CU[-1]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, cu_seqlens=torch.tensor(CU)).logits
        out = titan_logits(tt, ids, doc_positions(CU))
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref), f"{name}: {rel(out, ref):.2e}"


@pytest.mark.parametrize("name", CONFIGS)
def test_adapter_round_trip(name):
    hf = fla_model(name)
    tt, adapter = titan_model(hf.config)
    # a checkpoint's keys: with tied embeddings HF's save_pretrained writes the embedding alone
    tied = hf.config.tie_word_embeddings
    checkpoint = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    back = adapter.to_hf(adapter.from_hf(checkpoint))
    assert back.keys() == checkpoint.keys()
    assert all(back[k] is checkpoint[k] for k in checkpoint)
    # the template torchtitan reads an FLA checkpoint with (dcp's HF load): exactly its keys and shapes
    template = adapter.to_hf(tt.state_dict())
    assert {k: tuple(v.shape) for k, v in template.items()} == {k: tuple(v.shape) for k, v in checkpoint.items()}
    with pytest.raises(ValueError, match="model.layers.0.attn.q_norm.weight"):
        adapter.from_hf({**checkpoint, "model.layers.0.attn.q_norm.weight": torch.ones(4)})


@pytest.mark.parametrize("name", CONFIGS)
def test_init_weights_sets_every_parameter(name):
    config = fla_config(name)
    tt_config = gdn_text_config(config)
    with torch.device("meta"):
        model = tt_config.build()
    model.verify_module_protocol()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights(buffer_device=None)
    for key, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{key} not initialised"
        if key.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), key
        elif key.endswith("A_log"):                      # FLA's: log U(0, 16)
            assert (p <= math.log(16)).all(), key
        elif key.endswith("dt_bias"):                    # FLA's: softplus(dt_bias) in [1e-4, 0.1]
            dt = torch.nn.functional.softplus(p)
            assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all(), key
        elif key.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), key
        else:                                           # FLA's: N(0, initializer_range)
            assert abs(p.std().item() - config.initializer_range) < 0.5 * config.initializer_range, key
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.tok_embeddings.weight
    # the same parameters as FLA's model (the adapter maps every one)
    nparams, flops = tt_config.get_nparams_and_flops(model, 256)
    assert nparams == sum(p.numel() for p in GatedDeltaNetCPForCausalLM(config).parameters())
    assert flops > 6 * (nparams - (0 if config.tie_word_embeddings else model.tok_embeddings.weight.numel()))


@pytest.mark.parametrize("field, value", [
    ("use_short_conv", False), ("use_gate", False), ("hidden_act", "powlu"), ("attnres_block_size", 2),
    ("use_l2warp", True), ("num_v_heads", 3)])
def test_unsupported_options_are_refused(field, value):
    config = build_config("tiny", VOCAB)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"config.{field}="):
        gdn_text_config(config)


def test_config_sources_and_spec():
    with pytest.raises(ValueError, match="Qwen"):
        gdn_text_config("qwen3_5-tiny")
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_size"):
        gdn_text_config(GatedDeltaNetCPConfig(**{**VARIANT, "attn": {"layers": [1], "num_heads": 3}}))
    assert gdn_text_config("tiny", vocab_size=1000).vocab_size == 1000
    # FLA's own config class (a copy is converted: the caller's keeps its vocabulary)
    from fla.models import GatedDeltaNetConfig
    fla = GatedDeltaNetConfig(**VARIANT)
    config = gdn_text_config(fla, vocab_size=512)
    assert (config.vocab_size, fla.vocab_size, config.enable_weight_tying, config.padding_idx) == (512, VOCAB, True, 0)
    assert [layer.attention is not None for layer in config.layers] == [False, True, False, True]
    spec = gdn_model_spec("hybrid-tiny")
    from fla_cp.integrations.torchtitan.parallelize import parallelize_cp
    assert (spec.name, spec.flavor, spec.model.vocab_size) == ("fla_cp_gated_deltanet", "hybrid-tiny", VOCAB)
    assert spec.parallelize_fn is parallelize_cp and spec.state_dict_adapter is GatedDeltaNetStateDictAdapter
    # a forward without fla_cp's batch (CPTrainer builds it) or, with attention layers, without positions
    tt, _ = titan_model(build_config("hybrid-tiny", VOCAB))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="CPBatch"):
        tt(ids, positions=torch.arange(8)[None], attention_masks=None)
    batch = build_cp_batch(torch.arange(8)[None], None, "zigzag", verify_agreement=False)
    with pytest.raises(ValueError, match="positions"):
        tt(ids, attention_masks=batch.masks())


@pytest.mark.parametrize("name", ["tiny", "hybrid-tiny"])
def test_update_from_trainer_config(name):
    """torchtitan's Trainer calls it: any training.seq_len (FLA's RoPE has no limit, GDN none at all; beyond
    max_position_embeddings too), the RoPE tables sized to it."""
    from torchtitan.trainer import Trainer
    spec = gdn_model_spec(name)
    trainer = Trainer.Config(model_spec=spec)
    trainer.training.seq_len = 4096                   # > max_position_embeddings (2048)
    spec.model.update_from_config(config=trainer)
    ropes = [layer.attention.rope.max_seq_len for layer in spec.model.layers if layer.attention is not None]
    assert ropes == ([4096] if name == "hybrid-tiny" else [])


# ------------------------------------------------------------------------------------------- CP = 2
def _cp_worker(rank, world, name, state, ids, weights):
    import torch.distributed as dist
    tt, _ = titan_model(fla_config(name), state)
    positions = doc_positions(CU)
    results = {}
    for layout in ("contiguous", "zigzag"):
        tt.zero_grad()
        batch = build_cp_batch(positions, dist.group.WORLD, layout, verify_agreement=True)
        out = tt(shard_rows(ids, batch), positions=shard_rows(positions, batch), attention_masks=batch.masks())
        (out * shard_rows(weights, batch)).sum().backward()
        grads = {}
        for key, p in tt.named_parameters():
            dist.all_reduce(p.grad)                  # what FSDP's reduce-scatter sums over the CP ranks
            grads[key] = p.grad.clone()
        results[layout] = (batch.cp.unshard(out.detach(), dim=1), grads)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hybrid-tiny", "variant"])
def test_cp2_matches_one_process(name):
    hf = fla_model(name)
    state = hf.state_dict()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, CU[-1]), generator=g)
    weights = torch.randn(1, CU[-1], VOCAB, generator=g)
    tt, _ = titan_model(hf.config, state)
    ref = titan_logits(tt, ids, doc_positions(CU))
    (ref * weights).sum().backward()
    for rank, res in enumerate(run_ranks(_cp_worker, 2, args=(name, state, ids, weights))):
        for layout, (out, grads) in res.items():
            assert rel(out, ref) <= TOL, f"rank {rank} {layout}: {rel(out, ref):.2e}"
            for key, p in tt.named_parameters():
                assert rel(grads[key], p.grad) <= GRAD_TOL, f"rank {rank} {layout} grad {key}"


# ------------------------------------------------------------------------- torchtitan's Trainer, end to end
def first_batch_loss(model) -> float:
    """The HF model's mean cross-entropy on the first batch of the `gdn_*` configs' runs (fla_cp's packed
    stdlib stream, seed 0, 2 x 256 tokens), as one packed row."""
    from fla_cp import data as fla_cp_data
    from fla_cp.integrations.torchtitan.batch import document_boundaries
    from fla_cp.integrations.torchtitan.data import ByteTokenizer, PackedTextDataset
    dataset = iter(PackedTextDataset(fla_cp_data.Corpus(None), ByteTokenizer(), seq_len=256, local_batch_size=2,
                                     dp_rank=0, dp_world_size=1, seed=0))
    samples = [next(dataset) for _ in range(2)]
    ids = torch.stack([s["input"] for s, _ in samples])
    labels = torch.cat([label for _, label in samples])
    cu = torch.tensor(document_boundaries(torch.stack([s["positions"] for s, _ in samples])))
    with torch.no_grad():
        logits = model(input_ids=ids.reshape(1, -1), cu_seqlens=cu).logits[0]
    return torch.nn.functional.cross_entropy(logits.double(), labels).item()


def test_torchtitan_trainer_loads_fla_checkpoint(tmp_path):
    """`--hf_config <dir> --checkpoint.initial_load_path <dir> --checkpoint.initial_load_in_hf` under CP = 2:
    the model takes an FLA checkpoint's architecture (here the hybrid, though the config names `gdn_tiny`)
    and weights, and step 1's loss is the HF model's on the same batch."""
    from fla_cp.integrations.torchtitan import check
    hf = fla_model("hybrid-tiny", seed=3)
    hf.save_pretrained(tmp_path / "ckpt")
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / "run.log"
    ok, _ = check.torchtitan_train(2, "gdn_tiny", [
        "--hf_config", str(tmp_path / "ckpt"), "--checkpoint.enable", "--checkpoint.load_only",
        "--checkpoint.initial_load_path", str(tmp_path / "ckpt"), "--checkpoint.initial_load_in_hf",
        "--training.steps", "1", "--metrics_file", str(metrics), "--dump_folder", str(tmp_path / "out"),
        "--parallelism.context_parallel_degree", "2"], log, timeout=300)
    assert ok, check.tail(log)
    assert "Loading from HF safetensors" in log.read_text()
    loss = json.loads(metrics.read_text().splitlines()[0])["loss"]
    want = first_batch_loss(hf)
    assert abs(loss - want) <= TOL * want, f"torchtitan step-1 loss {loss} vs the HF model's {want}"
