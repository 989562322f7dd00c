"""Per-token pieces of a GatedDeltaNet block that must also run on CPU.

FLA's fused modules (`RMSNorm`, `FusedRMSNormGated`, `GatedMLP` with `fuse_swiglu`, the short
convolution) are Triton-only: on a machine without a GPU driver they fail at the first call. We keep
FLA's modules as the *parameter containers* (so names and shapes are FLA's by construction) and call
them on CUDA; elsewhere we compute the same math in PyTorch, following FLA's reference functions
(`rms_norm_ref`, the gated-norm kernel, `swiglu`): statistics in fp32, result in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.ops.gated_delta_rule.gate import naive_gdn_gate


def _fused_ok(x: torch.Tensor) -> bool:
    # FLA's Triton kernels need a GPU driver; everything else takes the PyTorch path.
    return x.is_cuda


def _normalize(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """fp32 `x / rms(x) * weight` with FLA's norm module's eps and weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight.float() if norm.weight is not None else y


def rms_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
    """`norm(x, residual, prenorm)` for FLA's `RMSNorm` or `torch.nn.RMSNorm`, on any device.

    With `prenorm`, returns `(norm(x + residual), x + residual)` like FLA's fused prenorm path.
    """
    if isinstance(norm, nn.RMSNorm):
        if residual is not None:
            x = x + residual
        y = norm(x)
        return (y, x) if prenorm else y
    if _fused_ok(x):
        return norm(x, residual=residual, prenorm=prenorm) if prenorm else norm(x, residual=residual)
    dtype = x.dtype
    if residual is not None:
        x = (x.float() + residual.float()).to(dtype)
    y = _normalize(x, norm)
    if getattr(norm, "bias", None) is not None:
        y = y + norm.bias.float()
    y = y.to(dtype)
    return (y, x) if prenorm else y


def rms_norm_gated(norm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """FLA's `FusedRMSNormGated`: `rmsnorm(x) * weight * act(g)`, act = swish/silu or sigmoid."""
    if _fused_ok(x):
        return norm(x, g)
    gf = g.float()
    y = _normalize(x, norm) * (F.silu(gf) if norm.activation in ("swish", "silu") else torch.sigmoid(gf))
    return y.to(x.dtype)


def gated_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FLA's `GatedMLP` (swish/silu): `down(silu(gate(x)) * up(x))`."""
    if _fused_ok(x):
        return mlp(x)
    if mlp.hidden_act not in ("swish", "silu"):
        raise NotImplementedError(f"hidden_act={mlp.hidden_act!r} has no CPU path; use swish")
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None) -> torch.Tensor:
    """Log-decay of GDN, `-exp(A_log) * softplus(a + dt_bias)`, fp32: FLA's torch reference."""
    return naive_gdn_gate(a, A_log, dt_bias, output_dtype=torch.float32)
