"""Triton local backend: FLA 0.6's chunk kernels for the local GDN compute, our kernels for summaries.

On CUDA
    prepare   FLA's `chunk_local_cumsum` (log2 units) + `chunk_gated_delta_rule_fwd_intra` -> g, w, u, A
    forward   FLA's `chunk_gated_delta_rule_fwd_h` (per-segment h0) + `chunk_fwd_o`
    backward  FLA's `chunk_gated_delta_rule_bwd` pieces (fwd_h, bwd_dv_local, bwd_dhu with dht and h0,
              bwd_dqkwg, prepare_wy_repr_bwd, reverse cumsum) without its cp_context branch
    summarize / state_grad   `fla_cp.ops.triton.chunk_summary_fwd / _bwd` on the same g, w, u.

Off CUDA the same path runs in Triton's interpreter only (tests): FLA's kernels and ours must have
been imported with TRITON_INTERPRET=1 and FLA's need the interpreter patches of
`scripts/triton_patches.py`, which fla_cp never applies itself (`fla_cp.utils.triton_interpreter`
checks for them; slow). Tests of our summary kernels alone may instead delegate prepare / forward /
backward to the torch backend off CUDA (the private `_local="auto"`, see `TritonBackend`):
summarize / state_grad then run our kernels on g, w, u in FLA's meaning and layout taken from the
torch backend's prep (`fla_layout`).

See `fla_cp/ops/backends/base.py` for the contract.
"""
from __future__ import annotations

import warnings
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


# deprecated `local_kernels=` -> the private `_local` (one vocabulary: fla_cp.ops.backends.BACKENDS)
_LOCAL_KERNELS = {'fla': 'triton', 'auto': 'auto', 'torch': 'torch'}
WHO = "backend='triton'"


def _fla_kernel():
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as kernel
    return kernel


def _off_cuda_error(device: torch.device, fla: bool, ours: bool) -> str | None:
    """Why the kernels a call runs off CUDA (FLA's chunk kernels with `fla`, our summary kernels with
    `ours`) cannot run on `device`, or None. Off CUDA they run only in Triton's interpreter, chosen when
    they are decorated (first imported), and FLA's need the interpreter patches that fla_cp does not
    apply (`scripts/triton_patches.py`). Checks only."""
    if device.type == 'cuda':
        return None
    from fla_cp.utils.triton_interpreter import interpreter_patched, is_interpreted
    kernels = []
    if fla:
        kernels.append(_fla_kernel())
    if ours:
        from fla_cp.ops.triton.chunk_summary import chunk_summary_fwd_kernel
        kernels.append(chunk_summary_fwd_kernel)
    if not all(is_interpreted(k) for k in kernels):
        return (f"{WHO} needs CUDA tensors (got {device.type}): off CUDA it runs FLA's and fla_cp's Triton "
                "kernels in Triton's interpreter only (tests), so set TRITON_INTERPRET=1 before FLA is first "
                "imported; or use backend='torch'")
    if fla and not interpreter_patched():
        return (f"{WHO} off CUDA runs FLA's kernels in Triton's interpreter, which needs process-wide "
                "interpreter patches that fla_cp does not apply itself: call enable_fla_kernels_in_interpreter() "
                "from scripts/triton_patches.py first (tests: tests/cp/_interpret.py); or use backend='torch'")
    return None


class TritonBackend:
    """FLA's chunk kernels + fla_cp's summary kernels, what `backend="triton"` runs; see `base.py` for
    the contract. On CUDA, or off CUDA in Triton's interpreter (tests; see the module docstring).

    local_kernels: deprecated (one release; FutureWarning). "fla" is the default now; "auto" (the torch
        backend's local compute off CUDA) and "torch" (always) remain only for tests, through the
        private `_local` ("triton" default, "auto" or "torch": who computes the local chunk
        forward/backward; our kernels always compute the summaries). Use backend="torch" for PyTorch.
    """
    name = 'triton'

    def __init__(self, chunk_size: int = CHUNK, local_kernels: str | None = None, *, _local: str = 'triton'):
        if local_kernels is not None:
            if local_kernels not in _LOCAL_KERNELS:
                raise ValueError(f"local_kernels must be one of {tuple(_LOCAL_KERNELS)}, got {local_kernels!r}")
            warnings.warn("TritonBackend(local_kernels=...) is deprecated (removed in the next release): "
                          "TritonBackend() / backend='triton' runs FLA's kernels on every device now (off CUDA in "
                          "Triton's interpreter), what local_kernels='fla' did; for PyTorch compute use "
                          "backend='torch'", FutureWarning, stacklevel=2)
            _local = _LOCAL_KERNELS[local_kernels]
        if _local not in ('auto', 'triton', 'torch'):
            raise ValueError(f"_local must be one of ('auto', 'triton', 'torch'), got {_local!r}")
        # FLA's chunk kernels take 16, 32 or 64; tl.arange (ours and theirs) needs a power of two, and
        # tl.dot blocks of at least 16
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 \
                or chunk_size & (chunk_size - 1):
            raise ValueError(f"TritonBackend: chunk_size must be a power of two >= 16, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._local = _local
        self._torch = None

    # -- CPU / interpreter delegate -------------------------------------------------------------
    @property
    def torch_backend(self):
        if self._torch is None:
            self._torch = TorchBackend(chunk_size=self.chunk_size)
        return self._torch

    def _fla_local(self, device: torch.device) -> bool:
        """Whether FLA's kernels compute the local chunks on `device` (else the torch backend)."""
        return self._local == 'triton' or self._local == 'auto' and device.type == 'cuda'

    def _on_fla(self, x: torch.Tensor) -> bool:
        if not self._fla_local(x.device):
            return False
        if not x.is_cuda:
            error = _off_cuda_error(x.device, fla=True, ours=False)
            if error:
                raise RuntimeError(error)
        return True

    def check_device(self, device: torch.device, world_size: int = 1) -> None:
        """Refuse a device our kernels cannot run on (called by `get_backend`, so the op reports it in
        its agreement check, before any collective). Our summary kernels run only for a group of
        several ranks; FLA's (unless the private `_local` delegates to the torch backend) always."""
        error = _off_cuda_error(device, fla=self._fla_local(device), ours=world_size > 1)
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
