"""Local backends for the CP operator: `torch` (any device) and `triton` (FLA kernels + ours)."""
from __future__ import annotations

import torch

from fla_cp.ops.backends.torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "triton")
_CONTRACT = ("prepare", "kept", "summarize", "forward", "state_grad", "backward")


def get_backend(name, device: torch.device, world_size: int = 1):
    """The backend called `name`; "auto" is triton on CUDA and torch elsewhere. A backend object
    (see `base.LocalBackend`, e.g. `TritonBackend(chunk_size=64, local_kernels="fla")`) is used as is.

    A backend may define `check_device(device, world_size)`, raising ValueError when it cannot run a
    call of `world_size` ranks on `device`: called here, on this rank's inputs' device, so that the op
    reports it in its agreement check before any collective instead of failing inside one."""
    if not isinstance(name, str) and all(hasattr(name, m) for m in _CONTRACT):
        backend = name
    elif name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or an object with the methods {_CONTRACT} "
                         f"(fla_cp.ops.backends.base), got {name!r}")
    else:
        if name == "auto":
            name = "triton" if device.type == "cuda" else "torch"
        if name == "torch":
            return TorchBackend()
        from fla_cp.ops.backends.triton_backend import TritonBackend
        backend = TritonBackend()
    check = getattr(backend, "check_device", None)
    if check is not None:
        check(device, world_size)
    return backend
