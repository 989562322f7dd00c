"""`--config` functions for `python -m torchtitan.train --module fla_cp.integrations.torchtitan --config <name>`.

    qwen3_5_tiny      torchtitan's Qwen3.5 (text), 6 GDN + 2 gated-attention layers, dim 64, byte vocabulary:
                      CPU-sized, fp32, our packed local data (no downloads)
    qwen3_5_0_8b      torchtitan's Qwen3.5 0.8B flavor (text) for GPUs: bf16 mixed precision, torchtitan's
                      HF text data loader (c4) and the tokenizer in --hf_assets_path
    gdn_tiny          fla_cp's GatedDeltaNet (FLA's architecture), preset `tiny` (2 GDN layers, dim 64)
    gdn_hybrid_tiny   preset `hybrid-tiny`: 3 GDN layers + 1 softmax-attention layer (FLA's `attn` config)

Every config runs `CPTrainer` (fla_cp's batch split) and fla_cp's `parallelize_fn`. Without an accelerator the
CPU shims are applied on import (`cpu.py`; the gloo reduction one in `parallelize_cp`), and the configs pick the
settings listed there.
"""
from __future__ import annotations

try:
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
except ImportError as e:   # a RuntimeError: torchtitan's --module loader swallows ImportErrors raised here
    raise RuntimeError(f"fla_cp.integrations.torchtitan needs torchtitan 0.3.0: pip install 'fla_cp[torchtitan]' "
                       f"({type(e).__name__}: {e})") from e

from fla_cp.integrations.torchtitan.cpu import apply_cpu_shims
from fla_cp.integrations.torchtitan.data import ByteTokenizer, PackedTextDataLoader
from fla_cp.integrations.torchtitan.gated_deltanet import gdn_model_spec
from fla_cp.integrations.torchtitan.qwen3_5 import qwen3_5_model_spec
from fla_cp.integrations.torchtitan.trainer import CPTrainer

apply_cpu_shims()


def _trainer_config(model_spec, *, seq_len: int, local_batch_size: int, steps: int, lr: float, cpu_sized: bool,
                    **fields) -> CPTrainer.Config:
    config = CPTrainer.Config(
        model_spec=model_spec,
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=model_spec.model.vocab_size)),
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8, decay_type="linear",
                                                  min_lr_factor=0.0),
        training=TrainingConfig(local_batch_size=local_batch_size, seq_len=seq_len, steps=steps),
        metrics=MetricsProcessor.Config(log_freq=1),
        # torchtitan's FSDP over dp_shard x cp (the other SPMD backends are refused by parallelize_cp)
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(interval=500, last_save_model_only=False),
        **fields)
    # torchtitan's Validator shards with its own CP code; CPTrainer refuses it
    config.validator.enable = False
    # the CP split is built on the host per batch: a CUDA graph would freeze the first one (CPTrainer insists)
    config.training.disable_cuda_graphs = True
    if cpu_sized:
        config.training.mixed_precision_param = "float32"      # fp32 throughout: comparable to one process
        config.activation_checkpoint = None
    return config


def _cpu_data() -> dict:
    """fla_cp's byte tokenizer and packed local data (Python's own sources unless --dataloader.dataset_path)."""
    return {"tokenizer": ByteTokenizer.Config(), "dataloader": PackedTextDataLoader.Config(), "hf_assets_path": ""}


def qwen3_5_tiny() -> CPTrainer.Config:
    return _trainer_config(qwen3_5_model_spec("tiny"), seq_len=256, local_batch_size=2, steps=3, lr=1e-3,
                           cpu_sized=True, **_cpu_data())


def qwen3_5_0_8b() -> CPTrainer.Config:
    return _trainer_config(qwen3_5_model_spec("0.8B"), seq_len=32768, local_batch_size=1, steps=1000, lr=3e-4,
                           cpu_sized=False, tokenizer=HuggingFaceTokenizer.Config(),
                           dataloader=HuggingFaceTextDataLoader.Config(dataset="c4"),
                           hf_assets_path="./assets/hf/Qwen3.5-0.8B")


def gdn_tiny() -> CPTrainer.Config:
    return _trainer_config(gdn_model_spec("tiny"), seq_len=256, local_batch_size=2, steps=3, lr=1e-3,
                           cpu_sized=True, **_cpu_data())


def gdn_hybrid_tiny() -> CPTrainer.Config:
    return _trainer_config(gdn_model_spec("hybrid-tiny"), seq_len=256, local_batch_size=2, steps=3, lr=1e-3,
                           cpu_sized=True, **_cpu_data())
