"""Start torch.distributed the same way under torchrun, under plain `python`, on CPU and on GPU.

    info = init_distributed()       # DistInfo(rank, world_size, local_rank, device, backend)
    ...
    cleanup_distributed()

Backend: NCCL when CUDA is available and every local rank has a GPU of its own; otherwise gloo
(CPU tensors, or several ranks sharing one GPU, which NCCL refuses). Without torchrun's environment
this is a one-rank group, so scripts keep a single code path.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool = True     # False when the caller had already initialised torch.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_backend(local_world_size: int) -> tuple[str, torch.device]:
    """(backend, device) for this process: NCCL only when each local rank has its own GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % n)
        return ("nccl" if local_world_size <= n else "gloo"), device
    return "gloo", torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float = 1800, use_device: bool = True) -> DistInfo:
    """Join (or create) the default process group. `use_device=False`: a CPU-only gloo group that
    never touches CUDA (for a coordinating parent whose children measure GPU memory)."""
    if dist.is_initialized():              # already inside a group (e.g. a test's spawned ranks)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
    if "RANK" not in os.environ:          # plain `python script.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    auto_backend, device = pick_backend(local_world_size) if use_device else ("gloo", torch.device("cpu"))
    backend = backend or auto_backend
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if not owns_group:
        backend = dist.get_backend()
    else:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, device, backend, owns_group)


def cleanup_distributed(info: DistInfo | None = None) -> None:
    """Destroy the default group, unless `info` says the caller created it (then it is theirs)."""
    if dist.is_initialized() and (info is None or info.owns_group):
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
