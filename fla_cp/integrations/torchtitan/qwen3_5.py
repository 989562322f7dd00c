"""torchtitan's own Qwen3.5 (text) under fla_cp's CP.

The model is torchtitan's `Qwen35Model` with its vision encoder left out (`Qwen35TextModel`) and two module
swaps made in the config, so that the one-process reference, the seed checkpoint and every CP run build the
same modules: each GatedDeltaNet becomes `CPGatedDeltaNet` and each attention's inner attention
`CPInnerAttention`. Parameters, names and initialisation stay torchtitan's.

    qwen3_5_text_config("0.8B")        # any of torchtitan's flavors (vision encoder dropped)
    qwen3_5_text_config("tiny")        # a few hundred thousand parameters, for CPU checks
    qwen3_5_model_spec("tiny")         # a torchtitan ModelSpec with fla_cp's parallelize_fn
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchtitan.models import qwen3_5 as tt_qwen3_5
from torchtitan.models.common import Embedding, Linear
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.qwen3_5.model import Qwen35Model
from torchtitan.models.qwen3_5.rope import MRoPE
from torchtitan.models.qwen3_5.vision_encoder import Qwen35VisionEncoder
from torchtitan.protocols.model_spec import ModelSpec

from fla_cp.integrations.torchtitan.batch import as_cp_batch
from fla_cp.integrations.torchtitan.layers import CPGatedDeltaNet, CPInnerAttention, attention_backend


class Qwen35TextModel(Qwen35Model):
    """torchtitan's Qwen3.5 without its vision encoder: tokens -> logits (or hidden states under
    torchtitan's chunked loss). Text batches use the 2-D `positions` for RoPE, as torchtitan's model does."""

    @dataclass(kw_only=True, slots=True)
    class Config(Qwen35Model.Config):
        vision_encoder: Qwen35VisionEncoder.Config | None = None

        def update_from_config(self, *, config, **kwargs) -> None:
            # torchtitan's Qwen3.5 adds tensor-parallel sharding annotations (and its vision encoder's);
            # fla_cp's parallelize_fn refuses TP, so only the Decoder's part applies (RoPE length, checks)
            Decoder.Config.update_from_config(self, config=config, **kwargs)

    def __init__(self, config: Config):
        if config.vision_encoder is not None:
            raise ValueError("Qwen35TextModel is text only: config.vision_encoder must be None")
        Decoder.__init__(self, config)
        self.vision_encoder = None
        self.spatial_merge_size = None

    def forward(self, tokens: torch.Tensor, *, attention_masks=None, positions: torch.Tensor | None = None,
                **multimodal) -> torch.Tensor:
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given:
            raise ValueError(f"Qwen35TextModel is text only; got {given}")
        if positions is None:
            raise ValueError("Qwen35TextModel needs positions (per-document RoPE positions of the local tokens)")
        as_cp_batch(attention_masks, type(self).__name__)
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x, attention_masks, positions)
        x = self.norm(x)
        return x if self._skip_lm_head else self.lm_head(x)


def _replace_config(config, cls, **changes):
    """`config`'s fields in an instance of its subclass `cls` (nested `Config` of our module)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values.update(changes)
    return cls(**values)


def with_cp_layers(model_config: Qwen35Model.Config, backend: str = "auto") -> Qwen35TextModel.Config:
    """A copy of a torchtitan Qwen3.5 config with fla_cp's CP modules and no vision encoder."""
    layers = []
    for i, layer in enumerate(model_config.layers):
        if layer.moe is not None:
            raise ValueError(f"layer {i} is MoE: torchtitan's Qwen3.5-MoE is not supported under fla_cp's CP yet "
                             f"(docs/torchtitan.md, limits)")
        layer = dataclasses.replace(layer)
        if layer.delta_net is not None:
            layer.delta_net = _replace_config(layer.delta_net, CPGatedDeltaNet.Config, backend=backend)
        if layer.attention is not None:
            layer.attention = dataclasses.replace(layer.attention,
                                                  inner_attention=CPInnerAttention.Config(backend=attention_backend(backend)))
        layers.append(layer)
    return _replace_config(model_config, Qwen35TextModel.Config, layers=layers, vision_encoder=None)


def _tiny(attn_backend: str = "flex") -> Qwen35Model.Config:
    """8 layers (6 GDN + 2 gated attention), dim 64, GVA 2:4 GDN heads, GQA 4:2 attention, partial RoPE,
    byte vocabulary (258): seconds per step on CPU."""
    q = tt_qwen3_5
    dim, vocab = 64, 258
    return Qwen35Model.Config(
        vocab_size=vocab, dim=dim, norm=q._offset_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=q._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=q._output_linear_init(dim)),
        layers=q._build_qwen35_layers(
            rope=MRoPE.Config(dim=8, max_seq_len=4096, theta=10_000_000.0, mrope_section=[2, 1, 1]),
            attn_backend=attn_backend, n_layers=8, dim=dim, n_heads=4, n_kv_heads=2, head_dim=16,
            rotary_dim=8, hidden_dim=128, n_key_heads=2, n_value_heads=4, key_head_dim=16, value_head_dim=16),
        vision_encoder=None,
    )


# torchtitan's dense flavors (its MoE ones are refused by with_cp_layers)
FLAVORS = {"tiny": _tiny, **{name: build for name, build in tt_qwen3_5.qwen3_5_configs.items()
                             if "moe" not in name and "-A" not in name}}


def qwen3_5_text_config(flavor: str, backend: str = "auto") -> Qwen35TextModel.Config:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown Qwen3.5 flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    return with_cp_layers(FLAVORS[flavor](attn_backend="flex"), backend=backend)


def qwen3_5_model_spec(flavor, backend: str = "auto", name: str | None = None) -> ModelSpec:
    """torchtitan's Qwen3.5 ModelSpec with the CP modules, fla_cp's parallelize_fn and a text-only adapter.
    `flavor`: a name of `FLAVORS`, or a `Qwen35TextModel.Config` (then `name` names it)."""
    from fla_cp.integrations.torchtitan.parallelize import parallelize_cp
    from fla_cp.integrations.torchtitan.state_dict import Qwen35TextStateDictAdapter
    model = qwen3_5_text_config(flavor, backend) if isinstance(flavor, str) else flavor
    base = tt_qwen3_5.model_registry("debugmodel")
    return dataclasses.replace(base, flavor=name or (flavor if isinstance(flavor, str) else "custom"), model=model,
                               parallelize_fn=parallelize_cp, pipelining_fn=None,
                               state_dict_adapter=Qwen35TextStateDictAdapter)
