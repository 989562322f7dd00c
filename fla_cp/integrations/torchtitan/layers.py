"""CP token mixers for torchtitan models: drop-in subclasses of torchtitan's modules (same parameters).

`CPGatedDeltaNet` is torchtitan's Qwen3.5 `GatedDeltaNet` with its forward replaced by fla_cp's CP
forward (`GatedDeltaCPMixin`: the conv halo, the operator with its one state all-gather, the document
boundaries); it also runs on CPU, where torchtitan's own layer (FLA's Triton kernels) can't. Its parameters,
initialisation and names are torchtitan's, so seed checkpoints and torchtitan's HF state-dict adapter work
unchanged. `CPInnerAttention` is an inner attention (torchtitan's `inner_attention` slot) computing
`fla_cp.ops.attention_cp`: exact causal attention within documents over the CP group (one process: within
the packed documents).

Both read the batch's `CPBatch` from the `attention_masks` torchtitan hands them (`batch.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchtitan.models.qwen3_5.model import GatedDeltaNet
from torchtitan.protocols.module import Module

from fla_cp.integrations.torchtitan.batch import as_cp_batch
from fla_cp.layers.gated_delta_cp import GatedDeltaCPMixin
from fla_cp.ops import attention_cp


class CPGatedDeltaNet(GatedDeltaCPMixin, GatedDeltaNet):
    """torchtitan's Qwen3.5 GatedDeltaNet under exact CP (module docstring). `x` is this rank's `[1, T_loc, D]`."""

    @dataclass(kw_only=True, slots=True)
    class Config(GatedDeltaNet.Config):
        backend: str = "auto"
        """fla_cp's kernels for the operator and the conv: "auto" (Triton on CUDA, torch on CPU), "triton", "torch"."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.backend = config.backend

    def forward(self, x_BLD: torch.Tensor, attention_masks=None) -> torch.Tensor:
        batch = as_cp_batch(attention_masks, type(self).__name__)
        o, _, _ = self.run_gated_delta(x_BLD, cp=batch.cp, cu_seqlens=batch.cu_seqlens if batch.cp is None else None)
        return o

    # ------------------------------------------------------------------ GatedDeltaCPMixin's hooks
    def gdn_sizes(self) -> tuple[int, int, int, int, int, int]:
        K, V = self.key_head_dim, self.value_head_dim
        return (self.in_proj_q.in_features, self.in_proj_q.out_features // K, self.in_proj_v.out_features // V,
                K, V, self.conv_kernel_size)

    def _cp_project(self, h):
        """Conv channels `[q | k | v]` (the three depthwise convs are one conv over them); extras z, a, b."""
        conv_in = torch.cat([self.in_proj_q(h), self.in_proj_k(h), self.in_proj_v(h)], dim=-1)
        return conv_in, (self.in_proj_z(h), self.in_proj_a(h), self.in_proj_b(h))

    def _cp_conv_params(self):
        convs = (self.conv_q, self.conv_k, self.conv_v)
        weight = torch.cat([c.weight for c in convs], dim=0).squeeze(1)        # [C, W]
        bias = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
        return weight, bias, "silu"

    def _cp_qkv_gates(self, conv_out, h, extras):
        B, T, _ = conv_out.shape
        _, a, b = extras
        key_dim, value_dim = self.in_proj_q.out_features, self.in_proj_v.out_features
        q, k, v = torch.split(conv_out, [key_dim, key_dim, value_dim], dim=-1)
        q = q.reshape(B, T, -1, self.key_head_dim)
        k = k.reshape(B, T, -1, self.key_head_dim)
        v = v.reshape(B, T, -1, self.value_head_dim)
        # torchtitan's gates, in fp32 (model.py: g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b))
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias)
        return q, k, v, g, self._beta(b, h.dtype)

    def _beta(self, b, dtype):
        """The write strength from `b` `[B, T, HV]`: torchtitan's `sigmoid(b)`, in b's dtype."""
        return torch.sigmoid(b)

    def _cp_output(self, o, h, extras):
        z = extras[0]
        B, T = o.shape[:2]
        o = self.norm(o, z.reshape(B, T, -1, self.value_head_dim))
        return self.out_proj(o.reshape(B, T, -1))


def attention_backend(backend: str) -> str:
    """The attention kernels' name for a model-wide `backend`: they have no "triton" (GDN's choice), so
    that means "auto" for them, as in fla_cp's HF models."""
    return "auto" if backend == "triton" else backend


class CPInnerAttention(Module):
    """Causal softmax attention within documents, exact under CP (`fla_cp.ops.attention_cp`); with
    `window_size` W a query at t sees keys t-W+1 .. t of its document.

    `q` `[1, T_loc, H, D]`, `k`, `v` `[1, T_loc, Hkv, D]` (GQA native) -> `[1, T_loc, H, D]`."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        backend: str = "auto"
        """Each part's kernel: "auto" (flash-attn / SDPA on CUDA, torch on CPU), "torch", "sdpa", "flash"."""

        window_size: int | None = None
        """Sliding window (FLA's `window_size`); None: full causal attention."""

    def __init__(self, config: Config):
        super().__init__()
        self.backend = config.backend
        self.window_size = config.window_size

    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        batch = as_cp_batch(attention_masks, type(self).__name__)
        return attention_cp(q, k, v, batch.cp, causal=True, scale=scale, window_size=self.window_size,
                            cu_seqlens=batch.cu_seqlens if batch.cp is None else None,
                            backend=self.backend, verify_agreement=False)


def set_cp_backend(config, backend: str) -> None:
    """Set the kernels of every CP module config inside a model config (nested dataclasses and lists), in place:
    `backend` for `CPGatedDeltaNet`, `attention_backend(backend)` for `CPInnerAttention`."""
    if isinstance(config, (list, tuple)):
        for item in config:
            set_cp_backend(item, backend)
        return
    if not dataclasses.is_dataclass(config):
        return
    if isinstance(config, CPGatedDeltaNet.Config):
        config.backend = backend
    elif isinstance(config, CPInnerAttention.Config):
        config.backend = attention_backend(backend)
    for field in dataclasses.fields(config):
        set_cp_backend(getattr(config, field.name), backend)
