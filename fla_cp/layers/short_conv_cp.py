"""Causal depthwise short convolution (GDN's `ShortConvolution`) under context parallelism.

A token's window is itself plus the W-1 tokens before it *in the same sequence*. Under CP the window
of a part's first tokens reaches into earlier parts, possibly several of them when parts are shorter
than W-1 (DESIGN.md §5). We exchange that *halo* with one collective: every rank all-gathers the last
W-1 conv inputs of each of its parts; each segment that continues a sequence from an earlier part
then picks the W-1 predecessors it needs (stopping at the sequence's first token, so a halo never
leaks across documents). The exchange is an autograd function whose backward sums the halo gradients
over the group and hands each rank the gradient of its own tails: halo gradients reach their owners.
When the call continues cached sequences, the positions before a sequence's start are its cached last
inputs (replicated on every rank, so no collective) rather than zeros.

The convolution (`causal_conv`) has two backends with one contract, picked by the one `backend`
vocabulary of fla_cp (`fla_cp.ops.backends.BACKENDS`). Its math is FLA's
`causal_conv1d`: `y_t = act(sum_j w[:, j] * x_{t-W+1+j} + b)`, with a cache `[N, D, W]` holding a
sequence's last W inputs (oldest first).

- "triton" (the default on CUDA through `backend="auto"`; formerly "fla"): FLA's fused Triton
  `causal_conv1d`, the autograd-enabled public function FLA's own layer uses, on the flat stream as
  one packed batch (`cu_seqlens` from the segments). A segment's halo or decode cache `[W-1, D]` is its
  `initial_state` `[D, W]` (transposed, one leading column that FLA never reads), so FLA's kernels
  return the halo gradient (dh0), which `fla_cp.ops.halo` then routes to its owner rank. The final state
  is gathered here (the last W inputs, exact copies), not taken from FLA: FLA's backward drops the
  gradient of its slot 0 (dead for decoding, but part of the returned tensor). Off CUDA this backend
  runs only in Triton's interpreter, with the patches of `scripts/triton_patches.py` (tests; see
  `fla_cp.utils.triton_interpreter`).
- "torch" (the default elsewhere): a gather of explicit windows (`[N, W, D]`) and a weighted sum,
  which handles packed segments, per-segment initial states (halo or decode cache) and final states
  in one vectorised pass on any device; the windows are recomputed in backward rather than kept.
  Every window is summed the same way wherever it sits, so results are bitwise layout-independent.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fla_cp.ops.backends import BACKENDS
from fla_cp.ops.halo import gathered_part_tails, halo_rows


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bounds: list[tuple[int, int]],
    init: torch.Tensor | None = None,
    activation: str | None = "silu",
    output_final_state: bool = False,
    window_index: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv over a flat stream of segments.

    Args:
        x: `[N, D]` inputs; `bounds` lists the `(start, end)` of the S segments covering `[0, N)`.
        weight: `[D, W]`; bias: `[D]` or None.
        init: `[S, W-1, D]` inputs that precede each segment (oldest first), or None for zeros.
        window_index: torch backend only: `window_index(bounds, N, W, init is not None)` on x's device,
            when the caller keeps it across layers.
        backend: "auto" (FLA's Triton `causal_conv1d` on CUDA, "torch" elsewhere), "triton" (FLA's
            kernel on any device; off CUDA in Triton's interpreter, which must have been on when FLA
            was imported) or "torch" (the window sum). "fla" is a deprecated name of "triton"
            (FutureWarning). See the module docstring.
    Returns:
        y `[N, D]`, and when `output_final_state` the last W inputs of every segment `[S, D, W]`.
    """
    if resolve_conv_backend(backend, x) == "triton":
        return _causal_conv_fla(x, weight, bias, bounds, init, activation, output_final_state)
    N, D = x.shape
    W = weight.shape[-1]
    S = len(bounds)
    idx = window_index if window_index is not None else window_index_of(bounds, N, W, has_init=init is not None)
    parts = [x]
    if init is not None:
        parts.append(init.reshape(S * (W - 1), D).to(x.dtype))
    parts.append(x.new_zeros(1, D))
    src = torch.cat(parts, 0)
    idx = idx.to(x.device)
    # recomputed in backward: autograd then keeps src (~N rows), not the N windows of W rows each
    y = checkpoint(_window_sum, src, idx, weight.to(x.dtype), use_reentrant=False)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    final = None
    if output_final_state:
        last = torch.tensor([e - 1 for _, e in bounds], device=x.device)
        final = src[idx[last]].transpose(1, 2).contiguous()         # [S, D, W]
    return y, final


