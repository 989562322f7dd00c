"""`apply_fsdp2`: shard a CP causal-LM model with FSDP2 over the flattened ("dp", "cp") mesh.

Parallelism as a function over named meshes (torchtitan style): the model stays plain modeling code and
`apply_fsdp2(model, mesh)` turns it into an FSDP2 model whose parameters, gradients and optimizer state
are sharded over all dp x cp ranks, with the gradient reduction that `sync_gradients` would do.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

FLAT_MESH_DIM = "dp_cp"


def flat_dp_cp_mesh(mesh):
    """The 1-D mesh over all ranks of a ("dp", "cp") `DeviceMesh` (dp-major, as `init_cp_mesh` lays
    them out), named "dp_cp". Flattening again returns the same mesh (torch caches it by name)."""
    names = tuple(mesh.mesh_dim_names or ())
    if names != ("dp", "cp"):
        raise ValueError(f"apply_fsdp2 needs a ('dp', 'cp') device mesh (fla_cp.parallel.init_cp_mesh), got {names}")
    return mesh._flatten(FLAT_MESH_DIM)      # torch 2.13 has no public flatten yet


def apply_fsdp2(model: nn.Module, mesh, *, reshard_after_forward: bool = True, mp_policy=None,
                force_sum_reduction: bool | None = None) -> nn.Module:
    """Shard `model` with FSDP2 (`fully_shard`) over every rank of `mesh`; returns `model` (sharded in place).

    `model`: a CP causal-LM model of this package with decoder layers at `model.model.layers`
    (GatedDeltaNetCPForCausalLM, the transformers-based CP models), built with `mesh` (its
    `device_mesh=`), on its training device, identical on every rank (FSDP2 shards the local full
    tensors: broadcast or seed them alike first). `mesh`: the ("dp", "cp") `DeviceMesh` of
    `init_cp_mesh`. Each decoder layer becomes one FSDP unit (its parameters all-gathered for its
    forward / backward only, then freed when `reshard_after_forward`); the root unit holds the rest
    (embeddings, final norm, lm_head, tied or not). Every parameter becomes a `DTensor` sharded on
    dim 0 over the flattened dp x cp mesh (`Shard(0)` over dp·cp ranks); so do its `.grad` and, once
    the optimizer is built on `model.parameters()` after this call, its optimizer state.

    Gradients: each CP rank's `.grad` is its tokens' *partial* gradient (docs/DESIGN.md §6), to be
    summed over CP and averaged over DP. FSDP2 reduce-scatters with a sum over all dp·cp ranks and
    divides by the gradient divide factor, set here to `dp` on every unit: the result is exactly
    `sync_gradients`' (sum over CP, mean over DP), without scaling the loss. Do *not* call
    `sync_gradients` on the sharded model (it would reduce a second time). Backends without
    PREMUL_SUM / AVG reductions (gloo) get FSDP2's SUM-then-divide (`force_sum_reduction`; default:
    on for every backend but NCCL).

    `mp_policy`: an optional `MixedPrecisionPolicy` (e.g. bf16 parameters, fp32 reduction); the
    default keeps the parameters' dtype. Grad clipping: `torch.nn.utils.clip_grad_norm_` handles the
    DTensor gradients (the norm is reduced over the mesh). Checkpoints: `torch.distributed.checkpoint`
    with `get_state_dict` / `set_state_dict` (`fla_cp/utils/checkpoint.py`).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"apply_fsdp2: {type(model).__name__} has no model.model.layers (decoder layers to shard)")
    flat = flat_dp_cp_mesh(mesh)
    kwargs = {"mesh": flat, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in layers:
        fully_shard(layer, **kwargs)
    # the root: embeddings, final norm and lm_head (a tied lm_head shares the embedding's parameter);
    # it stays unsharded after forward anyway (FSDP2 keeps the root's parameters for the backward)
    fully_shard(model, **kwargs)

    dp = mesh["dp"].size()
    if force_sum_reduction is None:
        force_sum_reduction = dist.get_backend(flat.get_group()) != "nccl"
    # set_gradient_divide_factor acts on one unit's own parameters only: set it on every unit
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(dp))
            module.set_force_sum_reduction_for_comms(force_sum_reduction)
    return model


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `model` was sharded by `fully_shard` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)
