"""Memory figures that mean the same on every device.

    peak_memory_bytes(device)   cuda: max_memory_allocated; cpu: the process's peak resident set
    reset_peak_memory(device)   (cuda only; a process's peak RSS cannot be reset, hence the
                                benchmark's fresh process per measurement)
    with SavedActivations(exclude=model.parameters()) as saved: loss = model(...).loss
    saved.bytes                 bytes of tensors autograd saved for backward, each storage once
"""
from __future__ import annotations

import resource
import sys

import torch


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024     # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class SavedActivations:
    """Counts the bytes autograd saves for backward inside the `with` block.

    Each underlying storage is counted once (views of one buffer are one buffer), and storages that
    belong to the excluded tensors (the parameters: they exist anyway) are not counted. Tensors a
    custom autograd.Function keeps as plain attributes of `ctx` bypass the hooks and are not seen.
    """

    def __init__(self, exclude=()):
        self._excluded = {self._key(t) for t in exclude}
        self._seen: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(t: torch.Tensor):
        s = t.untyped_storage()
        return (t.device, s.data_ptr())

    def _pack(self, t: torch.Tensor):
        key = self._key(t)
        if key not in self._excluded and key not in self._seen:
            self._seen[key] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def count(self) -> int:
        return len(self._seen)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
