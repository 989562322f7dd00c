"""Local backends for the CP operator: `torch` (any device) and `triton` (FLA kernels + ours).

One vocabulary picks the kernels everywhere in fla_cp (the op's, the layer's, the config's and the
short conv's `backend=`), `BACKENDS`:

- "triton": our Triton kernels and FLA's (FLA's chunk kernels, its `causal_conv1d`), on CUDA; off
  CUDA only inside Triton's interpreter (tests: TRITON_INTERPRET=1 before FLA is imported, and the
  interpreter patches of `scripts/triton_patches.py`);
- "torch": the pure-PyTorch path, on any device;
- "auto": triton on CUDA, torch elsewhere.
"""
from __future__ import annotations

import warnings

import torch

from fla_cp.ops.backends.torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "triton")
_CONTRACT = ("prepare", "kept", "summarize", "forward", "state_grad", "backward")


def is_backend_object(backend) -> bool:
    """A backend object (`base.LocalBackend`): what the op's `backend=` takes besides `BACKENDS`."""
    return not isinstance(backend, str) and all(hasattr(backend, m) for m in _CONTRACT)


def check_backend_name(value, name: str = "backend", objects: bool = False) -> None:
    """ValueError naming the argument `name` unless `value` is one of `BACKENDS` (or, with `objects`, a
    backend object)."""
    if isinstance(value, str) and value in BACKENDS or objects and is_backend_object(value):
        return
    extra = " or a backend object (fla_cp.ops.backends.base)" if objects else ""
    raise ValueError(f"{name} must be one of {BACKENDS}{extra}, got {value!r}")


def merge_deprecated_backends(backend, kernel_backend=None, conv_backend=None, who: str = "",
                              objects: bool = False, stacklevel: int = 3):
    """`backend`, with the deprecated `kernel_backend=` / `conv_backend=` of `who` folded in (a
    FutureWarning naming the replacement). They were two choices and are one now: values other than
    "auto" (conv's "fla" is "triton") must agree with each other and with a `backend` other than
    "auto", else ValueError. A backend object as `kernel_backend` (with `objects`) is the result; the
    short conv then runs "auto". Validates every value, naming its argument."""
    if kernel_backend is None and conv_backend is None:
        check_backend_name(backend, "backend", objects)
        return backend
    given = ", ".join(f"{n}={v!r}" for n, v in (("kernel_backend", kernel_backend), ("conv_backend", conv_backend))
                      if v is not None)
    warnings.warn(f"{who}: {given} is deprecated: use backend= (one of {BACKENDS}), which picks the "
                  f"operator's and the short conv's kernels together; the old names go in the next release",
                  FutureWarning, stacklevel=stacklevel)
    check_backend_name(backend, "backend", objects)
    if kernel_backend is not None:
        check_backend_name(kernel_backend, "kernel_backend", objects)
    if conv_backend is not None:
        if conv_backend == "fla":
            conv_backend = "triton"
        elif conv_backend not in BACKENDS:
            raise ValueError(f"conv_backend must be one of {BACKENDS} (or the deprecated 'fla', now 'triton'), "
                             f"got {conv_backend!r}")
    chosen = [v for v in (backend, kernel_backend, conv_backend)
              if v is not None and not (isinstance(v, str) and v == "auto")]
    objects_given = [v for v in chosen if not isinstance(v, str)]
    names = {v for v in chosen if isinstance(v, str)}
    if len(objects_given) > 1 or len(names) > 1 or objects_given and names:
        raise ValueError(f"{who}: backend={backend!r}, {given} ask for different kernels; they are one choice "
                         f"now: pass backend= alone (one of {BACKENDS})")
    return chosen[0] if chosen else "auto"


def get_backend(name, device: torch.device, world_size: int = 1):
    """The backend called `name`; "auto" is triton on CUDA and torch elsewhere. A backend object
    (see `base.LocalBackend`, e.g. `TritonBackend(chunk_size=32)`) is used as is.

    A backend may define `check_device(device, world_size)`, raising ValueError when it cannot run a
    call of `world_size` ranks on `device`: called here, on this rank's inputs' device, so that the op
    reports it in its agreement check before any collective instead of failing inside one."""
    if is_backend_object(name):
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
