"""fla_cp's `parallelize_fn` for torchtitan: CP by the model's CP modules, then AC, compile and FSDP2.

torchtitan calls `parallelize_fn(model, parallel_dims=..., ...)` on the meta-device model. CP needs no
module change here: the model config already holds fla_cp's CP modules (`CPGatedDeltaNet`,
`CPInnerAttention`; built alike for the one-process reference and the seed checkpoint), and `CPTrainer`
splits each batch. What this function does is torchtitan's usual tail, in torchtitan's order:

- activation checkpointing (torchtitan's own policies; the CP collectives are re-run on recompute, in the
  same order on every rank);
- torch.compile of each block's per-token parts only (feed-forward / MoE and norms): the CP token mixers
  hold host-side bookkeeping and collectives, so a block can't be one `fullgraph` graph;
- FSDP2 over torchtitan's `fsdp` mesh = dp_shard × cp (torchtitan's `apply_fsdp_to_decoder`). Its gradient
  divide factor is 1: the reduce-scatter sums each rank's gradient of (its tokens' loss sum / the global
  token count), which is one process's gradient of the global mean, for CP ranks as for data-parallel ones.
  Under gloo the reduction is forced to SUM (`cpu.sum_only_reductions`).

Refused with a clear error (not yet built or tested with CP): tensor, pipeline and expert parallelism,
replicated data parallelism (HSDP), and the `spmd_types` / `full_dtensor` SPMD backends.
"""
from __future__ import annotations

import torch.nn as nn
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

from fla_cp.integrations.torchtitan.cpu import sum_only_reductions, uses_gloo
from fla_cp.integrations.torchtitan.layers import CPGatedDeltaNet, CPInnerAttention

# a block's submodules that see one token at a time (safe to compile; everything else stays eager)
_PER_TOKEN_PARTS = ("feed_forward", "moe", "mlp", "attention_norm", "ffn_norm", "attn_norm", "mlp_norm")


def unsupported_parallelism(parallel_dims, parallelism) -> str | None:
    """Why these parallel settings can't run with fla_cp's CP (yet), or None."""
    if parallelism.spmd_backend != "partial_dtensor":
        return (f"parallelism.spmd_backend={parallelism.spmd_backend!r}: fla_cp's configs run with "
                f"'partial_dtensor' (torchtitan's FSDP over the dp_shard x cp mesh)")
    for what, on in (("tensor_parallel_degree", parallel_dims.tp_enabled),
                     ("pipeline_parallel_degree", parallel_dims.pp_enabled),
                     ("expert_parallel_degree", parallel_dims.ep_enabled),
                     ("data_parallel_replicate_degree", parallel_dims.dp_replicate_enabled)):
        if on:
            return f"parallelism.{what} > 1 is not supported with fla_cp's CP yet (use data_parallel_shard_degree)"
    return None


def cp_module_error(model: nn.Module) -> str | None:
    """Why `model` can't run under fla_cp's CP: a token mixer that is not one of fla_cp's CP modules."""
    for name, module in model.named_modules():
        inner = getattr(module, "inner_attention", None)
        if inner is not None and not isinstance(inner, CPInnerAttention):
            return (f"{name}.inner_attention is {type(inner).__name__}, not fla_cp's CPInnerAttention "
                    f"(build the model config with fla_cp.integrations.torchtitan)")
        if type(module).__name__ == "GatedDeltaNet" and not isinstance(module, CPGatedDeltaNet):
            return f"{name} is torchtitan's GatedDeltaNet, not fla_cp's CPGatedDeltaNet"
    return None


def parallelize_cp(model: nn.Module, *, parallel_dims, training, parallelism, compile_config, ac_config,
                   dump_folder: str, **kwargs) -> nn.Module:
    error = unsupported_parallelism(parallel_dims, parallelism) or cp_module_error(model)
    if error:
        raise ValueError(f"fla_cp parallelize_cp: {error}")

    if ac_config is not None:
        ac_config.build(dump_folder=dump_folder).apply(model)

    if compile_config.enable and "model" in compile_config.components:
        for block in model.layers.values():
            block = getattr(block, "_checkpoint_wrapped_module", block)     # under AC, the wrapped block
            for part in _PER_TOKEN_PARTS:
                module = getattr(block, part, None)
                if isinstance(module, nn.Module):
                    module.compile(backend=compile_config.backend)        # in place: parameter names unchanged

    if parallel_dims.fsdp_enabled:
        apply_fsdp_to_decoder(
            model, parallel_dims.get_mesh(["fsdp"]),
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            pp_enabled=False, cpu_offload=training.enable_cpu_offload,
            reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward)
        if uses_gloo():
            sum_only_reductions(model)
    return model
