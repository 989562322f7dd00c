"""fla_cp's GatedDeltaNet family (FLA's architecture: pure GDN, or hybrid with FLA `attn` softmax-attention
layers) as a torchtitan model, under fla_cp's exact CP.

    gdn_text_config("hybrid-tiny")               # a preset of fla_cp.utils.configs (vocab 258 by default)
    gdn_text_config(fla_config, vocab_size=...)  # FLA's GatedDeltaNetConfig, or fla_cp's GatedDeltaNetCPConfig
    gdn_model_spec("tiny")                       # a torchtitan ModelSpec with fla_cp's parallelize_fn

The model is a torchtitan `Decoder` made of torchtitan `Module`s that compute what FLA's
`GatedDeltaNetForCausalLM` (and fla_cp's `GatedDeltaNetCPForCausalLM`) computes:

- blocks `layers.{i}` with FLA's names `attn_norm`, `attn`, `mlp_norm`, `mlp`:
  `h = x + attn(attn_norm(x))`, `h + mlp(mlp_norm(h))`; the norms are RMSNorms (eps `norm_eps`);
- GDN layers: `FLAGatedDeltaNet`, torchtitan's Qwen3.5 GDN under CP (`CPGatedDeltaNet`: FLA's layer with
  other names) with FLA's beta (`allow_neg_eigval`) and gated output norm (`FLAGatedRMSNorm`, silu or sigmoid);
- attention layers (`config.attn`): `FLAAttention`, FLA's `Attention` (q/k/v/o projections, `qkv_bias`, GQA,
  RoPE over the whole head at per-document positions, `window_size`) with fla_cp's CP inner attention;
- the MLP: torchtitan's SwiGLU `FeedForward` (`w1` = FLA's gate_proj, `w3` = up_proj, `w2` = down_proj).

Every layer reads the batch's `CPBatch` (`batch.py`) from `attention_masks`: the model takes the packed
`[1, T_loc]` row `CPTrainer` builds, and `positions` (each token's position in its document) for RoPE.
On CPU the model runs the same ops in the same order as fla_cp's HF model: fp32 logits agree to rounding,
bf16 ones bit for bit (tests/cp/integrations/test_torchtitan_gdn_model.py). Parameters are initialised as
FLA initialises them; `state_dict.GatedDeltaNetStateDictAdapter` maps FLA checkpoint keys (HF format) both ways.

Refused by `gdn_text_config` (ValueError naming the config field): `use_short_conv=False`, `use_gate=False`,
`hidden_act` other than "swish", `attnres_block_size`, `use_l2warp`. Not read (no effect on the math):
`attn_mode`, `fuse_*`, `use_cache`, and the CP launch fields of fla_cp's config (torchtitan's flags decide).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.models.common import Conv1d, CosSinRoPE, Embedding, FeedForward, Linear, RMSNorm
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.qwen3_5.model import GatedDeltaKernel, RMSNormGated
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.protocols.module import Module

from fla_cp.integrations.torchtitan.batch import as_cp_batch
from fla_cp.integrations.torchtitan.layers import CPGatedDeltaNet, CPInnerAttention, attention_backend
from fla_cp.layers.functional import _normalize

# fla_cp's byte tokenizer (257 ids) plus one: the vocabulary of the CPU-sized torchtitan configs
BYTE_VOCAB = 258
# FLA's chunk size (the FLOP estimate's intra-chunk term)
_CHUNK = 64


# ---------------------------------------------------------------------------------------------- modules
class FLAGatedRMSNorm(RMSNormGated):
    """FLA's `FusedRMSNormGated`: `x / rms(x) * weight * act(gate)` in fp32, rounded once to x's dtype;
    act = silu (FLA's "swish" / "silu") or sigmoid. `x`, `gate` `[..., V]`.

    (torchtitan's `RMSNormGated` rounds before the gate and knows silu only.)"""

    @dataclass(kw_only=True, slots=True)
    class Config(RMSNormGated.Config):
        activation: str = "swish"

    def __init__(self, config: Config):
        super().__init__(config)
        self.activation = config.activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gate = gate.float()
        act = torch.sigmoid(gate) if self.activation == "sigmoid" else F.silu(gate)
        return (_normalize(x, self) * act).to(x.dtype)


class FLAGatedDeltaNet(CPGatedDeltaNet):
    """FLA's `GatedDeltaNet` layer under exact CP: torchtitan's Qwen3.5 GDN (`CPGatedDeltaNet`, the same
    computation with other names: `in_proj_z` is FLA's `g_proj`, `norm` its `o_norm`, ...) with FLA's beta.

    `x` `[1, T_loc, D]` -> `[1, T_loc, D]`; q, k `[1, T_loc, H, K]`, v `[1, T_loc, HV, V]` (GVA: value head
    j reads key head `j // (HV // H)`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(CPGatedDeltaNet.Config):
        allow_neg_eigval: bool = False
        """FLA's option: beta in (0, 2) (`2 * sigmoid(b)`), allowing negative eigenvalues of the transition."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.allow_neg_eigval = config.allow_neg_eigval

    def _beta(self, b, dtype):
        # FLA's beta: sigmoid in fp32 (its kernel's), doubled with allow_neg_eigval, in the input's dtype
        beta = b.float().sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return beta.to(dtype)


class FLARoPE(CosSinRoPE):
    """torchtitan's `CosSinRoPE` (FLA's convention: non-interleaved halves, fp32 angles `pos * inv_freq`,
    rotation in fp32) with FLA's one rounding more: its cos/sin table is in q's dtype. The same in fp32.
    q, k `[B, T, H, D]`, positions `[1, T]`."""

    @dataclass(kw_only=True, slots=True)
    class Config(CosSinRoPE.Config):
        pass

    @staticmethod
    def apply_rotary_emb(query, key, rope_cache):
        return CosSinRoPE.apply_rotary_emb(query, key, rope_cache.to(query.dtype))


class FLAAttention(Module):
    """FLA's softmax `Attention` (`fla.layers.attn`, as a hybrid config's `attn` layers build it: no qk_norm):
    q/k/v projections (bias with `qkv_bias`), RoPE on the whole head (FLA's non-interleaved halves, base
    `rope_theta`), causal GQA attention within documents (scale `head_dim ** -0.5`), `o_proj` (no bias).

    `x` `[1, T_loc, D]`, `positions` `[1, T_loc]`: each token's position in its document, as FLA's rotary
    counts them for packed input (it restarts at every `cu_seqlens` boundary)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        n_heads: int
        n_kv_heads: int
        head_dim: int
        q_proj: Linear.Config
        k_proj: Linear.Config
        v_proj: Linear.Config
        o_proj: Linear.Config
        rope: FLARoPE.Config
        inner_attention: CPInnerAttention.Config

    def __init__(self, config: Config):
        super().__init__()
        self.head_dim = config.head_dim
        self.q_proj = config.q_proj.build()
        self.k_proj = config.k_proj.build()
        self.v_proj = config.v_proj.build()
        self.o_proj = config.o_proj.build()
        self.rope = config.rope.build()
        self.inner_attention = config.inner_attention.build()

    def forward(self, x: torch.Tensor, attention_masks, positions: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q, k = self.rope(q, k, positions)
        o = self.inner_attention(q, k, v, attention_masks=attention_masks, scale=self.head_dim ** -0.5)
        return self.o_proj(o.reshape(B, T, -1))


class GatedDeltaNetBlock(Module):
    """FLA's `GatedDeltaNetBlock`: `h = x + attn(attn_norm(x)); h + mlp(mlp_norm(h))`, `[1, T_loc, D]`.
    The token mixer is a GDN layer (`delta_net`) or an attention layer (`attention`), exactly one."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        # `attention` is the name torchtitan's Decoder.Config looks for (first_attention, RoPE length)
        attention: FLAAttention.Config | None = None
        delta_net: FLAGatedDeltaNet.Config | None = None
        attn_norm: RMSNorm.Config
        mlp_norm: RMSNorm.Config
        mlp: FeedForward.Config

    def __init__(self, config: Config):
        super().__init__()
        if (config.attention is None) == (config.delta_net is None):
            raise ValueError("GatedDeltaNetBlock needs exactly one of attention / delta_net")
        self.full_attn = config.attention is not None
        self.attn_norm = config.attn_norm.build()
        self.attn = (config.attention if self.full_attn else config.delta_net).build()
        self.mlp_norm = config.mlp_norm.build()
        self.mlp = config.mlp.build()

    def forward(self, x: torch.Tensor, attention_masks, positions: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        h = self.attn(h, attention_masks, positions) if self.full_attn else self.attn(h, attention_masks)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class GatedDeltaNetModel(Decoder):
    """fla_cp's GatedDeltaNet family as a torchtitan Decoder: tokens `[1, T_loc]` -> logits `[1, T_loc, V]`
    (hidden states under torchtitan's chunked loss)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Decoder.Config):
        padding_idx: int | None = None
        """FLA's embedding `padding_idx` (config.pad_token_id): that row receives no gradient."""

        @property
        def max_seq_len(self) -> int:
            # FLA's RoPE has no length limit (max_position_embeddings only sizes its table) and GDN layers
            # none at all: any training.seq_len is accepted, and update_from_config sizes the RoPE cache to it
            return sys.maxsize

        def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
            """(parameters, training FLOPs per token): 6 per matmul parameter (the embedding only when tied,
            as torchtitan counts), plus each mixer's token-mixing matmuls times 6 (fwd + bwd, 2 per MAC):
            attention `2 * H * head_dim` per key in its span (seq_len, or the window; no causal discount,
            torchtitan's convention), GDN `HV * (3 * K * V + chunk * (K + V))` (the state's read, the
            delta's read and the write, and the attention within FLA's 64-token chunks)."""
            nparams = sum(p.numel() for p in model.parameters())
            embedding = 0 if self.enable_weight_tying else model.tok_embeddings.weight.numel()
            flops = 6 * (nparams - embedding)
            for layer in self.layers:
                if layer.attention is not None:
                    a = layer.attention
                    window = getattr(a.inner_attention, "window_size", None)
                    span = min(seq_len, window) if window else seq_len
                    flops += 6 * a.n_heads * 2 * a.head_dim * span
                else:
                    d = layer.delta_net
                    K, V = d.key_head_dim, d.value_head_dim
                    HV = d.in_proj_v.out_features // V
                    flops += 6 * HV * (3 * K * V + _CHUNK * (K + V))
            return nparams, flops

    def __init__(self, config: Config):
        super().__init__(config)
        self.tok_embeddings.padding_idx = config.padding_idx

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, attention_masks=None):
        as_cp_batch(attention_masks, type(self).__name__)
        if positions is None and self.config.first_attention is not None:
            raise ValueError(f"{type(self).__name__}: the attention layers need positions (each token's "
                             f"position in its document, [1, T_loc]) for RoPE")
        return super().forward(tokens, positions=positions, attention_masks=attention_masks)


# ---------------------------------------------------------------------------------------------- config
def _normal(std: float) -> dict:
    """FLA's initialisation of linears and convs (`_init_weights`): weight N(0, std), bias 0."""
    return {"weight": partial(nn.init.normal_, mean=0.0, std=std), "bias": nn.init.zeros_}


def _linear(in_features: int, out_features: int, std: float, bias: bool = False) -> Linear.Config:
    return Linear.Config(in_features=in_features, out_features=out_features, bias=bias, param_init=_normal(std))


def _a_log_init(param: torch.Tensor) -> None:
    """FLA's: A ~ U(0, 16), stored as log A."""
    with torch.no_grad():
        param.uniform_(0, 16).log_()


def _dt_bias_init(param: torch.Tensor) -> None:
    """FLA's: dt log-uniform in [1e-3, 1e-1] (floored at 1e-4), stored as softplus^-1(dt). In place
    (torchtitan initialises after FSDP, on DTensor shards)."""
    with torch.no_grad():
        param.uniform_().mul_(math.log(0.1) - math.log(0.001)).add_(math.log(0.001)).exp_().clamp_(min=1e-4)
        param.add_(torch.log(-torch.expm1(-param)))


def _fla_config(preset_or_config, vocab_size: int | None):
    """FLA's GatedDeltaNetConfig (or fla_cp's) of a preset / JSON path, or a copy of the one given."""
    from fla.models.gated_deltanet import GatedDeltaNetConfig

    from fla_cp.models import GatedDeltaNetCPConfig
    from fla_cp.utils.configs import build_config, model_type_of
    if isinstance(preset_or_config, str):
        if model_type_of(preset_or_config) is not None:
            raise ValueError(f"{preset_or_config!r} is a transformers Qwen config, not FLA's GatedDeltaNet: use "
                             f"fla_cp.integrations.torchtitan.qwen3_5 (torchtitan's Qwen3.5)")
        return build_config(preset_or_config, vocab_size or BYTE_VOCAB)
    if not isinstance(preset_or_config, GatedDeltaNetConfig):
        raise TypeError(f"gdn_text_config needs a preset name or FLA's GatedDeltaNetConfig, "
                        f"got {type(preset_or_config).__name__}")
    config = GatedDeltaNetCPConfig.from_fla(preset_or_config)        # a copy: the caller's stays as it is
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def unsupported_option(config) -> str | None:
    """The FLA config field (and why) this torchtitan model can't implement, or None."""
    refused = (
        ("use_short_conv", not config.use_short_conv, "False: the CP forward runs the q/k/v short convs"),
        ("use_gate", not config.use_gate, "False: the output norm is gated (torchtitan's GDN has in_proj_z)"),
        ("hidden_act", config.hidden_act != "swish", f"{config.hidden_act!r}: only 'swish' (SwiGLU) is built"),
        ("attnres_block_size", config.attnres_block_size is not None, "set: attention residuals are not built"),
        ("use_l2warp", config.use_l2warp, "True: torchtitan's loss is plain cross-entropy"),
    )
    for field, bad, why in refused:
        if bad:
            return f"config.{field}={why}"
    H, HV = config.num_heads, config.num_v_heads or config.num_heads
    if HV % H:
        return f"config.num_v_heads={HV} must be a multiple of num_heads={H} (GVA)"
    if config.head_dim * config.expand_v != int(config.head_dim * config.expand_v):
        return f"config.expand_v={config.expand_v} must make head_dim * expand_v an integer"
    for i in range(config.num_hidden_layers):
        spec = _attention_spec(config, i)
        if spec is not None and config.hidden_size % spec["num_heads"]:
            return (f"config.attn (layer {i}): num_heads={spec['num_heads']} must divide "
                    f"hidden_size={config.hidden_size}")
        if spec is not None and spec["num_heads"] % spec["num_kv_heads"]:
            return f"config.attn (layer {i}): num_kv_heads={spec['num_kv_heads']} must divide num_heads"
    return None


def _attention_spec(config, layer: int) -> dict | None:
    from fla.models.configuration_utils import get_attention_spec
    return get_attention_spec(config.attn, layer_idx=layer)


def _deltanet_config(config, std: float, backend: str) -> FLAGatedDeltaNet.Config:
    D, K = config.hidden_size, config.head_dim
    HV = config.num_v_heads or config.num_heads
    V = int(K * config.expand_v)
    key_dim, value_dim = config.num_heads * K, HV * V

    def conv(channels: int) -> Conv1d.Config:
        # depthwise and causal (the CP forward pads); FLA's layers have no conv bias
        return Conv1d.Config(in_channels=channels, out_channels=channels, kernel_size=config.conv_size,
                             groups=channels, padding=0, bias=False, param_init=_normal(std))

    return FLAGatedDeltaNet.Config(
        key_head_dim=K, value_head_dim=V, conv_kernel_size=config.conv_size,
        in_proj_q=_linear(D, key_dim, std), in_proj_k=_linear(D, key_dim, std),
        in_proj_v=_linear(D, value_dim, std), in_proj_z=_linear(D, value_dim, std),
        in_proj_a=_linear(D, HV, std), in_proj_b=_linear(D, HV, std),
        conv_q=conv(key_dim), conv_k=conv(key_dim), conv_v=conv(value_dim),
        kernel=GatedDeltaKernel.Config(),          # torchtitan's kernel slot: unused by the CP forward
        norm=FLAGatedRMSNorm.Config(dim=V, eps=config.norm_eps, activation=config.output_gate_activation,
                                    param_init={"weight": nn.init.ones_}),
        out_proj=_linear(value_dim, D, std),
        param_init={"A_log": _a_log_init, "dt_bias": _dt_bias_init},
        backend=backend, allow_neg_eigval=config.allow_neg_eigval)


def _attention_config(config, spec: dict, std: float, backend: str) -> FLAAttention.Config:
    D, H, Hkv = config.hidden_size, spec["num_heads"], spec["num_kv_heads"]
    head_dim = D // H                              # FLA's Attention derives it so
    bias = spec["qkv_bias"]
    inner = CPInnerAttention.Config(backend=attention_backend(backend), window_size=spec["window_size"])
    return FLAAttention.Config(
        n_heads=H, n_kv_heads=Hkv, head_dim=head_dim,
        q_proj=_linear(D, H * head_dim, std, bias), k_proj=_linear(D, Hkv * head_dim, std, bias),
        v_proj=_linear(D, Hkv * head_dim, std, bias), o_proj=_linear(H * head_dim, D, std),
        rope=FLARoPE.Config(dim=head_dim, max_seq_len=config.max_position_embeddings,
                            theta=float(spec["rope_theta"])),
        inner_attention=inner)


def _intermediate_size(config) -> int:
    """FLA's GatedMLP: `intermediate_size`, else 2/3 * hidden_ratio (default 4) * hidden_size rounded up to 256."""
    if config.intermediate_size is not None:
        return config.intermediate_size
    size = int(config.hidden_size * (config.hidden_ratio or 4) * 2 / 3)
    return 256 * ((size + 255) // 256)


def gdn_text_config(preset_or_config, backend: str = "auto",
                    vocab_size: int | None = None) -> GatedDeltaNetModel.Config:
    """The torchtitan model config of FLA's GatedDeltaNet config `preset_or_config`: a preset of
    `fla_cp.utils.configs` (`tiny`, `hybrid-tiny`, ..., or a JSON / checkpoint path; vocabulary `vocab_size`,
    default 258, the byte tokenizer's), or a `GatedDeltaNetConfig` (FLA's or fla_cp's; `vocab_size` replaces
    its own when given). `backend`: fla_cp's kernels, "auto" (Triton / flash on CUDA, torch on CPU),
    "triton" or "torch" (the config's own `backend` field is not read). Raises ValueError naming the
    config field of an FLA option not implemented here (`unsupported_option`)."""
    config = _fla_config(preset_or_config, vocab_size)
    error = unsupported_option(config)
    if error:
        raise ValueError(f"fla_cp's torchtitan GatedDeltaNet does not support {error}")
    D, std = config.hidden_size, config.initializer_range
    hidden = _intermediate_size(config)

    def norm() -> RMSNorm.Config:               # nn.RMSNorm's init: ones (FLA's)
        return RMSNorm.Config(normalized_shape=D, eps=config.norm_eps)

    layers = []
    for i in range(config.num_hidden_layers):
        spec = _attention_spec(config, i)
        layers.append(GatedDeltaNetBlock.Config(
            attention=_attention_config(config, spec, std, backend) if spec is not None else None,
            delta_net=_deltanet_config(config, std, backend) if spec is None else None,
            attn_norm=norm(), mlp_norm=norm(),
            mlp=FeedForward.Config(w1=_linear(D, hidden, std), w2=_linear(hidden, D, std),
                                   w3=_linear(D, hidden, std))))
    return GatedDeltaNetModel.Config(
        dim=D, vocab_size=config.vocab_size, layers=layers, norm=norm(),
        tok_embeddings=Embedding.Config(num_embeddings=config.vocab_size, embedding_dim=D,
                                        param_init={"weight": partial(nn.init.normal_, mean=0.0, std=std)}),
        lm_head=_linear(D, config.vocab_size, std),
        enable_weight_tying=bool(config.tie_word_embeddings), padding_idx=config.pad_token_id)


def gdn_model_spec(preset, backend: str = "auto", vocab_size: int | None = None, name: str | None = None) -> ModelSpec:
    """A torchtitan ModelSpec of `preset` (a preset name or an FLA config: see `gdn_text_config`) with fla_cp's
    parallelize_fn and the FLA checkpoint adapter."""
    from fla_cp.integrations.torchtitan.parallelize import parallelize_cp
    from fla_cp.integrations.torchtitan.state_dict import GatedDeltaNetStateDictAdapter
    return ModelSpec(name="fla_cp_gated_deltanet", flavor=name or (preset if isinstance(preset, str) else "custom"),
                     model=gdn_text_config(preset, backend=backend, vocab_size=vocab_size),
                     parallelize_fn=parallelize_cp, pipelining_fn=None, post_optimizer_build_fn=None,
                     state_dict_adapter=GatedDeltaNetStateDictAdapter)
