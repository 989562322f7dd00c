"""Training checkpoints: `save_pretrained` weights plus everything needed to resume exactly.

    save_dir/step_0000100/  config.json, model.safetensors        (model.save_pretrained, rank 0)
                            trainer_state.pt                      optimizer, step, data position, args
                            rng_rank{r}.pt                        every rank's RNG states
    save_dir/latest         the name of the newest complete checkpoint (written last, atomically)

Parameters and optimizer state are replicated over the CP and DP groups (gradients are
synchronised), so rank 0 writes them; RNG states are per rank. Collective: call on every rank.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(save_dir, step: int, model, optimizer, data_state: dict, extra: dict | None = None) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(save_dir) / f"step_{step:07d}"
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "data": data_state,
                    "extra": extra or {}}, path / "trainer_state.pt")
    if dist.is_initialized():
        dist.barrier()
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = Path(save_dir) / "latest.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, Path(save_dir) / "latest")
    return path


def resolve_checkpoint(spec: str, save_dir) -> Path | None:
    """`spec` = "latest" (the newest in save_dir, None if there is none) or a checkpoint directory."""
    if spec != "latest":
        path = Path(spec)
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"--resume {spec}: no trainer_state.pt there")
        return path
    if save_dir is None:
        raise ValueError("--resume without a path needs --save_dir")
    latest = Path(save_dir) / "latest"
    return Path(save_dir) / latest.read_text().strip() if latest.is_file() else None


def load_trainer_state(path: Path, map_location="cpu") -> tuple[dict, dict | None]:
    """(trainer_state, this rank's RNG state or None if it was saved with fewer ranks)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = torch.load(path / "trainer_state.pt", map_location=map_location, weights_only=False)
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return state, rng
