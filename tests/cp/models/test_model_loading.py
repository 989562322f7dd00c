"""Loading FLA GatedDeltaNet checkpoints through the HF Auto classes; what config.json keeps.

`import fla_cp` maps FLA's `GatedDeltaNetConfig` to our classes in `AutoModel*`, so an FLA checkpoint
loads as `GatedDeltaNetCPForCausalLM` (with or without CP keywords) and computes what FLA's model does;
`cp_size` is a launch choice, never written to config.json (and ignored when a legacy one has it).

The reference is FLA's own `GatedDeltaNetForCausalLM`, run on CPU with its Triton kernels swapped for
torch math (FLA's naive recurrence) only inside `fla_on_cpu()`.
"""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fla_cp  # noqa: F401  (registers the Auto classes)
from fla_cp.models import GatedDeltaNetCPConfig, GatedDeltaNetCPForCausalLM, GatedDeltaNetCPModel
from tests.cp._dist import run_ranks

TOL = 1e-5
VOCAB = 128
CFG = dict(hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4, expand_v=1.0, num_hidden_layers=2,
           vocab_size=VOCAB, hidden_ratio=2, norm_eps=1e-6)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------- FLA's model on CPU (reference)
def _gdr(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
         use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
         cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None, **kw):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    assert initial_state is None and cu_seqlens is None and not output_final_state
    if use_gate_in_kernel:
        g = -A_log.float().exp() * F.softplus(g.float() + (dt_bias.float() if dt_bias is not None else 0))
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid() * (2 if allow_neg_eigval else 1)
    q, k = q.float(), k.float()
    if use_qk_l2norm_in_kernel:
        q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    rep = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(rep, 2), k.repeat_interleave(rep, 2)
    o, _ = naive_recurrent_gated_delta_rule(q, k, v.float(), beta.float(), g.float(), scale=scale)
    return o.to(v.dtype), None


def _conv(x, weight, bias=None, activation=None, **kw):           # x [B, T, D], weight [D, W]
    D, W = weight.shape
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), weight.unsqueeze(1), bias, groups=D).transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


def _short_conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kw):
    assert residual is None and mask is None and cache is None and cu_seqlens is None
    return _conv(x, self.weight.squeeze(1), self.bias, self.activation)


