"""Loading, saving and bad input of the Qwen3.5 / Qwen3.5-MoE / Qwen3-Next CP models (transformers' classes).

- checkpoints saved by transformers load unchanged through `AutoModelForCausalLM` and our classes: our
  class, every tensor equal, transformers' logits; the MoE checkpoints' per-expert weights are fused back
  on load (transformers' conversion mapping, kept for our classes by `register_family`); config fields
  given as keywords (`output_router_logits=True`) and `subfolder=` work as with transformers' classes;
- a Qwen3.5 / Qwen3.5-MoE VLM checkpoint (`Qwen3_5Config`, weights `model.language_model.*`, as the
  official checkpoints) loads as our text model with the language model's weights;
- `save_pretrained` writes transformers' checkpoint (no CP launch fields), which transformers' class and
  ours load back equal;
- a checkpoint of another model type raises (transformers only warns and loads a random model);
- under CP (2 gloo ranks, one spawn): `from_pretrained(dir, cp_size=2)` and transformers' loss; vision
  inputs, 4-D / dict masks and bad position_ids raise on every rank; ranks built with different layer
  sizes, layer order, cp_layout or MoE router settings raise the forward check's ValueError on every rank.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import fla_cp  # noqa: F401  (registers the Auto classes)
from tests.cp._dist import run_ranks
from tests.cp.models.test_qwen_models import (FAMILIES, classes, config_of, cp_model, ids_of, reference_model,
                                             rel_err)

TOL = 1e-5
# a tiny vision tower for the VLM checkpoints (its weights are saved, never used by the text model)
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
              num_position_embeddings=16, patch_size=4, spatial_merge_size=1, temporal_patch_size=1)


def same_weights(model, ref_state) -> bool:
    got = model.state_dict()
    return set(got) == set(ref_state) and all(torch.equal(got[k], v) for k, v in ref_state.items())


def logits_and_loss(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.logits, out.loss


def saved_keys(path) -> set:
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def error_of(fn) -> str:
    """'<type>: <message>' of the ValueError / TypeError `fn` raises, or "no error" (in workers: the test
    asserts, so that one defect does not hide the others computed in the same spawn)."""
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{family: dir of transformers' checkpoint, its state dict, ids, transformers' logits and loss}."""
    ids = ids_of(2, 14, seed=1)
    out = {}
    for family in FAMILIES:
        model = reference_model(family).eval()
        path = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(path)
        logits, loss = logits_and_loss(model, ids)
        out[family] = dict(path=path, state=model.state_dict(), ids=ids, logits=logits, loss=loss)
    return out


def check_matches(model, ref, tag):
    logits, loss = logits_and_loss(model, ref["ids"])
    assert rel_err(logits, ref["logits"]) <= TOL, f"{tag}: logits {rel_err(logits, ref['logits']):.2e}"
    assert rel_err(loss, ref["loss"]) <= TOL, f"{tag}: loss {loss.item()} vs {ref['loss'].item()}"


