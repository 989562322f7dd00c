"""Triton local backend: FLA 0.6's chunk kernels for the local GDN compute, our kernels for summaries.

On CUDA
    prepare   FLA's `chunk_local_cumsum` (log2 units) + `chunk_gated_delta_rule_fwd_intra` -> g, w, u, A
    forward   FLA's `chunk_gated_delta_rule_fwd_h` (per-segment h0) + `chunk_fwd_o`
    backward  FLA's `chunk_gated_delta_rule_bwd` pieces (fwd_h, bwd_dv_local, bwd_dhu with dht and h0,
              bwd_dqkwg, prepare_wy_repr_bwd, reverse cumsum) without its cp_context branch
    summarize / state_grad   `fla_cp.ops.triton.chunk_summary_fwd / _bwd` on the same g, w, u.

Elsewhere (CPU, where our kernels run in Triton's interpreter) prepare/forward/backward delegate to
the torch backend by default, while summarize/state_grad still run our Triton kernels, fed with g, w,
u in FLA's meaning and layout taken from the torch backend's prep (`fla_layout`). With
`local_kernels="fla"` the CUDA path itself runs on CPU: FLA's kernels in the interpreter (see
`fla_cp.utils.triton_interpreter`; slow, for tests of this file's FLA calls).

See `fla_cp/ops/backends/base.py` for the contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fla_cp.ops.backends.torch_backend import TorchBackend, from_chunks
from fla_cp.ops.triton import chunk_summary_bwd, chunk_summary_fwd

CHUNK = 64
RCP_LN2 = 1.4426950216  # FLA's constant: its kernels keep the gate cumsum in log2 units


@dataclass
class TritonPrep:
    """Token-layout pieces for our summary kernels (and FLA's chunk kernels on CUDA)."""
    q: torch.Tensor                  # [1, T, H, K]
    k: torch.Tensor                  # [1, T, H, K]
    v: torch.Tensor                  # [1, T, HV, V]
    beta: torch.Tensor               # [1, T, HV]
    g: torch.Tensor                  # [1, T, HV] fp32 chunk-local cumsum, log2 units
    w: torch.Tensor                  # [1, T, HV, K]
    u: torch.Tensor                  # [1, T, HV, V]
    cu_seqlens: torch.Tensor         # [S+1] int64 on the data's device
    scale: float
    chunk_size: int
    A: torch.Tensor | None = None            # [1, T, HV, BT] (I + A)^{-1}, CUDA only
    chunk_indices: torch.Tensor | None = None  # CUDA only
    local: Any = None                # the torch backend's prep, CPU only


def fla_layout(prep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch backend's chunked prep in FLA's token layout, what our kernels read:
    g `[1, T, HV]` (chunk-local cumsum in log2 units), w `[1, T, HV, K]`, u `[1, T, HV, V]`, fp32."""
    def tokens(x):
        return from_chunks(x.detach(), prep.seg_len).unsqueeze(0).contiguous()
    return tokens(prep.gamma.unsqueeze(-1)).squeeze(-1) * RCP_LN2, tokens(prep.w), tokens(prep.u)


def wy_prep_torch(k, v, g, beta, cu_seqlens, chunk_size: int = CHUNK):
    """FLA's prep (g, w, u of the WY form, see `fla_layout`) computed by the torch backend.
    k `[1, T, H, K]`, v `[1, T, HV, V]`, g, beta `[1, T, HV]`, cu_seqlens `[S+1]`."""
    # q only enters the output terms of the prep, which are not used here
    return fla_layout(TorchBackend(chunk_size).prepare(k, k, v, g, beta, cu_seqlens, scale=1.0))


LOCAL_KERNELS = ('auto', 'fla', 'torch')


def _interpreted_error(device: torch.device) -> str | None:
    """Why our summary kernels cannot run on `device`, or None: off CUDA they run only in Triton's
    interpreter, chosen when they are decorated (when `fla_cp.ops.triton` is first imported)."""
    if device.type == 'cuda':
        return None
    from fla_cp.ops.triton.chunk_summary import chunk_summary_fwd_kernel
    from fla_cp.utils.triton_interpreter import is_interpreted
    if is_interpreted(chunk_summary_fwd_kernel):
        return None
    return (f"backend='triton' needs CUDA tensors (got {device.type}), or TRITON_INTERPRET=1 set before "
            "fla_cp's Triton kernels are first imported (tests); use backend='torch'")


def _check_fla_interpreted():
    """FLA's kernels off CUDA only run in Triton's interpreter, which is chosen when they are imported."""
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as kernel

    from fla_cp.utils.triton_interpreter import require_interpreted
    require_interpreted(kernel, "TritonBackend(local_kernels='fla')")


class TritonBackend:
    """FLA's chunk kernels + fla_cp's summary kernels; see `base.py` for the contract.

    local_kernels: who computes the local chunk forward/backward: "auto" (FLA's kernels on CUDA, the
    torch backend elsewhere), "fla" (FLA's kernels on any device; on CPU in Triton's interpreter,
    which must have been on when FLA was imported), "torch".
    """
    name = 'triton'

    def __init__(self, chunk_size: int = CHUNK, local_kernels: str = 'auto'):
        if local_kernels not in LOCAL_KERNELS:
            raise ValueError(f"local_kernels must be one of {LOCAL_KERNELS}, got {local_kernels!r}")
        # FLA's chunk kernels take 16, 32 or 64; tl.arange (ours and theirs) needs a power of two, and
        # tl.dot blocks of at least 16
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 \
                or chunk_size & (chunk_size - 1):
            raise ValueError(f"TritonBackend: chunk_size must be a power of two >= 16, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.local_kernels = local_kernels
        self._torch = None

    # -- CPU / interpreter delegate -------------------------------------------------------------
    @property
    def torch_backend(self):
        if self._torch is None:
            self._torch = TorchBackend(chunk_size=self.chunk_size)
        return self._torch

    def _on_fla(self, x: torch.Tensor) -> bool:
        if self.local_kernels == 'auto':
            return x.is_cuda
        if self.local_kernels == 'fla' and not x.is_cuda:
            _check_fla_interpreted()
        return self.local_kernels == 'fla'

    def check_device(self, device: torch.device, world_size: int = 1) -> None:
        """Refuse a device our kernels cannot run on (called by `get_backend`, so the op reports it in
        its agreement check, before any collective). Our summary kernels run only for a group of
        several ranks: one rank's call off CUDA computes locally with the torch backend, as it always has."""
        error = _interpreted_error(device) if world_size > 1 else None
        if error is None and self.local_kernels == 'fla' and device.type != 'cuda':
            try:
                _check_fla_interpreted()
            except RuntimeError as e:
                error = str(e)
        if error:
            raise ValueError(error)

    # -- contract -------------------------------------------------------------------------------
    def kept(self, prep: TritonPrep) -> tuple:
        # FLA's own trade: keep the gate cumsum and (I + A)^-1 ([T, HV, BT]), recompute only w, u
        return () if prep.local is not None else (prep.g, prep.A)

    def prepare(self, q, k, v, g, beta, cu_seqlens, scale, for_backward=False, kept=()) -> TritonPrep:
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.long)
        if self._on_fla(q):
            return self._prepare_fla(q, k, v, g, beta, cu_seqlens, scale, kept)
        local = self.torch_backend.prepare(q, k, v, g, beta, cu_seqlens, scale, for_backward=for_backward)
        gl, w, u = fla_layout(local)
        # our kernels see fp32 here: the interpreter has no bf16 math and the delegate is fp32 inside
        return TritonPrep(q=q.float(), k=k.float(), v=v, beta=beta, g=gl, w=w, u=u, cu_seqlens=cu_seqlens,
                          scale=scale, chunk_size=self.chunk_size, local=local)

    def summarize(self, prep: TritonPrep, segments: list[int], with_m: bool) -> torch.Tensor:
        return chunk_summary_fwd(prep.k, prep.w, prep.u, prep.g, prep.cu_seqlens, segments, with_m,
                                 chunk_size=prep.chunk_size)

    def state_grad(self, prep: TritonPrep, do: torch.Tensor, segments: list[int], with_m: bool) -> torch.Tensor:
        do = do.to(prep.q.dtype).contiguous()
        return chunk_summary_bwd(prep.q, prep.k, prep.w, prep.g, do, prep.cu_seqlens, segments,
                                 prep.scale, with_m, chunk_size=prep.chunk_size)

    def forward(self, prep: TritonPrep, h0):
        if prep.local is not None:
            return self.torch_backend.forward(prep.local, h0)
        return self._forward_fla(prep, h0)

    def backward(self, prep: TritonPrep, h0, do, dht):
        if prep.local is not None:
            return self.torch_backend.backward(prep.local, h0, do, dht)
        return self._backward_fla(prep, h0, do, dht)

    # -- FLA's chunk kernels (CUDA) ------------------------------------------------------------
    def _prepare_fla(self, q, k, v, g, beta, cu_seqlens, scale, kept=()) -> TritonPrep:
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.index import prepare_chunk_indices
        BT = self.chunk_size
        chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
        if kept:   # backward: the forward's cumsum and (I + A)^-1 give w, u in one kernel
            gl, A = kept
            w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=gl, cu_seqlens=cu_seqlens,
                                     chunk_indices=chunk_indices)
        else:
            gl = chunk_local_cumsum(g, chunk_size=BT, scale=RCP_LN2, cu_seqlens=cu_seqlens,
                                    chunk_indices=chunk_indices)
            w, u, A = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=gl, beta=beta, cu_seqlens=cu_seqlens,
                                                       chunk_indices=chunk_indices, chunk_size=BT)
        return TritonPrep(q=q, k=k, v=v, beta=beta, g=gl, w=w, u=u, cu_seqlens=cu_seqlens, scale=scale,
                          chunk_size=BT, A=A, chunk_indices=chunk_indices)

    def _forward_fla(self, prep: TritonPrep, h0):
        h0 = None if h0 is None else h0.contiguous()   # FLA's kernels read states as dense memory
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_fwd_o
        h, v_new, ht = chunk_gated_delta_rule_fwd_h(
            k=prep.k, w=prep.w, u=prep.u, g=prep.g, initial_state=h0, output_final_state=True,
            cu_seqlens=prep.cu_seqlens, chunk_indices=prep.chunk_indices, chunk_size=prep.chunk_size)
        o = chunk_fwd_o(q=prep.q, k=prep.k, v=v_new, h=h, g=prep.g, scale=prep.scale, cu_seqlens=prep.cu_seqlens,
                        chunk_indices=prep.chunk_indices, chunk_size=prep.chunk_size)
        return o.to(prep.q.dtype), ht

    def _backward_fla(self, prep: TritonPrep, h0, do, dht):
        """`chunk_gated_delta_rule_bwd` of FLA 0.6 minus its cp_context branch; w, u come from the
        backward prep (`recompute_w_u_fwd` on the kept A, as in FLA)."""
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd
        from fla.ops.utils import chunk_local_cumsum
        q, k, v, g, beta, A = prep.q, prep.k, prep.v, prep.g, prep.beta, prep.A
        cu, ci, BT, scale = prep.cu_seqlens, prep.chunk_indices, prep.chunk_size, prep.scale
        do = do.to(q.dtype).contiguous()
        h0, dht = (None if x is None else x.contiguous() for x in (h0, dht))
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(
            k=k, w=prep.w, u=prep.u, g=g, initial_state=h0, output_final_state=False,
            cu_seqlens=cu, chunk_indices=ci, chunk_size=BT)
        dv = chunk_bwd_dv_local(q=q, k=k, g=g, do=do, scale=scale, cu_seqlens=cu, chunk_indices=ci, chunk_size=BT)
        dh, dh0, dv = chunk_gated_delta_rule_bwd_dhu(
            q=q, k=k, w=prep.w, g=g, h0=h0, dht=dht, do=do, dv=dv, scale=scale,
            cu_seqlens=cu, chunk_indices=ci, chunk_size=BT)
        dq, dk, dw, dg = chunk_bwd_dqkwg(
            q=q, k=k, v=v_new, w=prep.w, g=g, h=h, dv=dv, do=do, dh=dh, scale=scale,
            cu_seqlens=cu, chunk_indices=ci, chunk_size=BT)
        dk2, dv, db, dg2 = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g, A=A, dw=dw, du=dv,
                                                cu_seqlens=cu, chunk_indices=ci)
        dk.add_(dk2)
        dg.add_(dg2)
        dg = chunk_local_cumsum(dg, chunk_size=BT, reverse=True, cu_seqlens=cu, chunk_indices=ci)
        return dq, dk, dv, dg, db, dh0
