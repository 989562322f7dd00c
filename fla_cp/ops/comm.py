"""The few collectives CP needs, written once.

Under gloo, CUDA tensors are staged through host memory: gloo's CUDA support differs between
collectives and versions, and what the operator sends is small (states, not activations). Only
`CPContext.unshard` moves activation-sized data: `all_gather_varlen` forward and
`reduce_scatter_varlen` backward (and the model's conv halo, a few tokens per rank, goes through
`all_gather`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group) -> int:
    """Ranks in `group`; None means a single process (a CPContext built without a group)."""
    return 1 if group is None else dist.get_world_size(group)


def collective_device(group) -> torch.device:
    """Where small host-built tensors (flags, shapes) must live for `group`'s backend: NCCL only
    takes CUDA tensors, gloo takes CPU ones."""
    if group is not None and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _needs_host_staging(t: torch.Tensor, group) -> bool:
    return t.device.type != "cpu" and dist.get_backend(group) == "gloo"


def all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """Gather `t` (same shape on every rank) from every rank: `[P, *t.shape]`."""
    world = world_size(group)
    if world == 1:
        return t.unsqueeze(0)
    src = t.contiguous()
    staged = _needs_host_staging(src, group)
    if staged:
        src = src.cpu()
    out = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(out, src, group=group)
    res = torch.stack(out)
    return res.to(t.device) if staged else res


def all_gather_varlen(t: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """Gather tensors whose first dim is `sizes[r]` on rank r (other dims equal); list by rank."""
    max_len = max(sizes)
    padded = t
    if t.shape[0] < max_len:
        padded = torch.cat([t, t.new_zeros(max_len - t.shape[0], *t.shape[1:])])
    gathered = all_gather(padded, group)
    return [gathered[r, :n] for r, n in enumerate(sizes)]


def reduce_scatter_varlen(pieces: list[torch.Tensor], group) -> torch.Tensor:
    """Sum over the group of the pieces meant for each rank: rank r passes `pieces[j]` for every rank j
    (first dim `n_j`, the same on every rank; other dims equal) and gets back the sum over ranks of their
    `pieces[r]`. One reduce-scatter of pieces padded to the longest: each rank receives only its share,
    where an all-reduce of the whole would move about twice the data and leave every rank the total."""
    world, rank = world_size(group), (dist.get_rank(group) if group is not None else 0)
    if world == 1:
        return pieces[0].clone()
    n = max(p.shape[0] for p in pieces)
    tail = pieces[0].shape[1:]
    staged = _needs_host_staging(pieces[0], group)
    device = torch.device("cpu") if staged else pieces[0].device
    send = torch.zeros(world, n, *tail, dtype=pieces[0].dtype, device=device)
    for j, p in enumerate(pieces):
        send[j, :p.shape[0]] = p
    out = torch.empty(n, *tail, dtype=send.dtype, device=device)
    # reduce_scatter_single is the current name (torch 2.13 deprecates reduce_scatter_tensor)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        reduce_scatter(out, send.view(world * n, *tail), group=group)
    except (RuntimeError, NotImplementedError) as e:
        # older gloo builds lack reduce-scatter: every rank fails alike before sending anything, so
        # every rank falls back to the all-reduce
        if "support" not in str(e).lower():
            raise
        dist.all_reduce(send, group=group)
        out = send[rank]
    out = out[:pieces[rank].shape[0]]
    return out.to(pieces[0].device) if staged else out


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group; returns a new tensor (the input is left untouched)."""
    if world_size(group) == 1:
        return t.clone()
    staged = _needs_host_staging(t, group)
    buf = t.detach().cpu().clone() if staged else t.detach().clone().contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device) if staged else buf


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group into a tensor every rank holds; the backward sums the ranks' gradients (each
    rank's loss used its own copy), as `torch.distributed.nn.functional.all_reduce` does, with gloo's
    host staging of CUDA tensors."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous(), ctx.group), None


def all_reduce_sum_differentiable(t: torch.Tensor, group) -> torch.Tensor:
    """`all_reduce_sum` that autograd goes through (its backward is a collective too: every rank of the
    group must backpropagate through the result, as through any CP output)."""
    if world_size(group) == 1 or not (torch.is_grad_enabled() and t.requires_grad):
        return all_reduce_sum(t, group)
    return _AllReduceSum.apply(t, group)


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group in place, for a contiguous buffer the caller owns (a flattened gradient):
    no copy beyond gloo's host staging of CUDA tensors."""
    if world_size(group) == 1:
        return t
    if _needs_host_staging(t, group):
        return t.copy_(all_reduce_sum(t, group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def broadcast_from_first(t: torch.Tensor, group) -> torch.Tensor:
    """Group rank 0's `t` (same shape and dtype on every rank), on `t`'s device; a new tensor."""
    if world_size(group) == 1:
        return t.clone()
    buf = t.detach().to(collective_device(group), copy=True).contiguous()
    dist.broadcast(buf, group=group, group_src=0)
    return buf.to(t.device)