def _fla_available() -> bool:
    try:
        import fla.modules.causal_conv1d  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_conv_backend(backend: str, x: torch.Tensor, who: str | None = None) -> str:
    """The backend `causal_conv(backend=...)` runs for input `x`: "triton" or "torch".

    "triton" off CUDA checks that FLA's kernels were imported for Triton's interpreter, with its
    patches applied (`scripts/triton_patches.py`; checked, never applied here), and raises a
    RuntimeError naming `who` (default: causal_conv's own argument) if not. "fla", the former name of
    "triton", still works with a FutureWarning (one release).
    """
    if isinstance(backend, str) and backend == "fla":
        warnings.warn("causal_conv(backend='fla') is deprecated: use backend='triton' (the name is removed in "
                      "the next release)", FutureWarning, stacklevel=3)
        backend = "triton"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _fla_available() else "torch"
    if backend == "triton" and not x.is_cuda:
        from fla.modules.causal_conv1d.ops import causal_conv1d_fwd_kernel

        from fla_cp.utils.triton_interpreter import require_interpreted
        require_interpreted(causal_conv1d_fwd_kernel, who or f"causal_conv(backend={backend!r})")
    return backend


def _check_tiling(bounds: list[tuple[int, int]], N: int) -> None:
    """Segments must tile `[0, N)` in order (FLA's conv takes them as a packed batch)."""
    ends = [e for _, e in bounds]
    if [s for s, _ in bounds] != [0] + ends[:-1] or (ends[-1] if ends else 0) != N:
        raise ValueError(f"segments {bounds[:4]}... do not cover the {N} local tokens")


def _causal_conv_fla(x, weight, bias, bounds, init, activation, output_final_state):
    """`causal_conv` on FLA's Triton kernels: every segment is one sequence of a packed batch and its
    W-1 predecessors (halo or cache) are its `initial_state` `[D, W]`, column 0 unused by FLA."""
    from fla.modules.causal_conv1d import causal_conv1d
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unsupported activation {activation!r}")
    _check_tiling(bounds, x.shape[0])
    W = weight.shape[-1]
    tables = _segment_tables(tuple(map(tuple, bounds)), W, init is not None, x.device)
    h0 = None
    if init is not None:
        h0 = F.pad(init.to(x.dtype).transpose(1, 2), (1, 0))            # [S, D, W]
    y, _ = causal_conv1d(x.unsqueeze(0), weight, bias, initial_state=h0, activation=activation,
                         backend="triton", cu_seqlens=tables.cu_seqlens, cu_seqlens_cpu=tables.cu_seqlens_cpu)
    final = _last_inputs(x, init, tables, len(bounds), W) if output_final_state else None
    return y[0], final


class _SegmentTables(NamedTuple):
    cu_seqlens_cpu: torch.Tensor    # [S+1] segment boundaries, host
    cu_seqlens: torch.Tensor        # the same on x's device
    last_rows: torch.Tensor         # [S*W] rows of x read for the final states (clamped at 0)
    last_index: torch.Tensor        # [S, W] row of [x rows; init rows; zero] per final-state slot


@functools.lru_cache(maxsize=16)
def _segment_tables(bounds: tuple, W: int, has_init: bool, device: torch.device) -> _SegmentTables:
    """Index tensors of one segment layout, built once: every layer of a forward and every decode step
    asks for the same ones, and a host-to-GPU copy waits for the stream. Returning the same tensor
    objects also lets FLA's own index cache (keyed on tensor identity) hit."""
    S, H = len(bounds), W - 1
    cu_cpu = torch.tensor([0] + [e for _, e in bounds], dtype=torch.long)
    pos = torch.tensor([[e - W + j for j in range(W)] for _, e in bounds], dtype=torch.long).view(S, W)
    start = torch.tensor([s for s, _ in bounds], dtype=torch.long)[:, None]
    before = start - pos                                              # > 0: before the segment
    fill = torch.full_like(pos, S * W)                                # the zero row after x's S*W rows
    if has_init:                                                      # init rows S*W + s*H + i, then zero
        from_init = S * W + torch.arange(S)[:, None] * H + H - before
        fill = torch.where(before <= H, from_init, S * W + S * H)
    index = torch.where(before > 0, fill, torch.arange(S * W).view(S, W))
    return _SegmentTables(cu_cpu, cu_cpu.to(device), pos.clamp_min(0).flatten().to(device), index.to(device))


