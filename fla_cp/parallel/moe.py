"""The MoE router's auxiliary load-balancing loss under CP, equal to the single-device value.

transformers' Qwen3-Next and Qwen3.5-MoE add `load_balancing_loss_func(gate_logits, num_experts, top_k,
attention_mask)` (Switch Transformer, eqs. 4-6): over all MoE layers pooled,

    loss = E * sum_e (C_e / R) * (P_e / R)

with C_e the (mask-weighted) number of top-k selections of expert e, P_e the (mask-weighted) sum of its
softmax probabilities and R the number of (unmasked) rows, summed over layers. It is a product of two
token means, so the mean over CP ranks of each rank's own loss is not the global loss. Here every rank
sums C, P and R over its own tokens, one all-reduce makes the global sums, and every rank computes the
same global loss from them. That all-reduce's backward is the identity (`loss._AllReduceIdentityBackward`,
as for the LM loss): rank r's gradient is dL/dP_total * dP_r/dθ, its own tokens' share, and
`sync_gradients` summing the ranks' gradients gives the single-device gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fla_cp.checks import check_agreement, dtype_code, records_graph
from fla_cp.ops import comm
from fla_cp.parallel.loss import _AllReduceIdentityBackward

__all__ = ["load_balancing_loss_cp"]


def _input_error(gate_logits: tuple, num_experts, top_k, attention_mask) -> str | None:
    """Why this rank's arguments can't go into the loss, from metadata alone (no host sync), or None."""
    if len(gate_logits) == 0:
        return "gate_logits is an empty tuple (it needs one [B*T_loc, E] tensor per MoE layer)"
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        return f"num_experts must be a positive int, got {num_experts!r}"
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        return f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}"
    for i, g in enumerate(gate_logits):
        if not torch.is_tensor(g) or g.dim() != 2 or not g.is_floating_point():
            got = f"{g.dtype} of shape {tuple(g.shape)}" if torch.is_tensor(g) else type(g).__name__
            return f"gate_logits[{i}] must be a floating [B*T_loc, E] tensor, got {got}"
        if g.shape[1] != num_experts:
            return f"gate_logits[{i}] has shape {tuple(g.shape)}: {g.shape[1]} experts, but num_experts={num_experts}"
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
            got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
            return f"attention_mask must be this rank's [B, T_loc] shard of the padding mask, got {got}"
        rows = attention_mask.numel()
        for i, g in enumerate(gate_logits):
            if g.shape[0] != rows:
                return (f"gate_logits[{i}] has {g.shape[0]} rows but attention_mask {tuple(attention_mask.shape)} "
                        f"covers B*T_loc={rows} tokens (pass this rank's shard of the mask, in the order of the "
                        f"router's rows: batch-major, then local tokens)")
    return None


def _local_sums(gate_logits: tuple, num_experts: int, top_k: int, attention_mask):
    """This rank's (C [E] fp32 without grad, P [E] fp32 with grad, R: a float, or a 0-d fp32 tensor with a
    mask), summed over layers and rows: transformers' loop, step for step, so that one rank computes
    transformers' value bit for bit (softmax in the logits' dtype, fp32 sums, histc without a mask)."""
    compute_device = gate_logits[0].device
    # (transformers' reasons) histc avoids bincount's host sync; GPU needs integers for determinism,
    # CPU and MPS need floats
    histc_dtype = torch.float32 if compute_device.type in ("cpu", "mps") else torch.int32
    tokens_per_expert_sum = torch.zeros(num_experts, dtype=torch.float32, device=compute_device)
    router_prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=compute_device)
    total_rows = 0.0
    if attention_mask is not None:
        flat_mask = attention_mask.reshape(-1).to(device=compute_device, dtype=torch.float32)
    for layer_gate in gate_logits:
        routing_weights = torch.nn.functional.softmax(layer_gate.to(compute_device), dim=-1)
        _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
        if attention_mask is None:
            tokens_per_expert_sum = tokens_per_expert_sum + torch.histc(
                selected_experts.reshape(-1).to(histc_dtype), bins=num_experts, min=0, max=num_experts)
            router_prob_sum = router_prob_sum + routing_weights.float().sum(dim=0)
            total_rows = total_rows + routing_weights.shape[0]
        else:
            tokens_per_expert_sum = tokens_per_expert_sum + torch.zeros(
                num_experts, dtype=torch.float32, device=compute_device
            ).scatter_add_(0, selected_experts.reshape(-1), flat_mask.repeat_interleave(top_k))
            router_prob_sum = router_prob_sum + (routing_weights.float() * flat_mask.unsqueeze(-1)).sum(dim=0)
            total_rows = total_rows + flat_mask.sum()
    return tokens_per_expert_sum, router_prob_sum, total_rows


def load_balancing_loss_cp(gate_logits, num_experts: int, top_k: int = 2,
                           attention_mask: torch.Tensor | None = None, group=None,
                           verify_agreement: bool = False) -> torch.Tensor | int:
    """transformers' `load_balancing_loss_func` (Qwen3-Next, Qwen3.5-MoE) of the global batch, from this
    rank's shard of the router logits; the same 0-d fp32 tensor on every rank of `group`.

    gate_logits       this rank's router logits, a tuple with one `[B*T_loc, E]` tensor per MoE layer (only
                      the MoE layers, as the models return them), rows in (batch, local token) order. As
                      transformers: None or anything but a tuple (a single tensor, a list) gives the int 0.
    num_experts       E. top_k: experts per token.
    attention_mask    this rank's `[B, T_loc]` shard of the 0/1 padding mask (the same columns as its
                      tokens), or None. Rows are weighted by it; R counts the unmasked rows of all ranks.
    group             the CP process group; None or a group of one rank: exactly transformers' value.
    verify_agreement  also check, in one tiny all_gather before the sums' all-reduce, that every rank's
                      arguments are usable and alike (num_experts, top_k, layers, mask given, dtype):
                      then a rank alone with bad input makes every rank raise the same ValueError.

    Bad input raises a ValueError naming the argument and the rank. Without `verify_agreement` only this
    rank's metadata is checked (no communication, no host sync), before any collective: ranks whose
    arguments are alike in kind (same layers, E, top_k, batch; only T_loc differs) raise together, but a
    rank alone with bad shapes raises while the others wait in the all-reduce. Mask values are not checked
    (as in transformers). An all-zero mask over all ranks gives NaN, as transformers' 0/0.

    Gradient (docs/DESIGN.md §6): the sums' all-reduce has an identity backward, so `loss.backward()` on
    rank r puts on its own logits their share of the single-device gradient (d loss / d P_total times
    d P_r / d logits_r); the ranks' parameter gradients summed by `sync_gradients` are the single-device
    gradient. Every rank of the group must call this (it is a collective when the group has > 1 rank).
    """
    world = comm.world_size(group)
    rank = dist.get_rank(group) if group is not None else 0
    given = gate_logits is not None and isinstance(gate_logits, tuple)
    error = _input_error(gate_logits, num_experts, top_k, attention_mask) if given else None
    if verify_agreement and world > 1:
        ok = given and error is None
        first = gate_logits[0] if ok else None
        check_agreement(group, error, {
            "gate_logits given as a tuple, number of MoE layers": [given, len(gate_logits) if given else 0],
            "num_experts, top_k": [num_experts if ok else 0, top_k if ok else 0],
            "attention_mask given": [attention_mask is not None],
            "dtype and device type of gate_logits": [dtype_code(first.dtype if ok else None),
                                                     dtype_code(first.device.type if ok else None)],
            "records a graph": [records_graph(*gate_logits) if ok else 0],
        }, "load_balancing_loss_cp")
    elif error is not None:
        raise ValueError(f"load_balancing_loss_cp: rank {rank}: {error}")
    if not given:
        return 0
    C, P, R = _local_sums(gate_logits, num_experts, top_k, attention_mask)
    if world > 1:
        # one all-reduce of [C | P | R]; only P carries a gradient, passed back unchanged (see above)
        R = torch.as_tensor(R, dtype=torch.float32, device=P.device).reshape(1)
        stats = _AllReduceIdentityBackward.apply(torch.cat([C, P, R]), group)
        C, P, R = stats[:num_experts], stats[num_experts:2 * num_experts], stats[2 * num_experts]
    # transformers' last steps (R a float without a mask, a 0-d fp32 tensor with one: the same division)
    tokens_per_expert = C / R
    router_prob_per_expert = P / R
    overall_loss = torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    return overall_loss * num_experts
