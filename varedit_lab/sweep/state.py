"""The local runner's state: ``<sweep_dir>/sweep.json``, rewritten atomically after every change.

Layout of a sweep directory::

    <sweep_dir>/sweep.json              this state (sweep file, runs, statuses, timings)
    <sweep_dir>/.lock                   held (flock) while a runner works on the directory
    <sweep_dir>/runs/<run>/train.log    stdout+stderr of every attempt of the run
    <sweep_dir>/runs/<run>/...          what ``varedit-lab train`` writes (config.yaml, metrics.csv,
                                        summary.json, checkpoints, W&B run)
    <sweep_dir>/summary.csv, report.md, *.png   the report

Paths inside ``sweep.json`` are relative to the sweep directory, so the directory can be moved.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from varedit_lab.sweep.spec import SweepError

STATE_FILE = "sweep.json"
STATE_VERSION = 1
# pending: not started · running: a process is (or was, if the runner died) working on it ·
# completed: summary.json says so · failed: non-zero exit or no completed summary ·
# interrupted: stopped by Ctrl-C/SIGTERM (run again by the next invocation, unlike failed) ·
# stopped: ended early by the sweep's early_terminate (hyperband); kept, never rerun.
STATUSES = ("pending", "running", "completed", "failed", "interrupted", "stopped")


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class RunRecord:
    name: str
    params: dict[str, Any]
    status: str = "pending"
    command: list[str] = field(default_factory=list)
    run_dir: str = ""  # relative to the sweep dir
    log: str = ""  # relative to the sweep dir
    exit_code: int | None = None
    pid: int | None = None  # of the latest attempt's process
    job_id: str | None = None  # of the latest attempt's submitit job (--launcher submitit)
    gpus: list[str] | None = None  # CUDA_VISIBLE_DEVICES of the latest attempt (None: not set)
    attempts: int = 0
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SweepState:
    name: str
    sweep_file: str | None
    sweep: dict[str, Any]  # the sweep file's content when the state was last written
    overrides: list[str] = field(default_factory=list)  # applied to every run
    runs: list[RunRecord] = field(default_factory=list)
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    version: int = STATE_VERSION

    def run(self, name: str) -> RunRecord | None:
        return next((r for r in self.runs if r.name == name), None)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for record in self.runs:
            out[record.status] = out.get(record.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["runs"] = [asdict(r) for r in self.runs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepState":
        runs = [RunRecord.from_dict(r) for r in data.get("runs", [])]
        known = {f for f in cls.__dataclass_fields__} - {"runs"}
        return cls(runs=runs, **{k: v for k, v in data.items() if k in known})


def state_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE_FILE


def load_state(sweep_dir: Path) -> SweepState | None:
    path = state_path(sweep_dir)
    if not path.is_file():
        return None
    try:
        return SweepState.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise SweepError(f"{path}: unreadable sweep state ({err}); move it away to start the sweep afresh") from None


def save_state(state: SweepState, sweep_dir: Path) -> None:
    """Write ``sweep.json`` atomically (a crash mid-write never leaves half a file)."""
    state.updated = now()
    path = state_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(sweep_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the sweep directory; a second runner on it fails at once.

    ``flock`` is released by the kernel when the process dies, so a killed runner never leaves a
    stale lock behind.
    """
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise SweepError(f"{sweep_dir}: another sweep runner (pid {holder}) is using this directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
