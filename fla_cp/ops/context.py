"""Sharding metadata for context parallelism: who holds which tokens, and where sequences cross ranks.

The global token stream (one row of length T, or a packed stream with global `cu_seqlens`) is cut into
*parts*: P parts (`contiguous`) or 2P parts (`zigzag`, rank r holds parts r and 2P-1-r). The state
chain runs over the parts in global order (docs/DESIGN.md §4, §7). Everything here is plain Python on
CPU, computed once per context; no tensor on the compute device is touched until `shard`/`unshard`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fla_cp import checks
from fla_cp.ops import comm

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Part:
    """One contiguous slice `[start, end)` of the global stream, held by rank `owner`."""
    index: int
    start: int
    end: int
    owner: int
    first_seq: int          # global sequence holding the part's first token
    last_seq: int           # global sequence holding the part's last token
    from_prev: bool         # first_seq began in an earlier part: a state comes in
    to_next: bool           # last_seq goes on into the next part: a state goes out


@dataclass(frozen=True)
class Segment:
    """A maximal run of one sequence inside one part, in local (per-row) coordinates."""
    seq: int                # global sequence index (packed) or 0 (dense: the row is the sequence)
    part: int               # global part index
    start: int              # local token offset within a row
    end: int
    starts_seq: bool        # the segment begins its sequence (initial_state goes in here)
    ends_seq: bool          # the segment ends its sequence (final_state comes out here)


@dataclass
class CPContext:
    """What every rank knows about the CP split; identical on all ranks of the group.

    Build with `build_cp_context`. Attributes:
        group, rank, world_size: the CP process group (None, 0, 1 without torch.distributed).
        layout: "contiguous" | "zigzag".
        cu_seqlens: global sequence boundaries, CPU int64 `[N+1]` (`[0, T]` when dense).
        packed: True when built from `cu_seqlens` (batch must be 1).
        parts: every part of the stream, in global order.
        local_parts: indices of this rank's parts, in local order.
        local_ranges: `(start, end)` global token ranges this rank holds, in local order.
        segments: this rank's segments, in local order.
    """
    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    layout: str
    cu_seqlens: torch.Tensor
    packed: bool
    parts: list[Part]
    local_parts: list[int]
    segments: list[Segment] = field(repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key, build):
        """`build()` once per context and key: index tensors derived from the split (halo rows, conv
        windows, flat cu_seqlens) are the same for every layer of a forward and its backward."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def total_len(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def local_ranges(self) -> list[tuple[int, int]]:
        return [(self.parts[j].start, self.parts[j].end) for j in self.local_parts]

    @property
    def local_len(self) -> int:
        return sum(e - s for s, e in self.local_ranges)

    def input_error(self, B: int, T: int, name: str = "q", single: bool = False, cu_seqlens=None) -> str | None:
        """This rank's problem fitting an input of `B` rows and `T` tokens (`name`) to the split, or None:
        the group's size, `T` vs this rank's share, `B == 1` when packed, a given `cu_seqlens` vs the
        context's (a host read). Nothing communicates (a rank must not raise before an agreement check).
        `single`: the context was built here from the input's own length (no `cp_context` passed), so
        the messages speak of `cu_seqlens` rather than of a context the caller never saw."""
        if comm.world_size(self.group) != self.world_size:
            return f"cp_context was built for {self.world_size} ranks but its group has {comm.world_size(self.group)}"
        if single and T == 0:
            return f"{name} has no tokens"
        if single and T != self.local_len:
            return f"cu_seqlens[-1]={self.total_len} does not match {name}'s length {T}"
        if T != self.local_len:
            return (f"{name} holds {T} tokens but cp_context gives this rank {self.local_len} "
                    f"(global length {self.total_len}); shard inputs with cp_context.shard(x, dim=1)")
        if self.packed and B != 1:
            return f"packed input (cu_seqlens) needs batch size 1, got B={B}"
        if cu_seqlens is not None and not single:
            if not (torch.is_tensor(cu_seqlens) or isinstance(cu_seqlens, (list, tuple))):
                return f"cu_seqlens must be a 1-D integer tensor or list, got {type(cu_seqlens).__name__}"
            cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
            if cu != self.cu_seqlens.tolist():
                return ("cu_seqlens differs from the global boundaries cp_context was built with (under CP they "
                        "come from cp_context; pass cu_seqlens=None)")
        return None

    def fingerprint(self) -> list[int]:
        """Integers that differ between contexts describing different splits; for agreement checks."""
        return list(self.memo("fingerprint", lambda: (self.world_size, LAYOUTS.index(self.layout), self.total_len,
                                                      self.num_seqs, checks.checksum(self.cu_seqlens.tolist()))))

    def local_cu_seqlens(self, device=None) -> torch.Tensor:
        """Boundaries of this rank's segments within its local tokens, int64 `[S+1]`."""
        bounds = [0] + [s.end for s in self.segments]
        return torch.tensor(bounds, dtype=torch.long, device=device)

    # ---------------------------------------------------------------- sharding
    def _local_index(self, device) -> torch.Tensor:
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.local_ranges])

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a global tensor (length `total_len` along `dim`); no communication."""
        if x.shape[dim] != self.total_len:
            raise ValueError(f"rank {self.rank}: shard expects size {self.total_len} along dim {dim}, "
                             f"got {tuple(x.shape)}")
        if len(self.local_parts) == 1:
            s, e = self.local_ranges[0]
            return x.narrow(dim, s, e - s)
        return x.index_select(dim, self._local_index(x.device))

    def unshard(self, x: torch.Tensor, dim: int = 1, grad: str = "sum", verify_agreement: bool = True) -> torch.Tensor:
        """All-gather local shards back into global order, on every rank.

        Differentiable (every rank must then run the backward: it is a collective). `grad` says how the
        gradients the ranks send back to the replicated result combine before this rank keeps its slice:
            "sum"   summed over the group (like `torch.distributed.nn.functional.all_gather`): right when
                    each rank's loss is a different part of the total;
            "mean"  averaged over the group: right when every rank computes the *same* loss on the
                    gathered tensor, so that after `sync_gradients` (a sum over the group) that loss
                    counts once. Anything replicated after the gather (a projection applied to the
                    gathered tensor on every rank) then still holds the full gradient on every rank,
                    and needs its own 1/world_size.
        The backward is one reduce-scatter: each rank receives only its own slice of that sum.

        verify_agreement: first check (one tiny all_gather) that every rank passes the same dims other
            than `dim`, dtype, device type, `grad` and context, and that all or none record a graph
            for the backward, so a mismatch raises ValueError on every rank instead of aborting gloo or
            gathering garbage. False skips that collective, for callers whose own agreement check
            already covers the tensor (this rank's own errors still raise, on this rank only).
        """
        error = _unshard_error(self, x, dim, grad)
        if verify_agreement and self.world_size > 1:
            fields = checks.unshard_fields(self, x, dim, grad, error is None)
            checks.check_agreement(self.group, error, fields, what="CPContext.unshard")
        elif error:
            raise ValueError(f"CPContext.unshard: rank {self.rank}: {error}")
        return _Unshard.apply(x, self, dim, grad == "mean")


def _unshard_error(cp: CPContext, x, dim, grad) -> str | None:
    """This rank's problem with an unshard call, or None; nothing here communicates or raises."""
    if grad not in ("sum", "mean"):
        return f"grad must be 'sum' or 'mean', got {grad!r}"
    if not torch.is_tensor(x):
        return f"x must be a tensor, got {type(x).__name__}"
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        return f"dim must be an int in [-{x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {dim!r}"
    if x.shape[dim] != cp.local_len:
        return f"expects {cp.local_len} local tokens along dim {dim}, got shape {tuple(x.shape)}"
    return None


class _Unshard(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, cp: CPContext, dim: int, mean: bool = False):
        ctx.cp, ctx.dim, ctx.mean = cp, dim, mean
        if cp.world_size == 1:
            return x.clone()
        owned = [parts_of_rank(cp.layout, r, cp.world_size) for r in range(cp.world_size)]
        sizes = [sum(cp.parts[j].end - cp.parts[j].start for j in js) for js in owned]
        pieces = comm.all_gather_varlen(x.movedim(dim, 0).contiguous(), sizes, cp.group)
        by_part = {}
        for js, piece in zip(owned, pieces):
            offset = 0
            for j in js:
                n = cp.parts[j].end - cp.parts[j].start
                by_part[j] = piece[offset:offset + n]
                offset += n
        out = torch.cat([by_part[j] for j in range(len(cp.parts))], dim=0)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        if cp.world_size == 1:
            return grad, None, None, None
        # rank r keeps only its own tokens of the summed gradient: send each rank its slice of ours
        grad = grad.movedim(ctx.dim, 0)
        pieces = []
        for r in range(cp.world_size):
            js = parts_of_rank(cp.layout, r, cp.world_size)
            pieces.append(torch.cat([grad[cp.parts[j].start:cp.parts[j].end] for j in js]) if len(js) > 1
                          else grad[cp.parts[js[0]].start:cp.parts[js[0]].end])
        local = comm.reduce_scatter_varlen(pieces, cp.group)   # a fresh buffer
        if ctx.mean:
            local.div_(cp.world_size)
        return local.movedim(0, ctx.dim), None, None, None


# -------------------------------------------------------------------- building
def _split_points(total: int, n: int) -> list[int]:
    """n balanced parts of `total` tokens; sizes differ by at most one token."""
    return [i * total // n for i in range(n + 1)]


def _make_parts(cu: list[int], world_size: int, layout: str) -> list[Part]:
    n_parts = world_size if layout == "contiguous" else 2 * world_size
    points = _split_points(cu[-1], n_parts)
    owners = list(range(world_size)) if layout == "contiguous" else \
        list(range(world_size)) + list(range(world_size - 1, -1, -1))

    def seq_of(token: int) -> int:
        # sequence i holds tokens [cu[i], cu[i+1])
        lo, hi = 0, len(cu) - 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cu[mid] <= token:
                lo = mid
            else:
                hi = mid - 1
        return lo

    parts = []
    for j in range(n_parts):
        start, end = points[j], points[j + 1]
        first, last = seq_of(start), seq_of(end - 1)
        parts.append(Part(j, start, end, owners[j], first, last,
                          from_prev=cu[first] < start, to_next=cu[last + 1] > end))
    return parts


def _make_segments(cu: list[int], parts: list[Part], local_parts: list[int]) -> list[Segment]:
    segments, offset = [], 0
    for j in local_parts:
        p = parts[j]
        for s in range(p.first_seq, p.last_seq + 1):
            a, b = max(cu[s], p.start), min(cu[s + 1], p.end)
            segments.append(Segment(s, j, offset + a - p.start, offset + b - p.start,
                                    starts_seq=a == cu[s], ends_seq=b == cu[s + 1]))
        offset += p.end - p.start
    return segments


def build_cp_context(
    group: dist.ProcessGroup | None = None,
    *,
    seq_len: int | None = None,
    cu_seqlens: torch.Tensor | list[int] | None = None,
    layout: str = "contiguous",
    verify_agreement: bool = True,
    _single: bool = False,
) -> CPContext:
    """Describe how one global sequence (or packed batch) is split over the ranks of `group`.

    Args:
        group: the CP process group; None means the default group when torch.distributed is
            initialised, else a single-rank context.
        seq_len: dense input: every row of a `[B, T]` batch is one sequence of length `T`.
        cu_seqlens: packed input: global boundaries `[N+1]` of N sequences (batch must be 1).
            Must be identical on every rank (checked with one small collective).
        layout: "contiguous" (rank r holds one slice) or "zigzag" (2P parts; r holds r and 2P-1-r).
            Every part must hold a token: the global length must be at least P (contiguous) or 2P
            (zigzag); shorter input raises.
        verify_agreement: check (one tiny all_gather) that every rank describes the same split, so a
            mismatch raises ValueError on every rank instead of hanging a later collective. False skips
            that collective for callers that fold `CPContext.fingerprint()` into a check of their own;
            this rank's own errors still raise, on this rank only.
    """
    if group is None and not _single and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    rank = dist.get_rank(group) if group is not None else 0
    world_size = comm.world_size(group)

    cu, error = None, None
    if not isinstance(layout, str) or layout not in LAYOUTS:
        error = f"layout must be one of {LAYOUTS}, got {layout!r}"
    elif (seq_len is None) == (cu_seqlens is None):
        error = "pass exactly one of seq_len (dense) or cu_seqlens (packed)"
    else:
        cu, error = _boundaries(seq_len, cu_seqlens)
    if error is None:
        min_len = world_size * (2 if layout == "zigzag" else 1)
        if cu[-1] < min_len:
            error = (f"{'seq_len' if cu_seqlens is None else 'cu_seqlens[-1]'}={cu[-1]} is shorter than the "
                     f"{min_len} parts of a {layout} split over {world_size} ranks")
    if verify_agreement:
        # every rank must agree on the split before any collective that depends on it
        fields = checks.split_fields(cu if error is None else None, LAYOUTS.index(layout) if error is None else 0,
                                     seq_len is None)
        checks.check_agreement(group, error, fields, what="build_cp_context")
    elif error:
        raise ValueError(f"build_cp_context: rank {rank}: {error}")

    parts = _make_parts(cu, world_size, layout)
    local_parts = parts_of_rank(layout, rank, world_size)
    return CPContext(group=group, rank=rank, world_size=world_size, layout=layout,
                     cu_seqlens=torch.tensor(cu, dtype=torch.long), packed=cu_seqlens is not None,
                     parts=parts, local_parts=local_parts,
                     segments=_make_segments(cu, parts, local_parts))


def _boundaries(seq_len, cu_seqlens) -> tuple[list[int] | None, str | None]:
    """Global boundaries as Python ints, or an error message. Non-integer values are refused rather
    than truncated: a silently shortened split would be a wrong answer."""
    if cu_seqlens is None:
        n = _as_int(seq_len)
        if n is None or n < 1:
            return None, f"seq_len must be a positive int, got {seq_len!r}"
        return [0, n], None
    if torch.is_tensor(cu_seqlens) and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()):
        return None, (f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape "
                      f"{tuple(cu_seqlens.shape)}")
    if not torch.is_tensor(cu_seqlens) and not isinstance(cu_seqlens, (list, tuple)):
        return None, f"cu_seqlens must be a 1-D integer tensor or list, got {type(cu_seqlens).__name__}"
    values = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    cu = [_as_int(c) for c in values]
    if any(c is None for c in cu):
        return None, f"cu_seqlens must hold integers, got {values[:8]}"
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
        more = '...' if len(cu) > 8 else ''
        return None, f"cu_seqlens must start at 0 and be strictly increasing, got {cu[:8]}{more}"
    return cu, None


def _as_int(x) -> int | None:
    """x as an int if it is one (Python, NumPy or a one-element integer tensor), else None."""
    if isinstance(x, bool) or (torch.is_tensor(x) and (x.numel() != 1 or x.is_floating_point())):
        return None
    try:
        return operator.index(x.item() if torch.is_tensor(x) else x)
    except TypeError:
        return None


def parts_of_rank(layout: str, rank: int, world_size: int) -> list[int]:
    return [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]
