"""`CPTrainer`: torchtitan's Trainer with fla_cp's batch split (no torchtitan code edited).

The only change to the training step is `post_dataloading_process`, torchtitan's documented hook between
the data loader and the model: instead of torchtitan's CP sharding (head-tail per row, BlockMask masks
only) it flattens the `[B, L]` batch into one packed row, takes the documents from `positions`, splits the
row with fla_cp's `CPContext` (`cp_layout`), and hands the layers a `CPBatch` through the
`attention_masks` dict (`batch.py`). Everything else is torchtitan's: the loss is each rank's token-sum
over the global valid-token count (counted before the split), FSDP sums gradients over dp_shard × cp,
clipping takes the global norm, and the logged loss is summed over the loss mesh. So any layout is exact.

Extra settings (CLI flags, e.g. `--cp_layout contiguous`): `cp_layout`, `cp_backend` (the CP modules'
kernels), `hf_config` (a checkpoint's architecture), `metrics_file` (rank 0 appends one JSON line per logged
step: step, loss, grad_norm; the exactness checks read it).

CUDA graphs are always off: the CP split is built on the host for every batch (its boundaries and collective
sizes change with the documents), which a captured graph would freeze at the first batch.

Every rank of a CP group must load the same batch (torchtitan's loaders and ours do: the data is sharded over
dp only). The split is checked across the group for each new batch shape (B, L); same-shaped batches that
differ between CP ranks are only caught with FLA_CP_DEBUG=1, which checks every step (fla_cp's check policy).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from fla_cp import checks
from fla_cp.integrations.torchtitan.batch import build_cp_batch, shard_rows
from fla_cp.integrations.torchtitan.cpu import apply_cpu_shims
from fla_cp.integrations.torchtitan.layers import set_cp_backend
from fla_cp.ops.context import LAYOUTS


class CPTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        cp_layout: str = "zigzag"
        """How fla_cp splits the packed batch over the CP group: "zigzag" (balanced causal work) or "contiguous"."""

        metrics_file: str = ""
        """If set, rank 0 appends {"step", "loss", "grad_norm"} as one JSON line per logged step."""

        hf_config: str = ""
        """A checkpoint directory (or its config.json): the model takes its architecture (transformers' Qwen3.5,
        or FLA's GatedDeltaNet) instead of the config's flavor. Load its weights with
        --checkpoint.initial_load_path <dir> --checkpoint.initial_load_in_hf."""

        cp_backend: str = ""
        """The CP modules' kernels: "auto" (Triton / flash-attn on CUDA, torch on CPU), "triton", "torch"; empty:
        as the config function chose ("auto" in ours)."""

    def __init__(self, config: Config):
        if config.cp_layout not in LAYOUTS:
            raise ValueError(f"CPTrainer: --cp_layout must be one of {LAYOUTS}, got {config.cp_layout!r}")
        if config.cp_backend not in ("", "auto", "triton", "torch"):
            raise ValueError(f"CPTrainer: --cp_backend must be auto, triton or torch, got {config.cp_backend!r}")
        if config.validator.enable:
            raise ValueError("CPTrainer: --validator.enable is not supported: torchtitan's Validator shards "
                             "batches with its own CP code, which can't split GatedDeltaNet layers")
        if not config.training.disable_cuda_graphs:
            logger.warning("CPTrainer: CUDA graphs are turned off (the CP split is built on the host per batch)")
            config.training.disable_cuda_graphs = True
        apply_cpu_shims()
        if config.hf_config:
            self._use_hf_architecture(config)
        if config.cp_backend:
            set_cp_backend(config.model_spec.model, config.cp_backend)
        super().__init__(config)
        self._agreed = checks.AgreedSignatures()
        if config.metrics_file and torch.distributed.get_rank() == 0:
            self._log_metrics_to(config.metrics_file)

    @staticmethod
    def _use_hf_architecture(config: Config) -> None:
        """`--hf_config`: the model spec for the checkpoint's architecture (before torchtitan reads the spec)."""
        from fla_cp.integrations.torchtitan.hf_config import model_spec_from_hf
        config.model_spec = model_spec_from_hf(config.hf_config)
        loss_fn = getattr(config.loss, "loss_fn", config.loss)        # ChunkedLossWrapper's, or the loss itself
        if hasattr(loss_fn, "global_vocab_size"):
            loss_fn.global_vocab_size = config.model_spec.model.vocab_size

    def post_dataloading_process(self, input_dict, labels):
        inputs = input_dict["input"]
        others = sorted(k for k in input_dict if k not in ("input", "positions"))
        if others:
            raise ValueError(f"CPTrainer: batch keys {others} are not supported; text batches carry 'input' "
                             f"and 'positions' (per-document positions, 0 at each document start)")
        B, L = inputs.shape
        positions = input_dict.get("positions")
        if positions is None:        # every row is one document
            positions = torch.arange(L, device=inputs.device).expand(B, L)
        elif positions.shape != inputs.shape:
            raise ValueError(f"CPTrainer: positions {tuple(positions.shape)} must match input {tuple(inputs.shape)}")

        group = self.parallel_dims.get_mesh("cp").get_group() if self.parallel_dims.cp_enabled else None
        # every rank of a CP group loads the same batch; its split is checked once per batch shape
        # (FLA_CP_DEBUG=1: every step), like fla_cp's other checks
        signature = (B, L, self.config.cp_layout)
        verify = group is not None and self._agreed.needs_check("torchtitan batch", group, signature)
        batch = build_cp_batch(positions, group, self.config.cp_layout, verify_agreement=verify)
        if verify:
            self._agreed.agreed("torchtitan batch", group, signature)

        inputs, labels, positions = (shard_rows(t, batch) for t in (inputs, labels, positions))
        self.ntokens_seen += labels.numel()
        return inputs, labels, {"positions": positions, "attention_masks": batch.masks()}

    def _log_metrics_to(self, path: str) -> None:
        log = self.metrics_processor.log

        def log_and_record(step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs):
            with open(path, "a") as fh:
                fh.write(json.dumps({"step": int(step), "loss": float(global_avg_loss),
                                     "grad_norm": float(grad_norm)}) + "\n")
            return log(step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs)

        self.metrics_processor.log = log_and_record