# -------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_checkpoint_loads(ckpts, family, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM
    ref = ckpts[family]
    ours = classes(family)[2]
    if family != "qwen3_5":
        # transformers writes the experts one by one; loading fuses them back (its conversion mapping)
        keys = saved_keys(ref["path"])
        assert any(".experts.0." in k for k in keys) and not any(k.endswith("experts.gate_up_proj") for k in keys)
    with_info = dict(output_loading_info=True)
    for tag, load in [("Auto, no CP keyword", lambda: AutoModelForCausalLM.from_pretrained(ref["path"], **with_info)),
                      ("Auto, cp_size=1",
                       lambda: AutoModelForCausalLM.from_pretrained(ref["path"], cp_size=1, **with_info)),
                      ("our class", lambda: ours.from_pretrained(ref["path"], backend="torch", **with_info))]:
        model, info = load()
        assert type(model) is ours and model.cp_size == 1 and model.cp_group is None, (tag, type(model))
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (tag, info)
        assert same_weights(model, ref["state"]), f"{family}, {tag}: weights differ"
        check_matches(model.eval(), ref, f"{family}, {tag}")
    assert model.config.backend == "torch" and all(
        layer.linear_attn.backend == "torch" for layer in model.model.layers if hasattr(layer, "linear_attn"))
    # AutoModel stays transformers' (its VLMs build their language model through it); our text model
    # is used by name
    base = AutoModel.from_pretrained(ref["path"])
    assert type(base).__module__.startswith("transformers."), type(base)

    # keywords naming a config field update it, and the location keywords reach config.json too, as with
    # transformers' own class (they raised a TypeError / read the directory above)
    os.makedirs(tmp_path / "repo")
    os.symlink(ref["path"], tmp_path / "repo" / "inner")
    fields = dict(use_cache=False, **({"output_router_logits": False} if family != "qwen3_5" else {}))
    model = ours.from_pretrained(str(tmp_path / "repo"), subfolder="inner", dtype=torch.float64, **fields)
    assert all(getattr(model.config, k) is v for k, v in fields.items()) and model.dtype == torch.float64
    assert same_weights(model.float(), ref["state"])


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_moe_experts_implementation_as_transformers(ckpts, family, monkeypatch):
    """The MoE experts run as in transformers' own model: transformers caches per class (inherited) whether
    a class may set its experts implementation, which made ours "eager" in a fresh process, "grouped_mm"
    after transformers' class had been built, and failed the load when our text model had cached False
    (a VLM built after `import fla_cp` builds our text model) and transformers' causal LM True."""
    _, hf_class, ours = classes(family)
    cached = "_can_set_experts_implementation_cached_value"
    for cls in {*ours.__mro__, *ours.text_model_class.__mro__}:
        if cached in cls.__dict__:
            monkeypatch.delattr(cls, cached)           # as in a fresh process (restored after the test)
    model = ours.from_pretrained(ckpts[family]["path"])
    hf_model = hf_class.from_pretrained(ckpts[family]["path"])
    assert model.config._experts_implementation == hf_model.config._experts_implementation == "grouped_mm"
    monkeypatch.setattr(ours.text_model_class, cached, False, raising=False)
    model = ours.from_pretrained(ckpts[family]["path"])
    assert model.config._experts_implementation == "grouped_mm"
    check_matches(model.eval(), ckpts[family], f"{family}, grouped_mm experts")


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_vlm_checkpoint_loads_the_text_model(family, tmp_path):
    """A VLM checkpoint (config `Qwen3_5Config` with a `text_config`, weights `model.language_model.*`)
    gives our text model with the language model's weights, as transformers' `*ForCausalLM` loads it."""
    from transformers import (AutoModelForCausalLM, Qwen3_5Config, Qwen3_5ForConditionalGeneration,
                              Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
    config_class, vlm_class = {"qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration),
                               "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)}[family]
    torch.manual_seed(0)
    vlm = vlm_class(config_class(text_config=config_of(family).to_dict(), vision_config=VISION,
                                 tie_word_embeddings=False))
    with torch.no_grad():        # non-trivial norms (transformers initialises them to zero: (1 + w))
        for name, p in vlm.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    vlm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == config_class.model_type and "text_config" in saved
    assert any(k.startswith("model.language_model.") for k in saved_keys(tmp_path))
    want = {"model." + k: v for k, v in vlm.model.language_model.state_dict().items()}
    want["lm_head.weight"] = vlm.lm_head.weight.detach()

    hf_model = classes(family)[1].from_pretrained(tmp_path).eval()      # transformers' own text model
    assert same_weights(hf_model, want)
    ids = ids_of(2, 14, seed=1)
    ref = dict(ids=ids, **dict(zip(("logits", "loss"), logits_and_loss(hf_model, ids))))
    ours = classes(family)[2]
    for tag, model in [("Auto", AutoModelForCausalLM.from_pretrained(tmp_path, cp_size=1)),
                       ("our class", ours.from_pretrained(tmp_path))]:
        assert type(model) is ours and type(model.config) is classes(family)[0], (tag, type(model))
        assert same_weights(model, want), f"{family} VLM checkpoint, {tag}: weights differ"
        check_matches(model.eval(), ref, f"{family} VLM checkpoint, {tag}")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_writes_transformers_checkpoint(ckpts, family, tmp_path):
    ref = ckpts[family]
    _, hf_class, ours = classes(family)
    model = ours.from_pretrained(ref["path"], cp_layout="zigzag", backend="torch")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"cp_size", "cp_layout", "backend"} & set(saved), sorted(saved)
    assert saved["model_type"] == classes(family)[0].model_type
    # the same files as transformers writes (per-expert MoE weights included)
    assert saved_keys(tmp_path) == saved_keys(ref["path"])
    assert (model.config.cp_layout, model.config.backend) == ("zigzag", "torch")     # kept in memory
    hf_model, info = hf_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf_model) is hf_class and same_weights(hf_model, ref["state"])
    again = ours.from_pretrained(tmp_path)
    assert again.config.cp_layout == "contiguous" and again.config.backend == "auto"
    assert same_weights(again, ref["state"])