def _rms(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
    return (y, x) if prenorm else y


def _gated_norm(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    xf, gf = x.float(), g.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
    return (y * (F.silu(gf) if self.activation in ("swish", "silu") else gf.sigmoid())).to(x.dtype)


def _mlp(self, x, **kw):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@contextlib.contextmanager
def fla_on_cpu():
    """Inside: FLA's Triton kernels (GDN recurrence, short conv, fused norms, swiglu) are torch math."""
    import fla.layers.gated_deltanet as fgd
    from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fgd, "chunk_gated_delta_rule", _gdr)
        mp.setattr(fgd, "fused_recurrent_gated_delta_rule", _gdr)
        mp.setattr(fgd, "causal_conv1d", _conv)
        mp.setattr(ShortConvolution, "forward", _short_conv)
        mp.setattr(RMSNorm, "forward", _rms)
        mp.setattr(FusedRMSNormGated, "forward", _gated_norm)
        mp.setattr(GatedMLP, "forward", _mlp)
        yield


@pytest.fixture(scope="module")
def fla_ckpt(tmp_path_factory):
    """An FLA checkpoint dir, its config and state dict, and FLA's logits / loss on `ids`."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    torch.manual_seed(0)
    config = GatedDeltaNetConfig(**CFG)
    model = GatedDeltaNetForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:          # slow-decay heads: any state error shows
            layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
    path = str(tmp_path_factory.mktemp("fla_ckpt"))
    model.save_pretrained(path)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    model.config.fuse_cross_entropy = False       # FLA's fused CE is Triton-only; same math
    with torch.no_grad(), fla_on_cpu():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return dict(path=path, config=config, state=model.state_dict(), ids=ids, logits=out.logits, loss=out.loss)


def same_weights(model, ref_state) -> bool:
    got = model.state_dict()
    return set(got) == set(ref_state) and all(torch.equal(got[k], v) for k, v in ref_state.items())


def check_matches_fla(model, ref, tag):
    with torch.no_grad():
        out = model(input_ids=ref["ids"], labels=ref["ids"])
    assert rel_err(out.logits, ref["logits"]) <= TOL, f"{tag}: logits {rel_err(out.logits, ref['logits']):.2e}"
    assert rel_err(out.loss, ref["loss"]) <= TOL, f"{tag}: loss {out.loss} vs {ref['loss']}"


# -------------------------------------------------------------------------------- single process
def test_auto_class_loads_fla_checkpoint(fla_ckpt):
    from transformers import AutoModel, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(fla_ckpt["path"])            # no CP keyword: cp_size=1
    assert type(model) is GatedDeltaNetCPForCausalLM and type(model.config) is GatedDeltaNetCPConfig
    assert model.cp_size == 1 and model.cp_group is None and model.config.model_type == "gated_deltanet_cp"
    assert same_weights(model, fla_ckpt["state"])
    check_matches_fla(model, fla_ckpt, "Auto, no kwargs")

    model = AutoModelForCausalLM.from_pretrained(fla_ckpt["path"], cp_size=1, backend="torch")
    assert model.cp_size == 1 and model.config.backend == "torch"
    assert all(layer.attn.backend == "torch" for layer in model.model.layers)
    check_matches_fla(model, fla_ckpt, "Auto, cp_size=1 backend=torch")

    with pytest.raises(ValueError, match="cp_layout must be one of"):
        AutoModelForCausalLM.from_pretrained(fla_ckpt["path"], cp_layout="ring")
    base = AutoModel.from_pretrained(fla_ckpt["path"], cp_size=1)
    assert type(base) is GatedDeltaNetCPModel and base.cp_size == 1


def test_fla_config_from_config_and_conversion(fla_ckpt):
    from transformers import AutoModelForCausalLM
    fla_config = fla_ckpt["config"]
    model = AutoModelForCausalLM.from_config(fla_config, backend="torch")
    assert type(model) is GatedDeltaNetCPForCausalLM and model.config.backend == "torch"
    assert type(fla_config).__name__ == "GatedDeltaNetConfig" and not hasattr(fla_config, "backend")

    ours = GatedDeltaNetCPConfig.from_fla(fla_config, cp_layout="zigzag")
    assert ours.cp_size == 1 and ours.cp_layout == "zigzag" and ours.model_type == "gated_deltanet_cp"
    fla_fields = {k: v for k, v in fla_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    assert {k: v for k, v in ours.to_dict().items() if k in fla_fields} == fla_fields
    again = GatedDeltaNetCPConfig.from_fla(ours, backend="torch")    # a copy of ours
    assert again is not ours and again.cp_layout == "zigzag" and again.backend == "torch"
    assert ours.backend == "auto"
    # the config object of a from_pretrained call may be FLA's, too
    loaded = GatedDeltaNetCPForCausalLM.from_pretrained(fla_ckpt["path"], config=fla_config, cp_size=1)
    assert type(loaded.config) is GatedDeltaNetCPConfig and same_weights(loaded, fla_ckpt["state"])
    # constructing with FLA's config object directly is not supported: convert it first
    with pytest.raises(TypeError, match="from_fla"):
        GatedDeltaNetCPForCausalLM(fla_config)
    GatedDeltaNetCPForCausalLM(GatedDeltaNetCPConfig.from_fla(fla_config))


def test_saved_config_has_no_cp_size(fla_ckpt, tmp_path):
    from fla.models import GatedDeltaNetForCausalLM
    from transformers import AutoModelForCausalLM
    GatedDeltaNetCPConfig(**CFG, cp_size=4, cp_layout="zigzag").save_pretrained(tmp_path / "cfg")
    saved = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert "cp_size" not in saved and saved["cp_layout"] == "zigzag" and saved["model_type"] == "gated_deltanet_cp"
    assert GatedDeltaNetCPConfig(cp_size=4).to_dict()["cp_size"] == 4        # in memory it stays

    model = GatedDeltaNetCPForCausalLM.from_pretrained(fla_ckpt["path"], backend="torch")
    model.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert "cp_size" not in saved and saved["backend"] == "torch"
    assert "kernel_backend" not in saved and "conv_backend" not in saved
    assert saved["model_type"] == "gated_deltanet_cp"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(again) is GatedDeltaNetCPForCausalLM and again.config.backend == "torch"
    assert same_weights(again, fla_ckpt["state"])
    # FLA's own class still loads what we save: same parameter names
    fla_model, info = GatedDeltaNetForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert same_weights(fla_model, fla_ckpt["state"])


def test_legacy_config_with_cp_size_loads_in_one_process(fla_ckpt, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    GatedDeltaNetCPForCausalLM.from_pretrained(fla_ckpt["path"]).save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "config.json")
    saved = json.loads(open(path).read())
    saved["cp_size"] = 2                           # written by versions that persisted it
    with open(path, "w") as f:
        json.dump(saved, f)
    assert AutoConfig.from_pretrained(tmp_path).cp_size == 1
    assert AutoConfig.from_pretrained(tmp_path, cp_size=3).cp_size == 3   # the keyword wins
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is GatedDeltaNetCPForCausalLM and model.cp_size == 1
    assert GatedDeltaNetCPForCausalLM.from_pretrained(tmp_path, cp_size=1).cp_size == 1
    check_matches_fla(model, fla_ckpt, "legacy config")


# ------------------------------------------------------------------------------------ multi-rank
def _worker_auto_cp2(rank, world, path, ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, cp_size=2)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, gather_logits=True)
    return type(model).__name__, model.cp_size, model.dp_group is None, out.loss, out.logits


def test_auto_class_cp2_matches_fla(fla_ckpt):
    results = run_ranks(_worker_auto_cp2, 2, args=(fla_ckpt["path"], fla_ckpt["ids"]))
    for rank, (name, cp_size, no_dp, loss, logits) in enumerate(results):
        assert name == "GatedDeltaNetCPForCausalLM" and cp_size == 2 and no_dp, (rank, name, cp_size)
        assert rel_err(loss, fla_ckpt["loss"]) <= TOL, f"rank {rank}: loss {loss} vs {fla_ckpt['loss']}"
        assert rel_err(logits, fla_ckpt["logits"]) <= TOL, f"rank {rank}: logits {rel_err(logits, fla_ckpt['logits'])}"


# ------------------------------------------------------------------------------------ hybrid checkpoints
HYBRID_ATTN = [{"layers": [1], "num_heads": 4, "num_kv_heads": 2},
               {"layers": [2], "num_heads": 4, "num_kv_heads": 1, "window_size": 5}]


def _fla_hybrid_worker(rank, world, path, ids):
    """FLA's own hybrid model (GDN + full + windowed attention), saved, and run on CPU: its Triton kernels
    as torch math (`fla_on_cpu`) or interpreted (RoPE), flash-attn replaced by its documented semantics."""
    import fla.layers.attn as fla_attn
    from _flash_stand_in import flash_attn_func, flash_attn_varlen_func
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    fla_attn.flash_attn_func, fla_attn.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**{**CFG, "num_hidden_layers": 3}, attn=HYBRID_ATTN)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.attn, "A_log"):
                layer.attn.A_log.copy_(torch.linspace(-6.0, 1.0, layer.attn.num_v_heads))
    model.save_pretrained(path)
    model.config.fuse_cross_entropy = False
    with torch.no_grad(), fla_on_cpu():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.logits, out.loss, [type(layer.attn).__name__ for layer in model.model.layers]


@pytest.mark.timeout(300)
def test_fla_hybrid_checkpoint_loads_and_matches(tmp_path):
    """A checkpoint of FLA's own hybrid model (attention layers from `attn`) loads unchanged through the
    Auto class, and computes what FLA's model does, without CP and with cp_size=2."""
    from _interpret import interpret_env
    from transformers import AutoModelForCausalLM
    path = str(tmp_path / "fla_hybrid")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with interpret_env(always=True):
        logits, loss, kinds = run_ranks(_fla_hybrid_worker, 1, args=(path, ids))[0]
    assert kinds == ["GatedDeltaNet", "Attention", "Attention"], kinds
    model = AutoModelForCausalLM.from_pretrained(path)
    kinds = [type(layer.attn).__name__ for layer in model.model.layers]
    assert kinds == ["GatedDeltaNetCP", "AttentionCP", "AttentionCP"], kinds
    assert model.model.layers[2].attn.window_size == 5 and model.model.layers[2].attn.num_kv_heads == 1
    check_matches_fla(model, dict(ids=ids, logits=logits, loss=loss), "hybrid, one process")
    ref = dict(ids=ids, logits=logits, loss=loss)
    for rank, (name, cp_size, _, got_loss, got_logits) in enumerate(
            run_ranks(_worker_auto_cp2, 2, args=(path, ids))):
        assert name == "GatedDeltaNetCPForCausalLM" and cp_size == 2
        assert rel_err(got_loss, ref["loss"]) <= TOL, f"rank {rank}: loss {got_loss} vs {ref['loss']}"
        assert rel_err(got_logits, ref["logits"]) <= TOL, f"rank {rank}: logits {rel_err(got_logits, ref['logits'])}"
