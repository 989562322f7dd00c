"""Qwen3.5 under exact CP in one sitting: a transformers checkpoint, loaded unchanged, trained and sampled.

    torchrun --nproc_per_node=2 scripts/qwen3_5_quickstart.py        # CP=2 on CPU (gloo)
    python scripts/qwen3_5_quickstart.py                             # one process (cp_size 1)

No downloads: a tiny Qwen3.5 config is saved by transformers' own class into a temporary directory (a
real checkpoint directory works the same way). Every CP rank loads it with
`AutoModelForCausalLM.from_pretrained(dir, cp_size=P)`, passes the same batch, and gets the loss
transformers' model computes in one process (printed side by side), then trains a few steps and
generates greedily, as one process would.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import fla_cp  # noqa: E402,F401  (maps Qwen3.5 / Qwen3.5-MoE / Qwen3-Next to the CP classes)
from transformers import AutoModelForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig  # noqa: E402

from fla_cp.models import sync_gradients  # noqa: E402


def main() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    config = Qwen3_5TextConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                               linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3_5-tiny"
        if rank == 0:                                  # a checkpoint, as transformers saves one
            torch.manual_seed(0)
            Qwen3_5ForCausalLM(config).save_pretrained(path)
        paths = [str(path)]
        if world > 1:
            dist.broadcast_object_list(paths)           # one directory for every rank (rank 0's)
        model = AutoModelForCausalLM.from_pretrained(paths[0], cp_size=world).train()
        reference = Qwen3_5ForCausalLM.from_pretrained(paths[0]).train()     # transformers, one process
        ids = torch.randint(0, 256, (2, 257), generator=torch.Generator().manual_seed(1))
        ours = model(input_ids=ids, labels=ids).loss
        theirs = reference(input_ids=ids, labels=ids, use_cache=False).loss
        if rank == 0:
            print(f"{type(model).__name__}, cp_size={world}: loss {ours.item():.6f}; "
                  f"transformers' {type(reference).__name__}, one process: {theirs.item():.6f}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(1, 6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            sync_gradients(model)                       # sum over CP ranks: the one-device gradient
            optimizer.step()
            optimizer.zero_grad()
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}")
        model.eval()
        with torch.no_grad():
            tokens = model.generate(ids[:1, :16], max_new_tokens=8, do_sample=False)
        if rank == 0:
            print("greedy continuation:", tokens[0, 16:].tolist())
        if world > 1:
            dist.barrier()                              # rank 0 removes the directory last
    if world > 1:
        dist.destroy_process_group()
    return 0 if abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()) else 1


if __name__ == "__main__":
    sys.exit(main())
