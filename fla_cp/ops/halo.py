"""The halo exchange: the last H inputs of every CP part, for the segments that continue a sequence.

A token's causal window (the short conv's W taps, a windowed attention's W keys) reaches up to W-1
positions back in its own sequence; under CP the first tokens of a part reach into earlier parts,
possibly several of them when parts are shorter than W-1. One all_gather of every part's last W-1
rows gives every rank what it needs (`gathered_part_tails`); `halo_rows` says which gathered row
precedes each local segment's first token (stopping at its sequence's start, so a halo never leaks
across documents). The gather's backward hands each rank the gradient of its own tails.
docs/DESIGN.md §5.
"""
from __future__ import annotations

import bisect

import torch

from fla_cp.ops import comm


class _GatherTails(torch.autograd.Function):
    """all_gather of every rank's part tails; backward returns each rank its tails' gradient."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, group, rank: int):
        ctx.group, ctx.rank = group, rank
        return comm.all_gather(tails, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce_sum(grad.contiguous(), ctx.group)[ctx.rank], None, None


def _owner_slot(cp_context) -> dict[int, int]:
    """Part index -> its position among its owner's parts (local order is ascending part index)."""
    slot, seen = {}, {}
    for p in cp_context.parts:
        slot[p.index] = seen.get(p.owner, 0)
        seen[p.owner] = slot[p.index] + 1
    if sorted(cp_context.local_parts) != list(cp_context.local_parts):
        raise AssertionError("short_conv_cp assumes a rank's parts are held in ascending order")
    return slot


def gathered_part_tails(x: torch.Tensor, cp, H: int) -> torch.Tensor:
    """The last H inputs of every part of every rank, `[B, P*nlp*H, D]` (one all_gather): the H inputs
    of a part shorter than H are left-padded with zeros."""
    B, _, D = x.shape
    tails, offset = [], 0
    for j in cp.local_parts:
        n = cp.parts[j].end - cp.parts[j].start
        tail = x[:, offset + max(0, n - H): offset + n]
        if tail.shape[1] < H:
            tail = torch.cat([tail.new_zeros(B, H - tail.shape[1], D), tail], 1)
        tails.append(tail)
        offset += n
    gathered = _GatherTails.apply(torch.stack(tails), cp.group, cp.rank)   # [P, nlp, B, H, D]
    return gathered.permute(2, 0, 1, 3, 4).reshape(B, -1, D)


def halo_rows(cp, H: int, gathered: bool, cached: bool) -> torch.Tensor:
    """Row of `src` for each local segment's H predecessors: `[S, H]`. `src` is the gathered tails
    `[P * nlp * H]` (when `gathered`), then the cache's H rows per sequence (when `cached`), then one
    zero row. A predecessor before its sequence's start is the cache's row, or the zero row."""
    nlp = len(cp.local_parts)
    n_tails = cp.world_size * nlp * H if gathered else 0
    zero_row = n_tails + (cp.num_seqs if cp.packed else 1) * H * cached
    slot, cu = _owner_slot(cp), cp.cu_seqlens.tolist()
    starts = [p.start for p in cp.parts]
    index = []
    for s in cp.segments:
        first = cu[s.seq] if s.starts_seq else cp.parts[s.part].start   # global position of s's first token
        row = [zero_row] * H
        for i in range(H):
            pos = first - H + i
            if pos < cu[s.seq]:
                if cached:                                             # m = cu[seq] - pos tokens before it
                    row[i] = n_tails + s.seq * H + H - (cu[s.seq] - pos)
                continue
            m = bisect.bisect_right(starts, pos) - 1                   # the part holding pos
            pm = cp.parts[m]
            row[i] = (pm.owner * nlp + slot[m]) * H + H - (pm.end - pos)
        index.append(row)
    return torch.tensor(index, dtype=torch.long)
