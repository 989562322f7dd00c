"""The few collectives CP needs, written once.

Under gloo, CUDA tensors are staged through host memory: gloo's CUDA support differs between
collectives and versions, and everything sent here is small (states, not activations) except in
`all_gather_varlen`, which only `CPContext.unshard` uses.
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


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group; returns a new tensor (the input is left untouched)."""
    if world_size(group) == 1:
        return t.clone()
    staged = _needs_host_staging(t, group)
    buf = t.detach().cpu().clone() if staged else t.detach().clone().contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device) if staged else buf


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


def check_agreement(group, local_error: str | None, fields: dict[str, list[int | float]], what: str) -> None:
    """Raise the same ValueError on every rank if any rank found bad input or ranks disagree.

    One tiny int64 all_gather carries an error flag plus each field's values; the messages of the
    failing ranks travel only when something is wrong. Floats travel as their exact bits (no rounding:
    0.0 and 1e-12 differ). Call it before any collective whose shapes depend on the checked fields, so
    bad input never turns into a hang.
    """
    rank = dist.get_rank(group) if group is not None else 0
    if world_size(group) == 1:
        if local_error:
            raise ValueError(f"{what}: rank {rank}: {local_error}")
        return
    flat = [1 if local_error else 0] + [_to_int64(v) for vals in fields.values() for v in vals]
    gathered = all_gather(torch.tensor(flat, dtype=torch.long, device=collective_device(group)), group).cpu()
    if gathered[:, 0].any():
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, local_error, group=group)
        bad = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
        raise ValueError(f"{what}: {bad}")
    offset = 1
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
