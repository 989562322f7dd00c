"""Process groups of a CP model: the ("dp", "cp") device mesh and how a model finds its groups."""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist

# `from_pretrained` hands (device_mesh, cp_group) to `__init__` through this, because HF's own
# `from_pretrained` would take `device_mesh` for tensor parallelism.
_PENDING_GROUPS: contextvars.ContextVar = contextvars.ContextVar("fla_cp_pending_groups", default=(None, None))


def init_cp_mesh(cp_size: int, device_type: str | None = None):
    """A `DeviceMesh` with dims ("dp", "cp") over the world: CP groups are consecutive ranks.

    Returns None when `cp_size == 1` and torch.distributed is not initialised (single process).
    """
    cp_size = int(cp_size)
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not (dist.is_available() and dist.is_initialized()):
        if cp_size > 1:
            raise ValueError(f"cp_size={cp_size} needs torch.distributed: launch with torchrun and call "
                             f"torch.distributed.init_process_group() first, or use cp_size=1")
        return None
    world = dist.get_world_size()
    if world % cp_size:
        raise ValueError(f"cp_size={cp_size} does not divide the world size {world} (world = dp x cp)")
    from torch.distributed.device_mesh import init_device_mesh
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world // cp_size, cp_size), mesh_dim_names=("dp", "cp"))


def resolve_cp_groups(config, device_mesh=None, cp_group=None):
    """(cp_group, dp_group) from an explicit group, a mesh, the groups `from_pretrained` passed, or
    `config.cp_size` (a fresh ("dp", "cp") mesh); sets `config.cp_size` to the CP group's size."""
    if device_mesh is None and cp_group is None:
        device_mesh, cp_group = _PENDING_GROUPS.get()
    if device_mesh is not None and cp_group is not None:
        raise ValueError("pass either device_mesh or cp_group, not both")
    dp_group = None
    if cp_group is None:
        if device_mesh is None:
            device_mesh = init_cp_mesh(config.cp_size)
        if device_mesh is not None:
            if tuple(device_mesh.mesh_dim_names or ()) != ("dp", "cp"):
                raise ValueError(f"device_mesh must have dims ('dp', 'cp'), got {device_mesh.mesh_dim_names}")
            cp_group = device_mesh["cp"].get_group()
            if device_mesh["dp"].size() > 1:
                dp_group = device_mesh["dp"].get_group()
    size = dist.get_world_size(cp_group) if cp_group is not None else 1
    if config.cp_size not in (1, size):
        raise ValueError(f"config.cp_size={config.cp_size} but the CP group has {size} ranks")
    config.cp_size = size
    return cp_group, dp_group


@contextlib.contextmanager
def groups_for_from_pretrained(device_mesh, cp_group):
    """Inside, a CP model built without explicit groups takes these (HF's `from_pretrained` builds the
    model itself and would take `device_mesh=` for tensor parallelism)."""
    token = _PENDING_GROUPS.set((device_mesh, cp_group))
    try:
        yield
    finally:
        _PENDING_GROUPS.reset(token)
