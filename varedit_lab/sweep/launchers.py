"""How the runner starts one run: a local process, or a cluster job through ``submitit``.

Both give the runner the same handle (``poll``, ``returncode``, ``interrupt``, ``kill``, ``wait``),
so queueing, state, resume and the report do not depend on where a run executes.

``--launcher submitit`` submits each run as a job (SLURM on a cluster; submitit's local executor in
tests) with the executor parameters of a launcher preset (``experiments/launch/submitit.yaml``:
partition, time limit, GPUs, CPUs, ...). The job runs the same command line as the local runner,
plus ``resume=auto``, and writes the run's ``train.log``. On a SLURM time-out or preemption
submitit requeues the job (the function is checkpointable), and the requeued job continues from
the run's newest checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import submitit
import yaml

from varedit_lab.sweep.spec import SweepError

LAUNCHERS = ("local", "submitit")
DEFAULT_SUBMITIT_PRESET = "submitit.yaml"  # under experiments/launch/


class RunHandle(Protocol):
    pid: int | None
    job_id: str | None

    def poll(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    def interrupt(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self) -> None: ...


class LocalProcess:
    """A run in its own session (the runner can signal it and every DDP rank it starts)."""

    job_id = None

    def __init__(self, command: list[str], log: Any, env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True
        )
        self.pid: int | None = self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def interrupt(self) -> None:
        self._signal_group(signal.SIGINT)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def wait(self) -> None:
        self.process.wait()


class RunCommand(submitit.helpers.Checkpointable):
    """What a submitit job executes: the run's command, its output appended to the run's log.

    Checkpointable: on a SLURM time-out or preemption submitit resubmits this same call, and the
    command's ``resume=auto`` continues from the run's newest checkpoint.
    """

    def __init__(self, command: list[str], log_path: str, env: Mapping[str, str]) -> None:
        self.command, self.log_path, self.env = list(command), log_path, dict(env)

    def __call__(self) -> int:
        with open(self.log_path, "a") as log:
            return subprocess.run(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, **self.env}).returncode


class SubmititRun:
    """A run as a submitit job; its return code is the command's (a failed job counts as 1)."""

    pid = None

    def __init__(self, job: submitit.Job) -> None:
        self.job = job
        self.job_id: str | None = str(job.job_id)
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is None and self.job.done():
            try:
                self._code = int(self.job.result())
            except Exception:  # noqa: BLE001 - the job itself failed (its stderr is in the submitit folder)
                self._code = 1
        return self._code

    @property
    def returncode(self) -> int | None:
        return self._code

    def interrupt(self) -> None:
        self.job.cancel(check=False)

    def kill(self) -> None:
        self.job.cancel(check=False)

    def wait(self) -> None:
        self.job.wait()
        self.poll()


@dataclass
class SubmititLauncher:
    """Submits runs with the executor parameters of a launcher preset; jobs' files go to ``folder``."""

    folder: Path
    cluster: str | None
    parameters: dict[str, Any]

    def start(self, command: list[str], log_path: Path, env: Mapping[str, str]) -> SubmititRun:
        executor = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
        executor.update_parameters(**self.parameters)
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}  # only what the runner sets
        return SubmititRun(executor.submit(RunCommand([*command, "resume=auto"], str(log_path), changed)))


def read_submitit_preset(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(cluster, executor parameters) of a launcher preset; unknown parameters fail at submission."""
    if not path.is_file():
        raise SweepError(f"--launcher-config: no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a launcher preset must be a mapping of submitit executor parameters")
    cluster = data.pop("cluster", None)
    if cluster not in (None, "slurm", "local", "debug"):
        raise SweepError(f"{path}: 'cluster' is {cluster!r}; valid: slurm, local, debug (or leave it out to detect)")
    return cluster, data


def submitit_launcher(sweep_dir: Path, preset: Path) -> SubmititLauncher:
    cluster, parameters = read_submitit_preset(preset)
    launcher = SubmititLauncher(sweep_dir / "submitit", cluster, parameters)
    try:  # unknown parameters fail now, naming the key, not at the first submission
        submitit.AutoExecutor(folder=str(launcher.folder), cluster=cluster).update_parameters(**parameters)
    except (ValueError, TypeError, NameError) as err:
        raise SweepError(f"{preset}: {err}") from None
    return launcher
