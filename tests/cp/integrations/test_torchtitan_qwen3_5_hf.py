"""transformers' Qwen3.5 checkpoints in torchtitan's Qwen3.5 text model (fla_cp.integrations.torchtitan).

- `qwen3_5_config_from_hf` builds the model transformers' config describes: the tiny HF config below is
  exactly `qwen3_5.py::_tiny` (the `qwen3_5_tiny` training config), the released 0.8B / 27B configs are
  torchtitan's own flavors, and a config outside torchtitan's every-4th-layer pattern (other eps, conv
  kernel, rotary fraction) is built too; what torchtitan can't express raises a ValueError naming the field.
- loading as torchtitan's checkpointer does (`to_hf` template, `dcp.load` with the adapter's reader,
  `from_hf`) gives transformers' logits, for a text checkpoint (`Qwen3_5ForCausalLM`), a tied one (no
  `lm_head.weight`) and a tied VLM checkpoint (`Qwen3_5ForConditionalGeneration`: `model.language_model.*`
  and vision weights), also sharded with an index; `from_hf` on the file's tensors gives the same weights.
  TOL 1e-5: the worst logits error over 8 weight seeds x these kinds was 3.4e-7.
- `to_hf` writes what transformers' `Qwen3_5ForCausalLM` loads (no missing or unexpected key, same
  logits); `from_hf(to_hf(.))` is exact, MoE layers included (torchtitan's MoE key handling kept).
- end to end: `torchtitan.train --checkpoint.initial_load_path <hf dir> --checkpoint.initial_load_in_hf`
  (torchrun, gloo; one process, and CP = 2 for the VLM) logs a step-1 loss equal to transformers' loss
  on the same first batch.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("torchtitan")

from fla_cp import data as fla_cp_data  # noqa: E402
from fla_cp.integrations.torchtitan import check  # noqa: E402
from fla_cp.integrations.torchtitan.batch import CPBatch  # noqa: E402
from fla_cp.integrations.torchtitan.data import ByteTokenizer, PackedTextDataset  # noqa: E402
from fla_cp.integrations.torchtitan.hf_config import qwen3_5_config_from_hf  # noqa: E402
from fla_cp.integrations.torchtitan.qwen3_5 import qwen3_5_text_config  # noqa: E402
from fla_cp.integrations.torchtitan.state_dict import Qwen35TextStateDictAdapter, vlm_name  # noqa: E402
from tests.cp.models.test_qwen_models import rel_err  # noqa: E402

TOL = 1e-5
WEIGHT_SEED = 0
# qwen3_5.py::_tiny in transformers' fields: 8 layers (attention every 4th), dim 64, GVA 2:4 GDN heads,
# GQA 4:2 attention, rotary on 8 of 16 dims, byte vocabulary
TINY = dict(vocab_size=258, hidden_size=64, num_hidden_layers=8, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.5,
                                 mrope_section=[2, 1, 1]))
# not torchtitan's builder pattern: attention at layers 0, 3, 5, eps 1e-5, conv kernel 3, rotary on 4 of 16
PATTERN = dict(TINY, num_hidden_layers=6, rms_norm_eps=1e-5, linear_conv_kernel_dim=3, num_key_value_heads=1,
               layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention",
                            "linear_attention", "full_attention"],
               rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25,
                                    mrope_section=[1, 1, 0]))
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
              num_position_embeddings=16, patch_size=4, spatial_merge_size=1, temporal_patch_size=1)
KINDS = ("text", "text-tied", "vlm-tied", "pattern")


def hf_model(kind: str, seed: int = WEIGHT_SEED):
    """transformers' model of `kind` with random, non-trivial weights: random norm weights (transformers
    starts the (1 + w) norms at zero), slow-decay GDN heads (state leaks show), sharper attention."""
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig
    torch.manual_seed(seed)
    text = Qwen3_5TextConfig(**(PATTERN if kind == "pattern" else TINY), tie_word_embeddings=kind == "text-tied")
    text._attn_implementation = "eager"
    if kind == "vlm-tied":
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text.to_dict(), vision_config=VISION,
                                                              tie_word_embeddings=True))
    else:
        model = Qwen3_5ForCausalLM(text)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.linspace(-6.0, 1.0, p.numel()))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{kind: (transformers' model, the directory it was saved to)}."""
    out = {}
    for kind in KINDS:
        model = hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out


def load_like_torchtitan(path, config=None):
    """torchtitan's model for the checkpoint at `path`, loaded as torchtitan's checkpointer loads HF
    (`checkpointer/dcp.py::dcp_load` with from_hf): the adapter's `to_hf` of the model's state is the
    template `dcp.load` fills through the adapter's reader (strict: every template key must be read), then
    `from_hf` and `load_state_dict`."""
    import torch.distributed.checkpoint as dcp
    config = config or qwen3_5_config_from_hf(path)
    model = config.build()
    adapter = Qwen35TextStateDictAdapter(config, None)
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(path)))
    model.load_state_dict(adapter.from_hf(hf_state), strict=True)
    return model.eval()


def tt_logits(model, ids):
    """torchtitan's model on a dense `[B, L]` batch: the rows packed into one `[1, B·L]` row with their
    boundaries and per-row positions (what CPTrainer hands it in one process)."""
    B, L = ids.shape
    batch = CPBatch(cp=None, cu_seqlens=torch.arange(0, B * L + 1, L))
    positions = torch.arange(L).repeat(B)[None]
    with torch.no_grad():
        return model(ids.reshape(1, -1), attention_masks=batch.masks(), positions=positions).reshape(B, L, -1)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def ids_of(B, L, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, L), generator=torch.Generator().manual_seed(seed))


def fields_of(config):
    """A config's fields, nested, without the initialisers (fresh functools.partial objects per call)."""
    if dataclasses.is_dataclass(config):
        return (type(config), {f.name: fields_of(getattr(config, f.name))
                               for f in dataclasses.fields(config) if f.name != "param_init"})
    if isinstance(config, (list, tuple)):
        return [fields_of(c) for c in config]
    return config


# ------------------------------------------------------------------------------------------ config
def test_config_of_tiny_hf_model_is_qwen3_5_tiny():
    """The HF config of the end-to-end checkpoints describes exactly the `qwen3_5_tiny` training model."""
    from transformers import Qwen3_5TextConfig
    ours = qwen3_5_config_from_hf(Qwen3_5TextConfig(**TINY))
    assert fields_of(ours) == fields_of(qwen3_5_text_config("tiny"))
    assert not ours.enable_weight_tying and qwen3_5_config_from_hf(Qwen3_5TextConfig(**TINY, tie_word_embeddings=True)
                                                                   ).enable_weight_tying


# transformers' text configs of the released Qwen3.5 0.8B and 27B (their config.json's text_config)
RELEASED = {
    "0.8B": dict(vocab_size=248320, hidden_size=1024, num_hidden_layers=24, intermediate_size=3584,
                 num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True),
    "27B": dict(vocab_size=248320, hidden_size=5120, num_hidden_layers=64, intermediate_size=17408,
                num_attention_heads=24, num_key_value_heads=4, linear_num_value_heads=48),
}


@pytest.mark.parametrize("flavor", sorted(RELEASED))
def test_config_of_released_model_is_torchtitans_flavor(flavor):
    """torchtitan's own flavors of the released models (their text part) are what our function builds from
    transformers' config, but for tying: torchtitan's flavors untie (its note), the HF config decides here."""
    fields = dict(RELEASED[flavor], head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128,
                  linear_value_head_dim=128, max_position_embeddings=262144,
                  rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                       mrope_section=[11, 11, 10], mrope_interleaved=True))
    ours = qwen3_5_config_from_hf(dict(fields, model_type="qwen3_5_text"))
    assert ours.enable_weight_tying == fields.get("tie_word_embeddings", False)
    assert fields_of(dataclasses.replace(ours, enable_weight_tying=False)) == fields_of(qwen3_5_text_config(flavor))