def _last_inputs(x: torch.Tensor, init: torch.Tensor | None, tables: _SegmentTables, S: int, W: int) -> torch.Tensor:
    """The last W inputs of every segment, oldest first, `[S, D, W]`: x, then `init` before a
    segment's start, then zeros. Plain copies (the torch backend's final state, bitwise), gathered
    from S * W rows of x rather than a copy of x."""
    parts = [x.index_select(0, tables.last_rows)]                     # rows 0 .. S*W-1
    if init is not None:
        parts.append(init.reshape(S * (W - 1), -1).to(x.dtype))       # rows S*W + s*(W-1) + i
    parts.append(x.new_zeros(1, x.shape[1]))
    return torch.cat(parts, 0)[tables.last_index].transpose(1, 2).contiguous()


def _window_sum(src: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`y[n] = sum_j weight[:, j] * src[idx[n, j]]`: each window summed the same way wherever it sits,
    so a token's conv output is bitwise the same on any CP layout."""
    return torch.einsum('nwd,dw->nd', src[idx], weight)


def window_index_of(bounds: list[tuple[int, int]], N: int, W: int, has_init: bool) -> torch.Tensor:
    """Row of `src = [x; init; 0]` for every (token, tap): `[N, W]`, tap W-1 is the token itself."""
    S = len(bounds)
    starts = torch.tensor([s for s, _ in bounds], dtype=torch.long)
    lens = torch.tensor([e - s for s, e in bounds], dtype=torch.long)
    if int(lens.sum()) != N or (S and (bounds[0][0] != 0)):
        raise ValueError(f"segments {bounds[:4]}... do not cover the {N} local tokens")
    seg = torch.repeat_interleave(torch.arange(S), lens)               # [N]
    t = torch.arange(N)
    lag = torch.arange(W - 1, -1, -1)                                  # tap j looks back W-1-j tokens
    pos = t[:, None] - lag[None, :]
    start = starts[seg][:, None]
    inside = pos >= start
    zero_row = N + (S * (W - 1) if has_init else 0)
    if has_init:
        before = start - pos                                           # 1..W-1 tokens before the segment
        from_init = N + seg[:, None] * (W - 1) + (W - 1 - before)
        outside = from_init
    else:
        outside = torch.full_like(pos, zero_row)
    return torch.where(inside, pos, outside)


def conv_halo(x: torch.Tensor, cp_context, W: int, cache: torch.Tensor | None = None) -> torch.Tensor | None:
    """Inputs preceding each local segment: `[B, S, W-1, D]`.

    `x` is this rank's `[B, T_loc, D]` conv input; segments are `cp_context.segments` (same for every
    row of a dense batch). Before a sequence's first token the halo holds zeros, or, when the call
    continues cached sequences, their cached last inputs: `cache` `[N, W-1, D]` (oldest first; N = B
    dense, the number of sequences packed), the same on every rank. Returns None when nothing precedes
    any segment (no part continues a sequence and no cache). Collective over the CP group when a part
    continues a sequence (call on every rank); the cache needs none.
    """
    cp = cp_context
    gather = any(p.from_prev for p in cp.parts)
    if W == 1 or not (gather or cache is not None):
        return None
    B, _, D = x.shape
    H = W - 1
    rows = []
    if gather:
        rows.append(gathered_part_tails(x, cp, H))                        # [B, P*nlp*H, D]
    if cache is not None:
        rows.append(cache.to(x.dtype).reshape(B, -1, D))              # [B, H, D] dense, [1, N*H, D] packed
    rows.append(x.new_zeros(B, 1, D))
    src = torch.cat(rows, 1)
    index = cp.memo(("conv_halo_rows", W, cache is not None, str(x.device)),
                    lambda: halo_rows(cp, H, gather, cache is not None).to(x.device))
    return src[:, index]                                               # [B, S, H, D]
