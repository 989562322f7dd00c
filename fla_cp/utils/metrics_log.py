"""The loss curve on disk: one row per step, as CSV (`.csv`) or JSON lines (anything else).

    log = MetricsLog("run/loss.jsonl", resume_step=100)   # keeps rows with step <= 100, drops the rest
    log.kept                                              # those rows (the run so far)
    log.write({"step": 101, "loss": 2.31, ...})
    rows = read_log("run/loss.jsonl")

On resume, rows written after the checkpoint by the interrupted run are dropped, so the file is the
curve of one uninterrupted run.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path


def read_log(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


class MetricsLog:
    def __init__(self, path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled, self.fields = Path(path), enabled, None
        self.kept: list[dict] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept = [r for r in read_log(self.path) if resume_step is not None and r["step"] <= resume_step]
        self.path.unlink(missing_ok=True)
        for row in self.kept:
            self.write(row)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.path.suffix == ".csv":
            new = not self.path.is_file()
            self.fields = self.fields or list(row)
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                if new:
                    w.writeheader()
                w.writerow(row)
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
