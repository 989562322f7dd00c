"""Spawn a gloo process group of P ranks on this machine and run one function on every rank.

    results = run_ranks(fn, world_size=3, args=(...,))   # list of fn's return values, by rank

`fn(rank, world_size, *args)` runs in a fresh process with `torch.distributed` initialised (gloo,
default group) and the suite's Triton patches applied (`_interpret.enable_test_patches`). Any
exception on any rank is re-raised here with that rank's traceback; a rank that
hangs is killed after `timeout` seconds and the call fails, so a test never hangs the suite.
"""
from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # the suite's Triton patches, as in the pytest process (conftest.py): fla_cp applies none
        from _interpret import enable_test_patches
        enable_test_patches()
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # serialise to bytes: tensors sent through the queue as shared memory would vanish when
        # this process exits before the parent reads them
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 240.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
            if errors:
                break  # the others may now wait forever on a collective
    except Exception as e:  # queue.Empty: somebody hung
        raise TimeoutError(f"ranks did not finish within {timeout}s (results from {sorted(results)})") from e
    finally:
        for p in procs:
            p.join(timeout=0 if errors else 10)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
