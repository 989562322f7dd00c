"""`sync_gradients`: make `.grad` the single-device gradient of the global batch on every rank."""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fla_cp import checks
from fla_cp.ops import comm


def sync_gradients(model: nn.Module) -> None:
    """Sum `.grad` over the CP group and average it over the DP group, on every rank.

    `model` is a CP model or any module holding one (a user's wrapper with its own layers, DDP-like
    wrappers): *every* parameter under `model` is reduced, over the CP group of the CP model(s) found
    among `model.modules()` (summed: each rank holds its tokens' partial gradient) and averaged over
    their DP group when there is one. Call after `loss.backward()` on every rank; every rank must have
    gradients for the same parameters (checked, on the first call and whenever this rank's set of
    parameters with a gradient changes, or always under `FLA_CP_DEBUG=1`: see `fla_cp.checks`). One
    flattened all-reduce per group.

    Until then, gradients that reach anything upstream of the CP model are per-rank partial sums too:
    `inputs_embeds.grad` (the model shards the embeddings, so a rank's gradient is zero outside its
    tokens) and the parameters of modules that compute those inputs (a projector, soft prompts); a
    module applied to the model's local outputs likewise. Summing over the CP group makes them exact.
    What the wrapper computes identically on every CP rank outside the model (e.g. a weight penalty
    added to the loss) is summed cp_size times: scale such a term by `1 / cp_size`. The model's own
    replicated computations (gathered logits, replicated forwards) already carry that factor.
    """
    owner = _cp_model_in(model)
    cp_group, dp_group = (owner.cp_group, owner.dp_group) if owner is not None else (None, None)
    params = list(model.parameters())
    has_grad = [p.grad is not None for p in params]
    grads = [p.grad for p, has in zip(params, has_grad) if has]
    fields = checks.gradient_fields(has_grad)
    # (what every rank computes alike for the same model: its parameters' sizes, and which hold a gradient)
    signature = (checks.checksum([p.numel() for p in params]), checks.signature_of(fields))
    for group in (cp_group, dp_group):
        if group is None or dist.get_world_size(group) == 1:
            continue
        if owner._cp_agreed.needs_check("sync_gradients", group, signature):
            checks.check_agreement(group, None, fields, what="sync_gradients")
            owner._cp_agreed.agreed("sync_gradients", group, signature)
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)                   # a fresh buffer: reduced in place
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        comm.all_reduce_sum_(flat, cp_group)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        comm.all_reduce_sum_(flat, dp_group).div_(dist.get_world_size(dp_group))
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _cp_model_in(model: nn.Module):
    """The CP model inside `model` (the first, when all share their groups), or None. Raises when they
    hold different groups, or when torch.distributed runs more than one process and `model` holds no
    CP model (nothing would say which group to reduce over, and silently skipping it leaves every
    rank with partial gradients)."""
    from fla_cp.parallel.model import CPModelMixin
    found = {}
    for m in model.modules():
        if isinstance(m, CPModelMixin) and hasattr(m, "cp_group"):
            found.setdefault((id(m.cp_group), id(m.dp_group)), m)
    if len(found) > 1:
        raise ValueError(f"sync_gradients: {type(model).__name__} holds CP models with different process groups; "
                         f"call sync_gradients on each of them separately")
    if not found:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(f"sync_gradients: no GatedDeltaNetCP model found in {type(model).__name__} (no fla_cp "
                             f"CP model of any family: searched model.modules()), so no CP / DP group to reduce "
                             f"the gradients over")
        return None
    return next(iter(found.values()))
