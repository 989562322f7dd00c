"""One training batch as every CP layer of a torchtitan model sees it (`CPBatch`), built by `CPTrainer`.

torchtitan hands the model an `attention_masks` dict that reaches every layer unchanged (Qwen3.5's blocks
pick `"deltanet"` or `"quadratic_attention"`). `CPTrainer` puts one `CPBatch` under both keys: the rows of
the `[B, L]` batch are flattened into one packed row `[1, B·L]` whose document boundaries (`positions ==
0`, and every row start) are the global `cu_seqlens`; under CP that row is split by a `CPContext`
(fla_cp's layouts), and each rank's layers get its `[1, T_loc]` tokens. One process (CP = 1) runs the same
path with the packed boundaries, so the reference and the CP run compute the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fla_cp.ops.context import CPContext, build_cp_context

# torchtitan's mask-dict keys (Qwen35TransformerBlock.attn_mask_key); our GDN family reads the same
MASK_KEYS = ("deltanet", "quadratic_attention")


@dataclass(eq=False)
class CPBatch:
    """What the CP layers of one forward need.

    cp: this rank's `CPContext` (CP > 1), or None for one process.
    cu_seqlens: with `cp` None, the packed document boundaries `[N+1]` (long, on the tokens' device) of the
        `[1, B·L]` row; with `cp`, None (the context holds them).
    """
    cp: CPContext | None
    cu_seqlens: torch.Tensor | None

    def masks(self) -> dict:
        return {key: self for key in MASK_KEYS}


def document_boundaries(positions: torch.Tensor) -> list[int]:
    """Global packed boundaries of a `[B, L]` batch flattened row by row: every token whose position is 0
    starts a document, and so does every row's first token. Host ints (one device-to-host copy)."""
    B, L = positions.shape
    starts = (positions == 0)
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1)).flatten().tolist()
    return flat + [B * L]


def as_cp_batch(attention_masks, who: str) -> CPBatch:
    """The `CPBatch` a layer was handed, or a clear error: these layers run only under `CPTrainer` (or
    with a `CPBatch` built by hand)."""
    if isinstance(attention_masks, CPBatch):
        return attention_masks
    if isinstance(attention_masks, dict):
        for key in MASK_KEYS:
            if isinstance(attention_masks.get(key), CPBatch):
                return attention_masks[key]
    raise ValueError(
        f"{who}: attention_masks must be an fla_cp CPBatch (built by fla_cp.integrations.torchtitan.CPTrainer "
        f"from the batch's positions), got {type(attention_masks).__name__}; train with one of "
        f"fla_cp.integrations.torchtitan's configs, whose Trainer builds it")


def build_cp_batch(positions: torch.Tensor, group, layout: str, verify_agreement: bool) -> CPBatch:
    """The `CPBatch` of a `[B, L]` batch with per-document `positions`, split over `group` (None: one
    process). `verify_agreement`: check (one tiny all_gather) that every rank of the group describes the
    same split, as `build_cp_context` does."""
    cu = document_boundaries(positions)
    if group is None:
        return CPBatch(cp=None, cu_seqlens=torch.tensor(cu, dtype=torch.long, device=positions.device))
    cp = build_cp_context(group, cu_seqlens=cu, layout=layout, verify_agreement=verify_agreement)
    return CPBatch(cp=cp, cu_seqlens=None)


def shard_rows(x: torch.Tensor, batch: CPBatch) -> torch.Tensor:
    """`[B, L, ...]` -> this rank's `[1, T_loc, ...]` of the flattened row (all of it for one process)."""
    flat = x.reshape(1, -1, *x.shape[2:])
    return batch.cp.shard(flat, dim=1) if batch.cp is not None else flat