def test_config_sources(ckpts):
    """A checkpoint directory, its config.json, the dict and the config object give one config; a VLM's
    is its text model's, tied as the VLM (its own flag, not its text_config's)."""
    _, path = ckpts["vlm-tied"]
    fields = json.loads((path / "config.json").read_text())
    assert fields["tie_word_embeddings"] and not fields["text_config"]["tie_word_embeddings"]
    from transformers import AutoConfig
    sources = (path, str(path / "config.json"), fields, AutoConfig.from_pretrained(path))
    got = [qwen3_5_config_from_hf(s) for s in sources]
    assert all(fields_of(g) == fields_of(got[0]) for g in got)
    assert got[0].enable_weight_tying and got[0].vision_encoder is None
    assert fields_of(qwen3_5_config_from_hf(ckpts["text"][1])) == fields_of(qwen3_5_text_config("tiny"))


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True), ("hidden_act", "gelu"), ("attention_dropout", 0.1),
    ("rope_parameters.rope_type", dict(rope_type="yarn", factor=2.0, rope_theta=1e4, partial_rotary_factor=0.5)),
    ("rope_parameters.partial_rotary_factor", dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.3)),
    ("rope_parameters.mrope_section", dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5,
                                           mrope_section=[2, 2, 2])),
    ("model_type", "qwen3_5_moe_text")])
def test_config_refuses_what_torchtitan_cant_express(field, value):
    fields = dict(TINY, model_type="qwen3_5_text")
    fields[field.split(".")[0]] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        qwen3_5_config_from_hf(fields)


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_loads_with_transformers_logits(ckpts, kind):
    hf, path = ckpts[kind]
    model = load_like_torchtitan(path)
    ids = ids_of(2, 48)
    err = rel_err(tt_logits(model, ids), hf_logits(hf, ids))
    assert err <= TOL, f"{kind}: logits rel err {err:.2e}"
    # from_hf of the file's own tensors (vision weights, text or VLM names, no lm_head) gives the same weights
    from safetensors.torch import load_file
    config = qwen3_5_config_from_hf(path)
    direct = Qwen35TextStateDictAdapter(config, None).from_hf(load_file(path / "model.safetensors"))
    loaded = model.state_dict()
    assert set(direct) == set(loaded) and all(torch.equal(direct[k], loaded[k]) for k in direct)


