"""Running torchtitan 0.3.0's Trainer on CPU with gloo (development and CI; nothing here runs on a GPU).

torchtitan assumes an accelerator. Each shim below names what fails without it; each is applied only on a
machine with no accelerator (`needs_cpu_shims()`), and each should go when torchtitan stops needing it:

1. `device_type` / `device_module`. `torchtitan.tools.utils` sets them at import to `"cuda"` / `torch.cuda`
   when no accelerator is found, and five modules copy the names (`from ... import device_type`). The
   Trainer's first `device_module.set_device` then fails (`torch._C` has no `_cuda_setDevice`). We set
   `"cpu"` and a `torch.cpu` stand-in that adds the few `torch.cuda` calls torchtitan makes (device name,
   properties, memory stats; memory is then logged as 0).
2. `torch.distributed.set_timeout` does not exist in torch 2.13; the Trainer calls it after step 1
   (`set_pg_timeouts`). A no-op is installed when it is missing.
3. FSDP's `PREMUL_SUM` reduction (which torchtitan's gradient divide factor 1 selects for fp32) is refused by
   gloo: `sum_only_reductions(model)` makes every FSDP unit reduce with SUM (the same gradient: the
   divide factor is 1). Our `parallelize_fn` calls it whenever the process group is gloo.

Settings rather than patches (in our configs, `cpu_settings`): CUDA graphs off, `spmd_backend =
"partial_dtensor"` (the default `spmd_types` needs DTensor parameters our FSDP path doesn't make), fp32
parameters (the default bf16 mixed precision is not one process's fp32), validation off (torchtitan's
Validator shards with its own CP code), and our CP attention as the inner attention (Flex attention has
no CPU backward).
"""
from __future__ import annotations

import importlib
import os
import platform
import types

import torch
import torch.distributed as dist

# the modules that copy `device_type` / `device_module` at import (torchtitan 0.3.0)
_DEVICE_MODULES = ("torchtitan.tools.utils", "torchtitan.distributed.utils", "torchtitan.distributed.parallel_dims",
                   "torchtitan.components.metrics", "torchtitan.models.common.token_dispatcher",
                   "torchtitan.tools.profiler")


class _CPUDeviceModule(types.ModuleType):
    """`torch.cpu` plus the `torch.cuda`-style calls torchtitan makes on its `device_module`."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def set_device(device):
        pass

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def device_count():
        return 1

    @staticmethod
    def get_device_name(device=None):
        return platform.processor() or "cpu"

    @staticmethod
    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name="cpu")

    @staticmethod
    def memory_stats(device=None):
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def synchronize(device=None):
        pass


CPU_DEVICE_MODULE = _CPUDeviceModule("fla_cp_torchtitan_cpu_device")


def needs_cpu_shims() -> bool:
    """True on a machine without an accelerator (torch finds no CUDA/XPU/... device)."""
    return torch._utils._get_available_device_type() is None


def apply_cpu_shims() -> bool:
    """Shims 1 and 2 of the module docstring, when there is no accelerator; idempotent. Returns whether applied."""
    if not needs_cpu_shims():
        return False
    for name in _DEVICE_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = CPU_DEVICE_MODULE
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: None
    return True


def uses_gloo(group=None) -> bool:
    return dist.is_initialized() and dist.get_backend(group) == "gloo"


def sum_only_reductions(model: torch.nn.Module) -> None:
    """Shim 3: every FSDP unit of `model` reduces gradients with SUM (gloo refuses PREMUL_SUM)."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
