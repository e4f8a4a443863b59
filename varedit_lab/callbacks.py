"""Lightning callbacks of every training run: step timing, the run summary, validation at the end,
console progress."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from varedit_lab.console import RunConsole, format_duration, format_metric
from varedit_lab.runs import RunFolder


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
    """Writes ``summary.json`` in the run folder when fitting ends (rank 0 only).

    ``{"status", "steps", "metrics": {final scalar metrics}, "strategy": {...}, ...}`` is the contract
    the sweep runner and report read. A resumed run keeps the earlier attempt's metrics unless it
    logs them again, and a resume that trains no step (the run was already finished) rewrites nothing.
    """

    def __init__(self, folder: RunFolder, timer: StepTimer | None = None, extra: dict[str, Any] | None = None,
                 resumed: bool = False):
        self.folder = folder
        self.timer = timer
        self.extra = extra or {}
        self.resumed = resumed
        self.trained = False  # at least one optimisation step in this process

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trained = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (self.trained or not self.resumed):
            self.write(trainer, "completed")

    def write(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        earlier = (self.folder.read_summary() or {}).get("metrics", {}) if self.resumed else {}
        metrics = {**earlier, **self.extra.get("metrics", {}), **final_metrics(trainer, self.timer)}
        summary: dict[str, Any] = {**self.extra, "status": status, "steps": int(trainer.global_step), "metrics": metrics}
        data_report = getattr(trainer.datamodule, "report", None)
        if callable(data_report):
            summary["data"] = data_report()
        if error:
            summary["error"] = error
        self.folder.write_summary(summary)


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


class ValidateAtEnd(pl.Callback):
    """Validate after the last step even when ``max_steps`` is not a multiple of the validation
    interval: asking the trainer to stop at the last step makes Lightning run its validation loop
    (and the best-checkpoint callback) before fitting ends."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


PENDING_ROW_KEY = "varedit_pending_metrics_row"


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and after the final step, so that a finished
    run's ``last.ckpt`` is the finished model (``edit``, ``probe``, ``resume=auto`` read it). Files are
    overwritten in place, never versioned (``last-v1.ckpt``): one current ``last.ckpt`` per folder."""

    def __init__(self, dirpath: Any, every_n_train_steps: int) -> None:
        super().__init__(dirpath=dirpath, filename="step{step:06d}", auto_insert_metric_name=False, save_last=True,
                         every_n_train_steps=every_n_train_steps, save_top_k=0, enable_version_counter=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = 0 < trainer.max_steps <= trainer.global_step
        if final and trainer.global_step % max(1, self._every_n_train_steps) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Lightning writes the step's CSV row *after* on_train_batch_end, where this checkpoint is
        # saved: a kill in between would lose that row for good (the resume starts at the next step).
        # The checkpoint carries it; the resumed run's history restores it (training.HistoryCSVLogger).
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("train/") and not key.endswith("_epoch") and value.numel() == 1}
        if metrics and trainer.global_step > 0:
            checkpoint[PENDING_ROW_KEY] = {"step": trainer.global_step - 1, "epoch": trainer.current_epoch, **metrics}


class ConsoleProgress(pl.Callback):
    """Progress on the console and in ``console.log`` (rank 0): ``step 120/400 (30 %)``, the training
    metric that matters, time per step and the ETA, about ``lines`` times per run; the validation
    metrics after each validation; a final line with the result.

    ``echo_steps=False`` (a TQDM bar shows the steps) keeps the step lines in ``console.log`` only.
    """

    def __init__(self, console: RunConsole, label: str, train_metric: str, val_metrics: tuple[str, ...],
                 echo_steps: bool = True, lines: int = 10) -> None:
        self.console = console
        self.label = label
        self.train_metric = train_metric
        self.val_metrics = val_metrics
        self.echo_steps = echo_steps
        self.lines = lines
        self._start = 0.0
        self._start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        if trainer.is_global_zero:
            resumed = f" (resuming at step {trainer.global_step})" if trainer.global_step else ""
            self.console.say(f"{self.label}: training {trainer.max_steps} steps{resumed}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        every = max(1, total // self.lines) if total > 0 else 50
        if not trainer.is_global_zero or (step % every and step != 1):
            return
        per_step = (time.perf_counter() - self._start) / max(1, step - self._start_step)
        parts = [f"step {step}/{total} ({100 * step / total:.0f} %)" if total > 0 else f"step {step}"]
        value = _scalar(trainer.callback_metrics.get(self.train_metric))
        if value is not None:
            parts.append(format_metric(self.train_metric, value))
        parts.append(f"{per_step:.2f} s/step")
        if total > 0:
            parts.append(f"ETA {format_duration(per_step * (total - step))}")
        self.console.say(f"{self.label}: " + " · ".join(parts), echo=self.echo_steps)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = self._values(trainer, self.val_metrics)
        if values:
            self.console.say(f"{self.label}: validation at step {trainer.global_step}: {values}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not self._start:  # a resume of a finished run: no training in this process
            self.console.say(f"{self.label}: nothing to train (the run already reached step {trainer.global_step})")
            return
        took = format_duration(time.perf_counter() - self._start)
        values = self._values(trainer, self.val_metrics) or self._values(trainer, (self.train_metric,))
        result = f" · {values}" if values else ""
        self.console.say(f"{self.label}: done, {trainer.global_step} steps in {took}{result}")

    @staticmethod
    def _values(trainer: pl.Trainer, names: tuple[str, ...]) -> str:
        found = [(name, _scalar(trainer.callback_metrics.get(name))) for name in names]
        return " · ".join(format_metric(name, value) for name, value in found if value is not None)


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    return value if isinstance(value, float) and math.isfinite(value) else None
