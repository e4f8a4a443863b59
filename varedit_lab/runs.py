"""One run folder: where a training run keeps its files, and the rules that keep them safe.

::

    runs/<name>/
      config.yaml          the resolved run config
      metrics.csv          every logged metric, the whole history across resumes
      summary.json         status, steps, final metrics (what sweeps and reports read)
      checkpoints/         last.ckpt (resume), best.ckpt (by trainer.checkpoint_monitor); dirs under fsdp/fsdp2
      val_edits/           validation edit grids
      console.log          the console's progress and result lines, and the libraries' info messages
      samples.jsonl        per-sample validation values of the last validation (paired statistics)
      wandb/               the W&B run (offline unless logger.mode=online)
      previous/attempt-N/  what an earlier attempt left when the folder was reused without resuming

A folder holds exactly one current run: starting afresh in a used folder first moves the earlier
attempt's files to ``previous/attempt-N/`` (nothing is deleted), so ``checkpoints/last.ckpt`` is
always the current run's. This module imports no torch: sweeps and reports use it too.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The files and folders of a run (everything but previous/); moved together when a folder is reused.
RUN_ARTIFACTS = ("config.yaml", "metrics.csv", "summary.json", "samples.jsonl", "checkpoints", "val_edits", "probes",
                 "wandb", "hparams.yaml", "tokenizer.pt", "console.log")


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    # -- names -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def val_edits(self) -> Path:
        return self.path / "val_edits"

    @property
    def previous(self) -> Path:
        return self.path / "previous"

    # -- summary -----------------------------------------------------------------------------------
    def read_summary(self) -> dict[str, Any] | None:
        """``summary.json`` as a dict, or None when absent or unreadable."""
        try:
            data = json.loads(self.summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float))

    @property
    def completed(self) -> bool:
        summary = self.read_summary()
        return bool(summary) and summary.get("status") == "completed"

    def metric(self, name: str) -> float | None:
        """A finite final metric from ``summary.json``, else None."""
        value = ((self.read_summary() or {}).get("metrics") or {}).get(name)
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    # -- reuse ---------------------------------------------------------------------------------------
    def artifacts(self) -> list[Path]:
        return [self.path / name for name in RUN_ARTIFACTS if (self.path / name).exists()]

    def archive_previous_attempt(self) -> Path | None:
        """Move an earlier attempt's files to ``previous/attempt-N/`` (N = 1, 2, ...); None if there were none."""
        artifacts = self.artifacts()
        if not artifacts:
            return None
        number = 1 + max((int(p.name.split("-")[1]) for p in self.previous.glob("attempt-*") if p.name.split("-")[1].isdigit()), default=0)
        target = self.previous / f"attempt-{number}"
        target.mkdir(parents=True)
        for path in artifacts:
            shutil.move(str(path), str(target / path.name))
        return target


__all__ = ["RUN_ARTIFACTS", "RunFolder"]
