"""The contract between the CP orchestration (`fla_cp/ops/chunk_cp.py`) and a local backend.

The orchestration decides *which* states cross ranks; a backend only computes local pieces on this
rank's tokens. Every backend call sees one flattened, packed stream:

    q, k   [1, T, H, K]        v  [1, T, HV, V]        g (log-decay), beta  [1, T, HV]
    cu_seqlens  [S+1] int64    boundaries of the S local segments (a dense batch of B rows is
                               flattened to one stream whose segments never cross a row)

A *segment* is a maximal run of local tokens of one global sequence inside one CP part; it may start
with a state handed in (`h0`) and its end state may be handed on. States are fp32 `[S, HV, K, V]`.

Methods (all fp32 in the state dimensions, whatever the input dtype):

    prepare(q, k, v, g, beta, cu_seqlens, scale, for_backward=False, kept=()) -> prep
        Local work shared by every pass (gate cumsum, WY representation, ...). With
        `for_backward=True` the prep may keep what `backward` needs (e.g. an autograd graph), and
        `kept` is what `kept(prep)` returned for the forward's prep.
    kept(prep) -> tuple of tensors
        What of the forward's prep the autograd Function saves for backward, so that the backward
        prepare need not redo all of it (the triton backend keeps FLA's gate cumsum and (I + A)^-1,
        as FLA's own op does); may be empty.
    summarize(prep, segments, with_m) -> [n, HV, K, V (+K)]
        For each listed segment, its end state started from zero (`H`), and when `with_m` the
        transition `M` (`[..., V:]`, K x K) so that `S_end = M @ S_start + H` (DESIGN.md §1).
    forward(prep, h0) -> (o [1, T, HV, V] in q's dtype, ht [S, HV, K, V] fp32)
        The ordinary chunk forward with per-segment initial states `h0` ([S, HV, K, V] or None).
    state_grad(prep, do, segments, with_m) -> [n, HV, K, V (+K)]
        For each listed segment, `G = dS_start` computed with `dS_end = 0` from the output
        gradient `do` alone, and when `with_m` the same transition `M` as `summarize` (not Mᵀ), so
        that `dS_start = Mᵀ @ dS_end + G` (DESIGN.md §3).
    backward(prep, h0, do, dht) -> (dq, dk, dv, dg, dbeta, dh0)
        The ordinary chunk backward with per-segment initial states `h0` and end-state gradients
        `dht` ([S, HV, K, V] or None); dh0 is [S, HV, K, V] fp32.

Optional:

    check_device(device, world_size) -> None
        Raise ValueError if the backend cannot run a call of `world_size` ranks on `device` (the triton
        backend's summary kernels off CUDA without Triton's interpreter, for world_size > 1).
        `get_backend` calls it, so the op reports the problem in its agreement check, on every rank,
        before any collective.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class LocalBackend(Protocol):
    name: str

    def prepare(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        cu_seqlens: torch.Tensor,
        scale: float,
        for_backward: bool = False,
        kept: tuple[torch.Tensor, ...] = (),
    ) -> Any: ...

    def kept(self, prep: Any) -> tuple[torch.Tensor, ...]: ...

    def summarize(self, prep: Any, segments: list[int], with_m: bool) -> torch.Tensor: ...

    def forward(self, prep: Any, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_grad(self, prep: Any, do: torch.Tensor, segments: list[int], with_m: bool) -> torch.Tensor: ...

    def backward(
        self, prep: Any, h0: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]: ...
