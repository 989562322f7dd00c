"""Training checkpoints: `save_pretrained` weights plus everything needed to resume exactly.

Two formats, one layout; `save_checkpoint` picks the format from the model:

    save_dir/step_0000100/  config.json, generation_config.json,   the HF copy of the weights (rank 0):
                            model.safetensors                     `from_pretrained(path)` loads it
                            trainer_state.pt                      step, data position, args (+ optimizer)
                            rng_rank{r}.pt                        every rank's RNG states
                            dcp/.metadata, dcp/__{r}_0.distcp     sharded format only (below)
    save_dir/latest         the name of the newest complete checkpoint (written last, atomically)

- "full" (a replicated model: parameters and optimizer state identical on every rank, gradients
  synchronised): rank 0 writes `model.save_pretrained` and the optimizer's `state_dict()` inside
  trainer_state.pt.
- "dcp" (an FSDP2 model, `fla_cp.parallel.apply_fsdp2`): the model and optimizer state go through
  `torch.distributed.checkpoint` (DCP) as `{"model": ..., "optimizer": ...}` in `dcp/`, every rank
  writing its own shards (`get_state_dict` / `dcp.save`): no rank ever holds the full optimizer
  state. The HF copy is gathered to rank 0 (`get_model_state_dict(full_state_dict=True,
  cpu_offload=True)`) so that the directory still loads with `from_pretrained`; trainer_state.pt
  holds no optimizer.

`load_model_and_optimizer` reads either format into a model and optimizer of either kind (FSDP2 or
replicated), with any number of ranks and any dp x cp split (DCP reshards on load). Collective: call every function that
saves or loads model / optimizer state on every rank.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DCP_DIR = "dcp"        # the sharded model + optimizer state of a "dcp" checkpoint, inside step_XXXXXXX/


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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(save_dir, step: int, model, optimizer, data_state: dict, extra: dict | None = None) -> Path:
    """Write `save_dir/step_{step:07d}/` and point `save_dir/latest` at it; returns the directory.

    The format follows the model: "dcp" for an FSDP2 model (sharded model + optimizer state, plus an
    HF copy gathered on rank 0), "full" otherwise (see the module docstring). Collective."""
    from fla_cp.parallel.fsdp import is_fsdp2
    rank, sharded = _rank(), is_fsdp2(model)
    path = Path(save_dir) / f"step_{step:07d}"
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    if sharded:
        _save_sharded(path, model, optimizer)
        optimizer_state = None
    else:
        if rank == 0:
            model.save_pretrained(path)
        optimizer_state = optimizer.state_dict() if rank == 0 else None
    if rank == 0:
        torch.save({"step": step, "format": "dcp" if sharded else "full", "optimizer": optimizer_state,
                    "data": data_state, "extra": extra or {}}, path / "trainer_state.pt")
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        tmp = Path(save_dir) / "latest.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, Path(save_dir) / "latest")
    return path


def _save_sharded(path: Path, model, optimizer) -> None:
    """DCP shards of the model and optimizer (every rank its own), then the HF copy on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)       # DTensor shards, keyed by FQN
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / DCP_DIR))
    # the consolidated weights: gathered one tensor at a time and kept (on CPU) by rank 0 only
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        # save_pretrained drops a tied lm_head and names the architecture without FSDP2's class prefix
        model.save_pretrained(path, state_dict=full)
    del full


def checkpoint_format(trainer_state: dict) -> str:
    """"dcp" or "full" (checkpoints from before the DCP format have no "format": full)."""
    return trainer_state.get("format", "full")


def load_model_and_optimizer(path: Path, trainer_state: dict, model, optimizer) -> None:
    """Restore the model and optimizer state of checkpoint `path` (its `trainer_state`) in place.

    `model` / `optimizer`: replicated, or FSDP2 (`apply_fsdp2`) with the optimizer built on its
    sharded parameters; any world size and dp x cp split. A "dcp" checkpoint loads both from its
    shards (DCP reshards them to this run's layout). A "full" checkpoint's weights are the caller's
    to load, by building the model with `from_pretrained(path)` (before `apply_fsdp2`); its
    optimizer state comes from trainer_state.pt (sharded here for an FSDP2 model). Collective."""
    from fla_cp.parallel.fsdp import is_fsdp2

    if checkpoint_format(trainer_state) == "dcp":
        _load_sharded(path, model, optimizer)
    elif not is_fsdp2(model):
        optimizer.load_state_dict(trainer_state["optimizer"])
    else:   # an FSDP2 run resuming a replicated checkpoint: the full optimizer state by name, sharded here
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        by_name = optimizer_state_by_name(trainer_state["optimizer"], optimizer, model)
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _load_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # the state dicts of this run's model / optimizer (sharded or not) are the templates DCP fills in
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def optimizer_state_by_name(state: dict, optimizer, model) -> dict:
    """`optimizer.state_dict()`-format `state` (parameters numbered in param-group order) keyed by the
    parameters' names instead, the format of `torch.distributed.checkpoint.state_dict`'s full optimizer
    state dicts. `optimizer` must hold the same groups of the same parameters in the same order as
    the optimizer that saved `state` (the training script builds both alike); `model` names them."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(current) != len(saved):
        raise ValueError(f"the checkpoint's optimizer holds {len(saved)} parameters, this one {len(current)}")
    name_of = dict(zip(saved, current))
    return {"state": {name_of[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]}


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
    rank = _rank()
    state = torch.load(path / "trainer_state.pt", map_location=map_location, weights_only=False)
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return state, rng