def test_checkpoint_of_another_model_type_raises(ckpts, tmp_path):
    """transformers only warns when a checkpoint of another model_type is loaded into a class, then loads
    the parameters whose names match into a randomly initialised model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from fla_cp.models import Qwen3_5CPForCausalLM, Qwen3_5MoeCPForCausalLM, Qwen3NextCPForCausalLM
    llama = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(llama)
    os.makedirs(tmp_path / "empty")
    cases = [(Qwen3_5CPForCausalLM, llama, "'llama'"),
             (Qwen3_5CPForCausalLM, ckpts["qwen3_next"]["path"], "'qwen3_next'"),
             (Qwen3_5CPForCausalLM, ckpts["qwen3_5_moe"]["path"], "'qwen3_5_moe_text'"),
             (Qwen3NextCPForCausalLM, ckpts["qwen3_5"]["path"], "'qwen3_5_text'"),
             (Qwen3_5MoeCPForCausalLM, ckpts["qwen3_5"]["path"], "'qwen3_5_text'"),
             (Qwen3_5CPForCausalLM.text_model_class, llama, "'llama'"),
             # no config.json: transformers would build the config class's defaults (a full-size model)
             (Qwen3_5CPForCausalLM, str(tmp_path / "empty"), "no model_type")]
    supported = {Qwen3_5CPForCausalLM: "'qwen3_5_text' or 'qwen3_5'", Qwen3NextCPForCausalLM: "'qwen3_next'",
                 Qwen3_5MoeCPForCausalLM: "'qwen3_5_moe_text' or 'qwen3_5_moe'",
                 Qwen3_5CPForCausalLM.text_model_class: "'qwen3_5_text' or 'qwen3_5'"}
    for cls, path, found in cases:
        with pytest.raises(ValueError) as e:
            cls.from_pretrained(path, cp_size=1)
        msg = str(e.value)
        assert "pretrained_model_name_or_path" in msg and path in msg and found in msg, msg
        assert supported[cls] in msg, msg
    # a model type fla_cp has no CP class for: transformers' class refuses the CP keyword (its message)
    with pytest.raises(TypeError, match="LlamaForCausalLM.__init__.. got an unexpected keyword argument 'cp_size'"):
        AutoModelForCausalLM.from_pretrained(llama, cp_size=2)


# ------------------------------------------------------------------------------------ multi-rank
def _cp2_model(rank, family, over_rank1=None, layout="contiguous", **over):
    """Our model at cp_size 2 from a tiny config (rank 1 with `over_rank1`'s fields)."""
    config = copy.deepcopy(config_of(family))
    for k, v in {**over, **((over_rank1 or {}) if rank == 1 else {})}.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    return classes(family)[2]._from_config(config, cp_size=2, cp_layout=layout)


LAYERS = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
MISMATCHES = {   # case: (family, rank 1's config fields or cp_layout, what the message names)
    "linear_num_value_heads": ("qwen3_5", dict(linear_num_value_heads=2), "layer sizes"),
    "num_key_value_heads": ("qwen3_5", dict(num_key_value_heads=1), "layer sizes"),
    "layer_types order": ("qwen3_5", dict(layer_types=LAYERS[1::-1] + LAYERS[2:]), "layer sizes"),
    "layer_types (Qwen3-Next)": ("qwen3_next", dict(layer_types=LAYERS[:3] + ["linear_attention"]), "layer"),
    "cp_layout": ("qwen3_5", "zigzag", "cp_context"),
    # the MoE load-balancing loss all-reduces [E] statistics: this failed in gloo (E, the router flag) or
    # gave a loss of neither configuration (top-k, coefficient)
    "num_experts": ("qwen3_5_moe", dict(num_experts=2), "MoE router"),
    "num_experts_per_tok": ("qwen3_5_moe", dict(num_experts_per_tok=1), "MoE router"),
    "router_aux_loss_coef": ("qwen3_5_moe", dict(router_aux_loss_coef=0.25), "MoE router"),
    "mlp_only_layers": ("qwen3_next", dict(mlp_only_layers=[0, 1]), "MoE router"),
}


def _worker(rank, world, ckpts):
    from transformers import AutoModelForCausalLM
    res = {}
    for family, ref in ckpts.items():
        model = AutoModelForCausalLM.from_pretrained(ref["path"], cp_size=2)
        with torch.no_grad():
            out = model(input_ids=ref["ids"], labels=ref["ids"])
        res[("load", family)] = (type(model).__name__, model.cp_size, same_weights(model, ref["state"]), out.loss)

    ids = ckpts["qwen3_5"]["ids"]
    model = _cp2_model(rank, "qwen3_5")
    res["pixel_values"] = error_of(lambda: model(ids, pixel_values=torch.zeros(4, 48), labels=ids))
    res["4-D attention_mask"] = error_of(lambda: model(ids, attention_mask=torch.ones(2, 1, 14, 14)))
    res["dict attention_mask"] = error_of(
        lambda: model(ids, attention_mask={"full_attention": None, "linear_attention": None}))
    res["position_ids"] = error_of(lambda: model(ids, position_ids=torch.arange(10).expand(2, -1)))
    res["after"] = error_of(lambda: model(ids, labels=ids))       # the ranks are still in step
    model_moe = _cp2_model(rank, "qwen3_5_moe")
    # a rank computing the MoE load-balancing loss while the other doesn't
    res["output_router_logits"] = error_of(lambda: model_moe(ids, labels=ids, output_router_logits=rank == 0))
    for case, (family, rank1, _) in MISMATCHES.items():
        if case == "cp_layout":
            m = _cp2_model(rank, family, layout=rank1 if rank == 1 else "contiguous")
        else:
            m = _cp2_model(rank, family, rank1)
        res[case] = error_of(lambda: m(ids, labels=ids))
    res["after mismatches"] = error_of(lambda: model(ids, labels=ids))
    return res


@pytest.mark.timeout(300)
def test_cp2_loading_and_bad_input(ckpts):
    results = run_ranks(_worker, 2, args=(ckpts,), timeout=240)
    for rank, res in enumerate(results):
        for family, ref in ckpts.items():
            name, cp_size, same, loss = res[("load", family)]
            assert name == classes(family)[2].__name__ and cp_size == 2 and same, (rank, family, name, cp_size, same)
            assert rel_err(loss, ref["loss"]) <= TOL, f"rank {rank}, {family}: loss {loss} vs {ref['loss']}"
        for case, names in [("pixel_values", ("ValueError", "pixel_values")),
                            ("4-D attention_mask", ("ValueError", "attention_mask", "(2, 1, 14, 14)")),
                            ("dict attention_mask", ("ValueError", "attention_mask", "dict")),
                            ("position_ids", ("ValueError", "position_ids", "(2, 10)"))]:
            for n in names + (f"rank {rank}",):
                assert n in res[case], f"rank {rank}, {case}: expected {n!r} in: {res[case]}"
        assert res["after"] == "no error" and res["after mismatches"] == "no error", (res["after"],
                                                                                      res["after mismatches"])
        assert res["output_router_logits"].startswith("ValueError") and "MoE router" in res["output_router_logits"], \
            res["output_router_logits"]
        for case, (_, _, names) in MISMATCHES.items():
            msg = res[case]
            assert msg.startswith("ValueError") and names in msg and "differs between ranks" in msg, \
                f"rank {rank}, {case}: {msg}"


def test_attention_dropout_is_refused_in_training():
    """transformers drops attention probabilities in training; fla_cp's attention has no dropout: a config
    asking for it raises (naming it) instead of training without it; eval mode runs."""
    model = cp_model("qwen3_5", reference_model("qwen3_5").state_dict())
    model.config.attention_dropout = 0.1
    ids = ids_of(1, 12, seed=0)
    with pytest.raises(ValueError, match="attention_dropout"):
        model.train()(input_ids=ids, labels=ids)
    with torch.no_grad():
        model.eval()(input_ids=ids, use_cache=False)
