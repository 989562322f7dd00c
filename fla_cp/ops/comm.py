"""The few collectives CP needs, written once.

Under gloo, CUDA tensors are staged through host memory: gloo's CUDA support differs between
collectives and versions, and what the operator sends is small (states, not activations). Only
`CPContext.unshard` moves activation-sized data: `all_gather_varlen` forward and
`reduce_scatter_varlen` backward (and the model's conv halo, a few tokens per rank, goes through
`all_gather`).
"""
from __future__ import annotations

import struct
import zlib

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


class _NameCode(int):
    """An agreement-field integer that stands for a name (a dtype, a device type): mismatch messages
    print the names back."""


# every name a rank may send, so that a message can name the other rank's value too
_CODE_NAMES = {zlib.crc32(str(x).encode()): str(x) for x in
               [*{v for v in vars(torch).values() if isinstance(v, torch.dtype)},
                "cpu", "cuda", "meta", "mps", "xpu", "hpu", "mtia", "privateuseone"]}


def dtype_code(dtype: torch.dtype | str | None) -> int:
    """The same integer for the same dtype (or device type) in every process, for agreement fields;
    0 for None. Mismatch messages show the name."""
    if dtype is None:
        return _NameCode(0)
    code = zlib.crc32(str(dtype).encode())
    _CODE_NAMES.setdefault(code, str(dtype))
    return _NameCode(code)


def _shown(n: int, local_value) -> object:
    """A gathered field value as a message shows it (decoded like the local value it sits beside)."""
    if isinstance(local_value, float):
        return _bits_float(n)
    if isinstance(local_value, _NameCode):
        return "None" if n == 0 else _CODE_NAMES.get(n, n)
    return n


def content_code(t: torch.Tensor) -> int:
    """A position-weighted checksum of an integer (or 0/1) tensor, for agreement fields: equal on ranks
    holding the same values (int64 arithmetic is exact everywhere), different for almost any change.
    One host sync."""
    return int(content_sum(t))


def content_sum(t: torch.Tensor) -> torch.Tensor:
    """`content_code` as a 0-d int64 tensor on `t`'s device, to be read in one sync with other values."""
    x = t.reshape(-1).long()
    # distinct per-position multipliers, so that moving a value changes the sum
    return (x * (torch.arange(x.numel(), device=x.device) * 2654435761 % 2147483647 + 1)).sum()


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", n))[0]


def _to_int64(v) -> int:
    """A field value as one int64: floats by their bits, ints beyond int64 by a hash (still equal
    exactly when equal), so packing never raises on one rank only."""
    if isinstance(v, float):
        return _float_bits(v)
    v = int(v)
    return v if -2 ** 63 <= v < 2 ** 63 else zlib.crc32(str(v).encode())


def records_graph(*tensors) -> bool:
    """Whether an op on `tensors` joins an autograd graph here (grad mode on and an input requires
    grad): then its backward will run, and for a CP op that backward is a collective every rank of
    the group must join. A cheap agreement field: a rank under `no_grad` while the others record a
    graph raises in the forward instead of leaving them in a backward collective alone."""
    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)


# First slot of every agreement vector: a rank whose gathered row lacks it sent something else, i.e. it
# is in another collective (a state all_gather) whose bytes happened to pair with this one.
_AGREEMENT_TAG = 0x464C_4143_5041_4752   # "FLACPAGR"
# Agreement vectors are padded to a multiple of this many int64 slots, so that the usual checks (far
# fewer fields) all gather the same size: two ranks in different checks then meet in one all_gather
# and the header tells them so, instead of gloo aborting on a size mismatch.
_AGREEMENT_SLOTS = 64
_NAME_SLOTS = 8   # the check's name, its first 64 bytes as text (for messages: another rank's name)
_HEADER = 4 + _NAME_SLOTS   # tag, name code, name text, number of field values, error flag


def _name_slots(what: str) -> list[int]:
    raw = what.encode()[:8 * _NAME_SLOTS].ljust(8 * _NAME_SLOTS, b"\0")
    return list(struct.unpack(f"<{_NAME_SLOTS}q", raw))


def _slots_name(slots: list[int]) -> str:
    return struct.pack(f"<{_NAME_SLOTS}q", *slots).rstrip(b"\0").decode(errors="replace")


def check_agreement(group, local_error: str | None, fields: dict[str, list[int | float]], what: str) -> None:
    """Raise the same ValueError on every rank if any rank found bad input or ranks disagree.

    One tiny int64 all_gather carries a header (a tag, the check's name, the number of values, an error
    flag) plus each field's values, padded to a fixed size; the messages of the failing ranks travel only
    when something is wrong. Floats travel as their exact bits (no rounding: 0.0 and 1e-12 differ).
    Call it before any collective whose shapes depend on the checked fields, so bad input never turns
    into a hang.

    Ranks out of step (one skipped a backward, or passed `verify_agreement` differently, so this
    all_gather meets another collective on some rank): when the sizes happen to match, a gathered row
    without the tag, or from another check, raises "ranks are in different collectives" on the ranks
    that see it (the rank in the other collective receives this vector as its data and cannot tell);
    when they differ, gloo aborts or the collective hangs, which no check can prevent.
    """
    rank = dist.get_rank(group) if group is not None else 0
    if world_size(group) == 1:
        if local_error:
            raise ValueError(f"{what}: rank {rank}: {local_error}")
        return
    values = [_to_int64(v) for vals in fields.values() for v in vals]
    flat = [_AGREEMENT_TAG, zlib.crc32(what.encode()), *_name_slots(what), len(values), 1 if local_error else 0]
    flat += values
    flat += [0] * (-len(flat) % _AGREEMENT_SLOTS)
    gathered = all_gather(torch.tensor(flat, dtype=torch.long, device=collective_device(group)), group).cpu()
    stray = (gathered[:, 0] != _AGREEMENT_TAG).nonzero().flatten().tolist()
    if stray:
        raise ValueError(f"{what}: rank {rank}: ranks are in different collectives (a rank skipped the "
                         f"backward, verify_agreement differs between ranks, or ranks called different "
                         f"functions): rank {stray[0]} sent "
                         f"something other than an agreement check")
    count = _HEADER - 2
    other = ((gathered[:, 1] != gathered[0, 1]) | (gathered[:, count] != gathered[0, count])).nonzero()
    if other.numel():
        r = int(other[0])
        names = [_slots_name(gathered[i, 2:count].tolist()) for i in (0, r)]
        raise ValueError(f"{what}: rank {rank}: ranks are in different collectives (a rank skipped the "
                         f"backward, verify_agreement differs between ranks, or ranks called different "
                         f"functions): rank 0 is in {names[0]}'s "
                         f"agreement check with {int(gathered[0, count])} values, rank {r} in {names[1]}'s "
                         f"with {int(gathered[r, count])}")
    if gathered[:, _HEADER - 1].any():
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, local_error, group=group)
        bad = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
        raise ValueError(f"{what}: {bad}")
    offset = _HEADER
    for name, vals in fields.items():
        cols = gathered[:, offset:offset + len(vals)]
        offset += len(vals)
        differ = (cols != cols[0]).any(dim=1).nonzero().flatten().tolist()
        if differ:
            r = differ[0]
            shown = [[_shown(n, v) for n, v in zip(row.tolist(), vals)]
                     for row in (cols[0], cols[r])]
            raise ValueError(f"{what}: {name} differs between ranks: rank 0 has {shown[0]}, "
                             f"rank {r} has {shown[1]} (seen on rank {rank})")
