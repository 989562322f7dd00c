"""The language-model loss under CP: labels shifted on the global sequence, one global token mean.

Each rank sums the cross-entropy of its own tokens; one all-reduce of (sum, count) over the CP group
gives the global mean, identical on every rank. That all-reduce's backward is the identity, so each
rank's parameter gradients are the *partial* contribution of its tokens, and their sum over the group
(`sync_gradients`) is the single-device gradient. Computations every rank repeats in full (gathered
logits, replicated decode steps) scale their gradient by 1/P (`replicated_grad`) so that sum counts
them once. docs/DESIGN.md §6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
from fla.modules.l2warp import l2_warp

from fla_cp.checks import IGNORE_INDEX
from fla_cp.ops import comm


def shift_labels_globally(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets on the global sequence: `out[:, t] = labels[:, t+1]`; -100 at the last token
    of every row and, with packed `cu_seqlens`, of every document (never the next document's first)."""
    out = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    if cu_seqlens is not None:
        ends = torch.as_tensor(cu_seqlens, device=labels.device)[1:].long() - 1
        out[:, ends] = IGNORE_INDEX
    return out


def usable_labels(shift_labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the labels with every value outside the vocabulary (other than -100) ignored, how many there were
    as a 0-d tensor). No host sync: under CP a rank whose shard holds a bad label must not raise alone
    (the others would wait in the loss's all-reduce); the count travels in that all-reduce instead and
    makes the global loss NaN on every rank (`global_loss`). The full check (a new call signature, or
    `FLA_CP_DEBUG=1`) raises a ValueError naming the rank before any of this."""
    valid = (shift_labels == IGNORE_INDEX) | ((shift_labels >= 0) & (shift_labels < vocab_size))
    return torch.where(valid, shift_labels, IGNORE_INDEX), (~valid).sum()


def fla_loss_kernels_run_on(device: torch.device) -> bool:
    """FLA's fused loss kernels are Triton kernels for CUDA (they refuse CPU tensors)."""
    return device.type == "cuda"


class _AllReduceIdentityBackward(torch.autograd.Function):
    """Sum over the CP group; backward passes the gradient through unchanged, so every rank keeps the
    partial gradient of its own tokens (summed over the group later by `sync_gradients`)."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def replicated_grad(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """`t` unchanged; its gradient scaled by 1/world_size. For a tensor every CP rank computes in full
    (logits of gathered hidden states, decode steps): every rank backpropagates the same loss through it,
    `sync_gradients` sums the ranks' gradients, so each rank contributes 1/world_size of it."""
    if world_size > 1 and t.requires_grad:
        t.register_hook(lambda g: g / world_size)
    return t


def token_loss_sum(logits, shift_labels, hidden_states=None, lm_head=None, fuse_cross_entropy=False) -> torch.Tensor:
    """Sum of this rank's token losses (fp32), with FLA's kernels where they run (CUDA) and torch's
    cross-entropy elsewhere (the same value):
        logits None          FLA's fused linear + cross-entropy on `hidden_states` and `lm_head`
        fuse_cross_entropy   FLA's fused cross-entropy; as in FLA, its backward overwrites the
                             logits with their gradient (inplace_backward)"""
    if logits is None:
        return FusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
            hidden_states, shift_labels, lm_head.weight, lm_head.bias)
    if fuse_cross_entropy and fla_loss_kernels_run_on(logits.device):
        return FusedCrossEntropyLoss(ignore_index=IGNORE_INDEX, inplace_backward=True, reduction="sum")(
            logits.flatten(0, -2), shift_labels.flatten()).float()
    return F.cross_entropy(logits.flatten(0, -2).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction='sum')


def global_loss(loss_sum: torch.Tensor, shift_labels: torch.Tensor, cp, num_items_in_batch=None,
                l2warp_logits: torch.Tensor | None = None, unusable: torch.Tensor | None = None) -> torch.Tensor:
    """Global token-mean cross-entropy (or global sum / num_items_in_batch), the same on all CP ranks,
    from this rank's `loss_sum` over its `shift_labels`. One all-reduce of (sum, count) under CP.

    As FLA's: NaN when every label is -100 (torch's mean of nothing). `unusable`: this rank's count of
    labels or token ids that were out of range (`usable_labels`): NaN on every rank when any rank had one.
    `l2warp_logits`: FLA's `l2_warp` on these (this rank's) logits, a gradient on every position's max
    logit scaled by 1/(B*T) of the global batch: each rank applies it to its own tokens, so the ranks' partial gradients sum to FLA's.
    """
    count = (shift_labels != IGNORE_INDEX).sum().to(loss_sum)
    stats = torch.stack([loss_sum, count] + ([unusable.to(loss_sum)] if unusable is not None else []))
    if cp is not None and cp.world_size > 1:
        stats = _AllReduceIdentityBackward.apply(stats, cp.group)
    loss = stats[0] if num_items_in_batch is not None else stats[0] / stats[1].detach()
    if unusable is not None:
        loss = torch.where(stats[2].detach() > 0, torch.full_like(loss, float("nan")), loss)
    if l2warp_logits is not None:
        total_len = cp.total_len if cp is not None else l2warp_logits.shape[1]
        # FLA's factor is 1e-4 / (B * T) of the logits it sees: here the global T, not T_loc
        loss = l2_warp(loss, l2warp_logits, 1e-4 * l2warp_logits.shape[1] / total_len)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss
