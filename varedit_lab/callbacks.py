"""Lightning callbacks of every training run: step timing, the run summary, data epoch seeding."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Wall time of each optimisation step (forward, backward, optimizer), without data loading.

    Logs ``perf/train_step_s`` (median of the recent steps) and keeps every measurement for the
    run summary. The first ``skip`` steps (warm-up, allocator growth) are excluded.
    """

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)
            if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
                pl_module.log("perf/train_step_s", self.median())

    def median(self) -> float:
        return statistics.median(self.times[-200:]) if self.times else math.nan


class RunSummary(pl.Callback):
    """Writes ``summary.json`` in the run directory when fitting ends (rank 0 only).

    ``{"status", "steps", "metrics": {final scalar metrics}, "strategy": {...}, "seq_len"}`` is the
    contract the sweep runner and report read.
    """

    def __init__(self, run_dir: str | Path, timer: StepTimer | None = None, extra: dict[str, Any] | None = None):
        self.path = Path(run_dir) / "summary.json"
        self.timer = timer
        self.extra = extra or {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_summary(self.path, "completed", trainer, self.timer, self.extra)


def final_metrics(trainer: pl.Trainer, timer: StepTimer | None) -> dict[str, float]:
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = float(value)
        elif isinstance(value, (int, float)):
            metrics[key] = float(value)
    if timer is not None and timer.times:
        metrics["perf/train_step_s"] = timer.median()
    return metrics


def write_summary(
    path: Path, status: str, trainer: pl.Trainer | None, timer: StepTimer | None, extra: dict[str, Any], error: str | None = None
) -> None:
    summary: dict[str, Any] = {"status": status, **extra}
    if trainer is not None:
        summary["steps"] = int(trainer.global_step)
        summary["metrics"] = {**summary.get("metrics", {}), **final_metrics(trainer, timer)}
    if error:
        summary["error"] = error
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))
