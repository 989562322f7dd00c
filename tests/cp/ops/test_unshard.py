"""`CPContext.unshard`: its agreement check (bad or mismatched tensors raise on every rank instead of
aborting gloo or gathering garbage) and its backward (a reduce-scatter: each rank gets its slice of the
summed gradient, never the whole)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fla_cp.ops import build_cp_context

from _dist import run_ranks

T = 10


def case_batch_differs(rank, ctx):
    ctx.unshard(torch.randn(1 + rank, ctx.local_len, 3), dim=1)


def case_dtype_differs(rank, ctx):
    ctx.unshard(torch.randn(2, ctx.local_len, 3, dtype=torch.float32 if rank == 0 else torch.float64), dim=1)


def case_trailing_dim_differs(rank, ctx):
    ctx.unshard(torch.randn(2, ctx.local_len, 3 + rank), dim=1)


def case_ndim_differs(rank, ctx):
    ctx.unshard(torch.randn(2, ctx.local_len, *([3] if rank == 0 else [3, 1])), dim=1)


def case_gathered_dim_differs(rank, ctx):
    x = torch.randn(ctx.local_len, ctx.local_len, 2)
    ctx.unshard(x, dim=0 if rank == 0 else 1)


def case_local_length_on_one_rank(rank, ctx):   # used to raise on rank 1 alone, rank 0 then hung
    ctx.unshard(torch.randn(2, ctx.local_len + rank, 3), dim=1)


def case_grad_mode_on_one_rank(rank, ctx):
    ctx.unshard(torch.randn(2, ctx.local_len, 3), dim=1, grad="mean" if rank == 0 else "average")


def case_grad_combination_differs(rank, ctx):
    ctx.unshard(torch.randn(2, ctx.local_len, 3), dim=1, grad="mean" if rank == 0 else "sum")


def case_no_grad_on_one_rank(rank, ctx):   # the backward is collective: rank 1 would skip it
    x = torch.randn(2, ctx.local_len, 3, requires_grad=True)
    with torch.set_grad_enabled(rank == 0):
        ctx.unshard(x, dim=1)


CASES = {
    case_batch_differs: ["shape (gathered dim as -1)", "differs between ranks", "[1, -1, 3", "[2, -1, 3"],
    case_dtype_differs: ["dtype and device type", "torch.float32", "torch.float64"],
    case_trailing_dim_differs: ["shape (gathered dim as -1)", "[2, -1, 3", "[2, -1, 4"],
    case_ndim_differs: ["ndim and gathered dim", "[3, 1]", "[4, 1]"],
    case_gathered_dim_differs: ["ndim and gathered dim", "[3, 0]", "[3, 1]"],
    case_local_length_on_one_rank: ["CPContext.unshard: rank 1:", "expects 5 local tokens along dim 1"],
    case_grad_mode_on_one_rank: ["rank 1:", "grad must be 'sum' or 'mean'", "'average'"],
    case_grad_combination_differs: ["grad ('mean')", "differs between ranks"],
    case_no_grad_on_one_rank: ["records a graph", "rank 0 has [1], rank 1 has [0]"],
}


def _errors_worker(rank, world_size, cases):
    ctx = build_cp_context(None, seq_len=T)
    messages = []
    for case in cases:
        try:
            case(rank, ctx)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    # still in step; and without the check (the caller's own covers it) the same gather
    x = torch.arange(ctx.local_len, dtype=torch.float32).add(100 * rank).view(1, -1, 1)
    return messages, ctx.unshard(x, dim=1), ctx.unshard(x, dim=1, verify_agreement=False)


@pytest.mark.timeout(120)
def test_unshard_mismatch_raises_on_every_rank():
    results = run_ranks(_errors_worker, 2, (list(CASES),), timeout=100)
    for rank, (messages, y, y_unchecked) in enumerate(results):
        want = torch.tensor([0., 1, 2, 3, 4, 100, 101, 102, 103, 104]).view(1, -1, 1)
        assert torch.equal(y, want) and torch.equal(y_unchecked, want)
        for (case, words), msg in zip(CASES.items(), messages):
            assert msg is not None, f"{case.__name__}: rank {rank} raised nothing"
            for w in ["CPContext.unshard", *words]:
                assert w in msg, f"{case.__name__}: {w!r} not in rank {rank}'s message: {msg}"


def _backward_worker(rank, world_size, layout, T, dtype):
    """Each rank sends back a different gradient of the gathered tensor; its input's gradient must be
    its slice of their sum (or mean), and no all_reduce of the whole may run."""
    ctx = build_cp_context(None, seq_len=T, layout=layout)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(args[0].numel())
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    results = {}
    for grad in ("sum", "mean"):
        x = torch.randn(2, ctx.local_len, 3, dtype=dtype, requires_grad=True)
        y = ctx.unshard(x, dim=1, grad=grad)
        upstream = [torch.randn(2, T, 3, generator=torch.Generator().manual_seed(7 * r + 1)).to(dtype)
                    for r in range(world_size)]
        y.backward(upstream[rank])
        total = torch.stack([u.float() for u in upstream]).sum(0) / (world_size if grad == "mean" else 1)
        results[grad] = (x.grad.float(), ctx.shard(total, dim=1))
    dist.all_reduce = all_reduce
    return results, calls


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size,layout,T,dtype", [
    (2, "contiguous", 9, torch.float32),
    (3, "zigzag", 17, torch.float32),     # six parts of 2-3 tokens: pieces of unequal length
    (2, "zigzag", 8, torch.bfloat16),
])
def test_unshard_backward_is_a_reduce_scatter(world_size, layout, T, dtype):
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for rank, (results, calls) in enumerate(run_ranks(_backward_worker, world_size, (layout, T, dtype), timeout=150)):
        assert calls == [], f"rank {rank}: the backward all-reduced {calls} elements"
        for grad, (got, want) in results.items():
            assert got.shape == want.shape
            assert (got - want).abs().max() <= tol * want.abs().max(), (rank, grad, got, want)