def test_tied_checkpoint_loads_into_an_untied_model(ckpts):
    """The `qwen3_5_tiny` training model is untied: a tied checkpoint's lm_head is its embedding."""
    hf, path = ckpts["vlm-tied"]
    model = load_like_torchtitan(path, config=qwen3_5_text_config("tiny"))
    assert not model.enable_weight_tying
    assert torch.equal(model.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    ids = ids_of(2, 48)
    assert rel_err(tt_logits(model, ids), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize("kind", ["text", "text-tied", "vlm-tied"])
def test_to_hf_writes_what_transformers_loads(ckpts, kind, tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen3_5ForCausalLM
    hf, path = ckpts[kind]
    model = load_like_torchtitan(path)
    adapter = Qwen35TextStateDictAdapter(qwen3_5_config_from_hf(path), None)
    save_file({k: v.contiguous() for k, v in adapter.to_hf(model.state_dict()).items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.get_text_config().to_json_file(tmp_path / "config.json")
    if kind == "vlm-tied":       # the VLM ties by its own flag; its text_config's says untied
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    again, info = Qwen3_5ForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = ids_of(2, 48)
    assert rel_err(hf_logits(again.float().eval(), ids), hf_logits(hf, ids)) <= TOL


def tiny_moe_config():
    """torchtitan's Qwen3.5-MoE layers at CPU size (torchtitan's debugmodel_moe has a 248k vocabulary)."""
    from torchtitan.models import qwen3_5 as q
    from torchtitan.models.common import Embedding, Linear
    from torchtitan.models.qwen3_5.rope import MRoPE

    from fla_cp.integrations.torchtitan.qwen3_5 import Qwen35TextModel
    dim, vocab = 32, 64
    # torchtitan's own modules: the adapter maps names only (with_cp_layers refuses MoE under CP for now)
    return Qwen35TextModel.Config(
        vocab_size=vocab, dim=dim, norm=q._offset_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=q._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=q._output_linear_init(dim)),
        layers=q._build_qwen35_moe_layers(
            rope=MRoPE.Config(dim=4, max_seq_len=64, theta=1e4, mrope_section=[1, 1, 0]), attn_backend="flex",
            n_layers=4, dim=dim, n_heads=4, n_kv_heads=2, head_dim=8, rotary_dim=4, moe_hidden_dim=16,
            num_experts=4, top_k=2, shared_expert_hidden_dim=24, n_key_heads=2, n_value_heads=4, key_head_dim=8,
            value_head_dim=8),
        vision_encoder=None)


def test_moe_is_refused_under_cp():
    from fla_cp.integrations.torchtitan.qwen3_5 import with_cp_layers
    with pytest.raises(ValueError, match="layer 0 is MoE"):
        with_cp_layers(tiny_moe_config())


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_to_hf_from_hf_round_trip(which):
    config = qwen3_5_text_config("tiny") if which == "dense" else tiny_moe_config()
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in config.build().state_dict().items()}
    adapter = Qwen35TextStateDictAdapter(config, None)
    hf = adapter.to_hf(state)
    assert all(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) for k in hf)
    if which == "moe":
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"} <= set(hf)
    # torchtitan's MoE router keeps an expert-bias buffer of its own (no HF counterpart, not loaded)
    own = {k for k in state if k.endswith("moe.expert_bias_E")}
    for names in (hf, {vlm_name(k): v for k, v in hf.items()}):         # text and VLM names
        back = adapter.from_hf(dict(names))
        assert set(back) == set(state) - own and all(torch.equal(back[k], state[k]) for k in back)


def test_sharded_vlm_checkpoint(ckpts, tmp_path):
    """A VLM checkpoint in several files with an index (as the released ones): loads, and as torchtitan's
    `hf_assets_path` gives the adapter a file map naming every tensor `to_hf` writes (torchtitan saves HF
    into the same files), an untied lm_head next to the embedding."""
    hf, _ = ckpts["vlm-tied"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = ids_of(2, 48)
    assert rel_err(tt_logits(load_like_torchtitan(tmp_path), ids), hf_logits(hf, ids)) <= TOL
    config = qwen3_5_text_config("tiny")
    adapter = Qwen35TextStateDictAdapter(config, str(tmp_path))
    mapping = adapter.fqn_to_index_mapping
    assert set(mapping) == set(adapter.to_hf(config.build().state_dict()))
    assert mapping["lm_head.weight"] == mapping["model.embed_tokens.weight"]
    assert len(set(mapping.values())) > 1


# ------------------------------------------------------------------------------------------ end to end
def first_batch_loss(model) -> float:
    """transformers' mean cross-entropy on the first batch of the `qwen3_5_tiny` run (fla_cp's packed
    stdlib stream, seed 0, 2 x 256 tokens), one document piece at a time (transformers can't pack on CPU)."""
    dataset = iter(PackedTextDataset(fla_cp_data.Corpus(None), ByteTokenizer(), seq_len=256, local_batch_size=2,
                                     dp_rank=0, dp_world_size=1, seed=0))
    logits, labels = [], []
    for _ in range(2):
        sample, label = next(dataset)
        ids, starts = sample["input"], torch.nonzero(sample["positions"] == 0).flatten().tolist()
        for a, b in zip(starts, starts[1:] + [len(ids)]):
            logits.append(hf_logits(model, ids[a:b][None])[0])
        labels.append(label)
    return torch.nn.functional.cross_entropy(torch.cat(logits).double(), torch.cat(labels)).item()


@pytest.mark.parametrize("kind, cp, hf_config", [pytest.param("text", 1, False, marks=pytest.mark.slow),
                                                  ("vlm-tied", 2, True)])
def test_torchtitan_trainer_loads_hf_checkpoint(ckpts, kind, cp, hf_config, tmp_path):
    """`qwen3_5_tiny` loads the checkpoint (its architecture), or `--hf_config` takes the architecture from it."""
    hf, path = ckpts[kind]
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / "run.log"
    ok, _ = check.torchtitan_train(cp, "qwen3_5_tiny", [
        *(["--hf_config", str(path)] if hf_config else []),
        "--checkpoint.enable", "--checkpoint.load_only", "--checkpoint.initial_load_path", str(path),
        "--checkpoint.initial_load_in_hf", "--training.steps", "1", "--metrics_file", str(metrics),
        "--dump_folder", str(tmp_path / "out"), "--parallelism.context_parallel_degree", str(cp)], log, timeout=300)
    assert ok, check.tail(log)
    assert "Loading from HF safetensors" in log.read_text()
    loss = json.loads(metrics.read_text().splitlines()[0])["loss"]
    want = first_batch_loss(hf)
    assert abs(loss - want) <= TOL * want, f"{kind}, CP={cp}: torchtitan step-1 loss {loss} vs transformers {want}"
