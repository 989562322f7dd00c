"""fla_cp's CP as a torchtitan model plugin (torchtitan 0.3.0; `pip install 'fla_cp[torchtitan]'`).

    torchrun --nproc_per_node=4 -m torchtitan.train --module fla_cp.integrations.torchtitan \\
        --config qwen3_5_tiny --parallelism.context_parallel_degree 2 --parallelism.data_parallel_shard_degree 2

Pieces (one job each):
    config_registry.py  the `--config` functions
    trainer.py          CPTrainer: torchtitan's Trainer whose batch hook splits with fla_cp's CPContext
    batch.py            CPBatch: what the CP layers of one forward need, handed through `attention_masks`
    layers.py           CPGatedDeltaNet (torchtitan's Qwen3.5 GDN, CP forward), CPInnerAttention
    qwen3_5.py          torchtitan's Qwen3.5, text only, with the CP modules
    gated_deltanet.py   fla_cp's GatedDeltaNet (FLA's architecture, pure or hybrid) as a torchtitan model
    state_dict.py       HF checkpoint adapters (Qwen3.5 text / VLM checkpoints, FLA GatedDeltaNet names)
    hf_config.py        a model config from a checkpoint's config.json (`--hf_config`)
    parallelize.py      parallelize_fn: AC, compile of per-token parts, FSDP2 over dp_shard x cp
    data.py             byte tokenizer and packed local data (no downloads)
    cpu.py              the CPU / gloo shims (each named, applied only without an accelerator)
    check.py            the exactness check (scripts/torchtitan_check.sh): CP runs vs one process

Importing this package imports nothing from torchtitan; its modules need torchtitan installed.
"""
