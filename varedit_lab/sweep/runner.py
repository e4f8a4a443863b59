"""The local sweep runner: one training process per run, resumable, with progress and a report.

Each run is ``varedit-lab train EXPERIMENT.yaml key=value ...`` in its own process (the sweep file's
``command`` with its macros expanded), so DDP ranks, crashes and W&B runs stay isolated and every
rank reads the same parameters from argv. The runner adds the per-run settings
``output_dir=<sweep_dir>/runs name=<run> logger.group=<sweep> logger.name=<run>`` and records
everything in ``<sweep_dir>/sweep.json`` (see :mod:`varedit_lab.sweep.state`).

A run is *completed* when its process exits 0 and its ``summary.json`` says ``completed``; rerunning
the sweep skips completed runs, re-runs interrupted ones and retries failed ones only with
``retry_failed``.

On a GPU machine ``--parallel K`` gives every run its own ``CUDA_VISIBLE_DEVICES`` (``trainer.devices``
GPUs each; :mod:`.gpus`); ``--launcher submitit`` submits each run as a cluster job instead
(:mod:`.launchers`); a sweep's ``early_terminate`` (hyperband) kills runs below a bracket's cut
(:mod:`.early_stop`).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from omegaconf import DictConfig

from varedit_lab.config import ConfigError, experiments_dir, load_config
from varedit_lab.console import PROGRESS_MARK
from varedit_lab.sweep.claims import freeze_claims
from varedit_lab.sweep.early_stop import STOPPED, check_early_terminate, runs_to_stop
from varedit_lab.sweep.gpus import GpuPool, gpus_needed, plan_slots, visible_gpus
from varedit_lab.sweep.launchers import DEFAULT_SUBMITIT_PRESET, LAUNCHERS, LocalProcess, RunHandle, SubmititLauncher, submitit_launcher
from varedit_lab.sweep.plan import Proposal, cap_for, grid_proposals, propose
from varedit_lab.sweep.spec import RUNNER_KEYS, SweepError, SweepSpec, agent_command, expand_command
from varedit_lab.sweep.state import RunRecord, SweepState, load_state, locked, now, save_state

DEFAULT_ROOT = Path("runs") / "sweeps"
LOG_NAME = "train.log"


@dataclass
class SweepOptions:
    max_runs: int | None = None
    parallel: int = 1
    dry_run: bool = False
    retry_failed: bool = False
    sweep_dir: Path | None = None  # default runs/sweeps/<sweep name>
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run
    report: bool = True  # write the report at the end
    report_wandb: bool = True  # and log it to W&B (mode from the runs' config; WANDB_MODE wins)
    kill_grace_s: float = 15.0  # after Ctrl-C, how long a run may shut down before SIGKILL
    launcher: str = "local"  # local: a process per run · submitit: a (SLURM) job per run
    launcher_config: Path | None = None  # submitit executor parameters (default experiments/launch/submitit.yaml)
    gpus: list[int] | None = None  # GPUs the runs share (None: the visible ones; [] on a CPU machine)
    poll_s: float = 0.2


@dataclass
class SweepResult:
    sweep_dir: Path
    state: SweepState | None
    launched: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.state is None:  # dry run
            return 0
        return 1 if any(r.status == "failed" for r in self.state.runs) else 0


def default_sweep_dir(spec: SweepSpec) -> Path:
    return DEFAULT_ROOT / spec.name


# -- per-run settings ----------------------------------------------------------------------------


def _threads_per_run(parallel: int) -> int | None:
    """CPU threads per run when several share the machine (None: leave the process default)."""
    if parallel <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // parallel)


def _overridden_keys(items: list[str]) -> set[str]:
    return {item.split("=", 1)[0].lstrip("-") for item in items}


def run_settings(spec: SweepSpec, name: str, sweep_dir: Path, options: SweepOptions) -> list[str]:
    """The ``key=value`` overrides the runner adds to a run (after its parameters, so they win)."""
    items = [f"logger.project={spec.project}"] if spec.project else []
    items += list(options.overrides)
    threads = _threads_per_run(options.parallel)
    if threads and "trainer.num_threads" not in _overridden_keys(options.overrides) | set(spec.parameters):
        items.append(f"trainer.num_threads={threads}")
    items += [f"output_dir={sweep_dir / 'runs'}", f"name={name}", f"logger.group={spec.name}", f"logger.name={name}"]
    return items


def run_command(spec: SweepSpec, proposal: Proposal, sweep_dir: Path, options: SweepOptions) -> list[str]:
    return expand_command(spec, proposal.params, run_settings(spec, proposal.name, sweep_dir, options))


def run_gpus(options: SweepOptions) -> list[str]:
    """The GPUs the runner hands out (none for cluster jobs: the scheduler assigns theirs)."""
    if options.launcher != "local":
        return []
    return list(options.gpus) if options.gpus is not None else visible_gpus()


def _check_overrides(spec: SweepSpec, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0].lstrip("-")
        if key in spec.parameters:
            raise SweepError(f"override '{item}': '{key}' is a parameter of sweep '{spec.name}'; edit the sweep file instead")
        if key in RUNNER_KEYS:
            raise SweepError(f"override '{item}': the runner sets '{key}' for every run")


def preflight(spec: SweepSpec, proposal: Proposal, overrides: list[str]) -> DictConfig:
    """Resolve a run's full config (experiment file + parameters + overrides) before launching it."""
    items = [f"{k}={v}" for k, v in proposal.params.items()] + list(overrides)
    try:
        return load_config(spec.experiment, items)
    except ConfigError as err:
        raise SweepError(f"run {proposal.name}: {err}") from None


# -- run directory files -------------------------------------------------------------------------


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_completed(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "completed"


def summary_metric(run_dir: Path, name: str) -> float | None:
    summary = read_summary(run_dir) or {}
    value = (summary.get("metrics") or {}).get(name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def tail(path: Path, lines: int = 5) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


# -- formatting ----------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Progress:
    """``[3/9] sar-s1 completed in 95 s — ETA 10 min``: done/total and ETA from the mean run time."""

    def __init__(self, total: int, done: int, parallel: int, out: TextIO, durations: list[float]):
        self.total, self.done, self.parallel, self.out = total, done, parallel, out
        self.durations = list(durations)

    def finished(self, record: RunRecord) -> None:
        self.done += 1
        if record.duration_s is not None:
            self.durations.append(record.duration_s)
        remaining = max(0, self.total - self.done)
        eta = ""
        if remaining and self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = f" — ETA {format_duration(mean * math.ceil(remaining / min(self.parallel, remaining)))}"
        took = format_duration(record.duration_s or 0.0)
        if record.status == "completed":
            self._print(f"[{self.done}/{self.total}] {record.name} completed in {took}{eta}")
        elif record.status == "stopped":
            self._print(f"[{self.done}/{self.total}] {record.name} {record.error} after {took}{eta}")
        else:
            self._print(f"[{self.done}/{self.total}] {record.name} FAILED ({record.error}) in {took}{eta}")
            self._print(f"    log: {record.log}")

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


# -- processes -----------------------------------------------------------------------------------


@dataclass
class _Active:
    record: RunRecord
    process: RunHandle
    log: TextIO | None
    start: float
    stopped: bool = False  # killed by early_terminate
    echoed: int = 0  # bytes of the log already scanned for progress lines (see _echo_progress)


def _launch(record: RunRecord, sweep_dir: Path, env: dict[str, str], gpus: list[str] | None, launcher: SubmititLauncher | None) -> _Active:
    run_dir = sweep_dir / record.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # A summary left by an earlier attempt must not make a crashed retry look completed.
    (run_dir / "summary.json").unlink(missing_ok=True)
    record.attempts += 1
    record.status, record.started, record.finished = "running", now(), None
    record.exit_code = record.duration_s = record.error = None
    record.gpus = gpus
    if gpus is not None:
        env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    log = open(sweep_dir / record.log, "a")  # noqa: SIM115 - closed in _finish (local) or right here (jobs)
    where = f" · CUDA_VISIBLE_DEVICES={','.join(gpus)}" if gpus is not None else ""
    log.write(f"=== attempt {record.attempts} · {record.started}{where} · {shlex.join(record.command)}\n")
    log.flush()
    echoed = log.tell()
    if launcher is not None:  # the job appends to the log itself
        log.close()
        handle: RunHandle = launcher.start(record.command, sweep_dir / record.log, env)
        record.pid, record.job_id = None, handle.job_id
        return _Active(record, handle, None, time.monotonic(), echoed=echoed)
    # Own session: the runner decides how a run stops (SIGINT, then SIGKILL to the whole group,
    # which also reaches DDP ranks the run started).
    handle = LocalProcess(record.command, log, env)
    record.pid, record.job_id = handle.pid, None
    return _Active(record, handle, log, time.monotonic(), echoed=echoed)


def _echo_progress(active: _Active, sweep_dir: Path, out: TextIO) -> None:
    """Show the run's progress and result lines (they start with ``console.PROGRESS_MARK``) as they arrive."""
    with open(sweep_dir / active.record.log, "rb") as handle:
        handle.seek(active.echoed)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    active.echoed += len(complete)
    for line in complete.decode(errors="replace").splitlines():
        if line.startswith(PROGRESS_MARK):
            print(f"    {line}", file=out, flush=True)


def _finish(active: _Active, sweep_dir: Path) -> None:
    record, code = active.record, active.process.returncode
    if active.log is not None:
        active.log.close()
    record.exit_code = code
    record.finished = now()
    record.duration_s = round(time.monotonic() - active.start, 3)
    completed = is_completed(sweep_dir / record.run_dir)
    if code == 0 and completed:
        record.status, record.error = "completed", None
    elif code == 0:
        record.status, record.error = "failed", "exit code 0 but summary.json is missing or not 'completed'"
    else:
        record.status, record.error = "failed", _exit_reason(code)
        last = tail(sweep_dir / record.log, 1)
        if last:
            record.error += f": {last[-1].strip()[:300]}"


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop_all(active: list[_Active], sweep_dir: Path, grace_s: float, out: TextIO) -> None:
    """Ctrl-C: ask every run to stop (SIGINT, as a terminal would), SIGKILL what is left after the grace."""
    for item in active:
        item.process.interrupt()
    deadline = time.monotonic() + grace_s
    try:
        while any(a.process.poll() is None for a in active) and time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        pass
    for item in active:
        if item.process.poll() is None:
            item.process.kill()
            item.process.wait()
        _finish(item, sweep_dir)
        if item.record.status != "completed":  # it may have finished within the grace period
            item.record.status = "interrupted"
            item.record.error = "interrupted (Ctrl-C or SIGTERM); the next invocation runs it again"
        print(f"    {item.record.name}: {item.record.status}", file=out, flush=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (a cluster job ending, a closed terminal), handled like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signal.Signals(signum).name)


# -- the sweep -----------------------------------------------------------------------------------


class _Queue:
    """The runs of this invocation, in order; random/bayes proposals are drawn only when a slot frees."""

    def __init__(self, spec: SweepSpec, state: SweepState, sweep_dir: Path, options: SweepOptions):
        self.spec, self.state, self.sweep_dir, self.options = spec, state, sweep_dir, options
        self.cap = cap_for(spec, options.max_runs)
        self.pending: deque[RunRecord] = deque()
        self.gpu_ids = run_gpus(options)
        self.early_terminate = check_early_terminate(spec)
        self.gpus_needed: dict[str, int] = {}
        self.total = self.done = 0

    def plan_grid(self) -> list[Proposal]:
        proposals = grid_proposals(self.spec)
        return proposals[: self.cap] if self.cap is not None else proposals

    def build(self) -> None:
        """Queue what needs running; count what is already done. Every config resolves first."""
        if self.spec.method == "grid":
            proposals = self.plan_grid()
        else:  # earlier proposals keep their parameters; new ones are drawn lazily by next()
            proposals = [Proposal(r.name, r.params) for r in self.state.runs]
        records = []
        for proposal in proposals:
            try:
                self._check_gpus(proposal, preflight(self.spec, proposal, run_settings(self.spec, proposal.name, self.sweep_dir, self.options)))
            except SweepError as err:
                if self.spec.method == "grid":  # a broken grid is fixed before anything runs
                    raise
                record = self._record(proposal)  # a rejected proposal stays failed
                record.status, record.error = "failed", str(err)
                records.append(record)
                continue
            records.append(self._record(proposal))
        self.total = len(records) if self.spec.method == "grid" else max(self.cap or 0, len(records))
        self.pending.extend(r for r in records if needs_run(r, self.options.retry_failed) and not _rejected(r))
        self.done = len(records) - len(self.pending)

    def _record(self, proposal: Proposal) -> RunRecord:
        record = self.state.run(proposal.name)
        if record is None:
            record = RunRecord(name=proposal.name, params=proposal.params)
            self.state.runs.append(record)
        record.params = proposal.params
        record.run_dir = str(Path("runs") / proposal.name)
        record.log = str(Path("runs") / proposal.name / LOG_NAME)
        record.command = run_command(self.spec, proposal, self.sweep_dir, self.options)
        return record

    def next(self) -> tuple[RunRecord, str | None] | None:
        """The next run to launch, or (run, why it cannot start) for a rejected proposal; None when done."""
        if self.pending:
            return self.pending.popleft(), None
        if self.spec.method == "grid" or len(self.state.runs) >= (self.cap or 0):
            return None
        proposal = propose(self.spec, self.state.runs, len(self.state.runs), self._metric)
        record = self._record(proposal)
        try:
            self._check_gpus(proposal, preflight(self.spec, proposal, run_settings(self.spec, proposal.name, self.sweep_dir, self.options)))
        except SweepError as err:  # a proposal the config rejects fails alone; the search goes on
            record.status, record.error = "failed", str(err)
            return record, str(err)
        return record, None

    def _check_gpus(self, proposal: Proposal, cfg: DictConfig) -> None:
        need = self.gpus_needed[proposal.name] = gpus_needed(cfg, len(self.gpu_ids))
        if need > len(self.gpu_ids):
            raise SweepError(f"run {proposal.name}: trainer.devices={cfg.trainer.devices} needs {need} GPUs; this machine shows {len(self.gpu_ids)}")

    def _metric(self, record: RunRecord) -> float | None:
        assert self.spec.metric is not None
        return summary_metric(self.sweep_dir / record.run_dir, self.spec.metric["name"])


def _rejected(record: RunRecord) -> bool:
    """A failed run that never started: its parameters do not resolve (retrying cannot help)."""
    return record.status == "failed" and record.attempts == 0


def needs_run(record: RunRecord, retry_failed: bool) -> bool:
    return record.status in ("pending", "interrupted", "running") or (record.status == "failed" and retry_failed)


def _still_running(record: RunRecord) -> bool:
    """Whether the process of a 'running' record outlived its runner (e.g. the runner was SIGKILLed).

    The pid alone could have been reused, so on Linux its command line must also name the run.
    A cluster job (``job_id``) is asked about through ``squeue`` where SLURM is installed.
    """
    if record.job_id and record.pid is None:
        return _job_alive(record.job_id)
    if record.pid is None:
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{record.pid}/cmdline")
    if not cmdline.parent.exists():
        return True  # no /proc (not Linux): trust the pid
    for _ in range(20):  # empty right after exec, and for zombies/kernel threads (which never fill)
        try:
            text = cmdline.read_bytes()
        except OSError:
            return False
        if text:
            return f"name={record.name}".encode() in text
        time.sleep(0.05)
    return False


def _job_alive(job_id: str) -> bool:
    """Whether SLURM still lists the job (pending or running); False without SLURM (local jobs
    end with their runner's process group)."""
    try:
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and bool(listed.stdout.strip())


def _reconcile(state: SweepState, sweep_dir: Path, out: TextIO) -> None:
    """Trust the run directories: summary.json decides completion; a stale 'running' was interrupted."""
    orphans = [r for r in state.runs if r.status == "running" and _still_running(r)]
    if orphans:
        listing = ", ".join(f"{r.name} (job {r.job_id})" if r.job_id else f"{r.name} (pid {r.pid})" for r in orphans)
        raise SweepError(
            f"{sweep_dir}: runs of an earlier runner are still going: {listing}; wait for them or stop them (kill -- -PID, scancel JOB)"
        )
    for record in state.runs:
        done = bool(record.run_dir) and is_completed(sweep_dir / record.run_dir)
        if record.status == "completed" and not done:
            print(f"note: {record.name} was completed but its summary.json is gone; it runs again", file=out)
            record.status = "pending"
        elif record.status in ("pending", "interrupted", "running") and done:
            record.status = "completed"
        elif record.status == "running":  # the previous runner died without cleaning up
            record.status, record.error = "interrupted", "the runner stopped while this run was active"


def _open_state(spec: SweepSpec, sweep_dir: Path, options: SweepOptions, out: TextIO) -> SweepState:
    state = load_state(sweep_dir)
    if state is None:
        return SweepState(name=spec.name, sweep_file=str(spec.path) if spec.path else None, sweep=spec.raw, overrides=list(options.overrides))
    if state.name != spec.name:
        raise SweepError(f"{sweep_dir} holds sweep '{state.name}', not '{spec.name}'; pass another --dir")
    if state.overrides != list(options.overrides) and any(r.status == "completed" for r in state.runs):
        raise SweepError(
            f"{sweep_dir}: its runs used the overrides {state.overrides}, now {list(options.overrides)}; "
            "pass the same overrides, or another --dir for a new sweep"
        )
    if state.sweep.get("parameters") != spec.raw.get("parameters") or state.sweep.get("method") != spec.raw.get("method"):
        print("note: the sweep file changed since the last invocation; runs are matched by name", file=out)
    state.sweep, state.overrides = spec.raw, list(options.overrides)
    state.sweep_file = str(spec.path) if spec.path else state.sweep_file
    return state


def _child_env(options: SweepOptions) -> dict[str, str]:
    env = dict(os.environ)
    threads = _threads_per_run(options.parallel)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")  # logs arrive while the run is going, not at exit
    return env


def run_sweep(spec: SweepSpec, options: SweepOptions, out: TextIO | None = None) -> SweepResult:
    """Run (or, with ``dry_run``, print) the sweep; returns the final state and what was launched."""
    out = out or sys.stdout
    if options.parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {options.parallel}")
    if options.launcher not in LAUNCHERS:
        raise SweepError(f"--launcher is {options.launcher!r}; valid: {list(LAUNCHERS)}")
    check_early_terminate(spec)
    _check_overrides(spec, options.overrides)
    sweep_dir = (options.sweep_dir or default_sweep_dir(spec)).resolve()
    if options.dry_run:
        return dry_run(spec, sweep_dir, options, out)
    with locked(sweep_dir):
        state = _open_state(spec, sweep_dir, options, out)
        if spec.claims and (note := freeze_claims(spec.path, sweep_dir)):  # claims as declared before running
            print(note, file=out)
        _reconcile(state, sweep_dir, out)
        queue = _Queue(spec, state, sweep_dir, options)
        queue.build()
        save_state(state, sweep_dir)
        result = _execute(queue, sweep_dir, options, out)
    _print_totals(result, out)
    if options.report and not result.interrupted and any(r.status == "completed" for r in state.runs):
        from varedit_lab.sweep.report import write_report

        paths = write_report(sweep_dir, wandb=options.report_wandb, out=out)
        print(f"report: {paths['report']}", file=out, flush=True)
    return result


def _execute(queue: _Queue, sweep_dir: Path, options: SweepOptions, out: TextIO) -> SweepResult:
    state = queue.state
    durations = [r.duration_s for r in state.runs if r.status == "completed" and r.duration_s]
    progress = _Progress(queue.total, queue.done, options.parallel, out, durations)
    print(
        f"sweep {queue.spec.name} ({queue.spec.method}): {queue.total} runs, {progress.done} done, "
        f"{len(queue.pending)} queued · parallel {options.parallel} · {sweep_dir}",
        file=out,
        flush=True,
    )
    result = SweepResult(sweep_dir, state)
    env = _child_env(options)
    active: list[_Active] = []
    launcher = None
    if options.launcher == "submitit":
        launcher = submitit_launcher(sweep_dir, options.launcher_config or experiments_dir() / "launch" / DEFAULT_SUBMITIT_PRESET)
    handlers = _install_signal_handlers()
    try:
        for _ in _loop(queue, active, sweep_dir, env, options, progress, result, launcher):
            save_state(state, sweep_dir)
    except KeyboardInterrupt as err:
        reason = "SIGTERM/SIGHUP" if isinstance(err, _Terminated) else "Ctrl-C"
        print(f"\n{reason}: stopping {len(active)} active run(s)…", file=out, flush=True)
        _stop_all(active, sweep_dir, options.kill_grace_s, out)
        result.interrupted = True
    finally:
        _restore_signal_handlers(handlers)
        save_state(state, sweep_dir)
    return result


def _loop(
    queue: _Queue, active: list[_Active], sweep_dir: Path, env: dict[str, str], options: SweepOptions, progress: _Progress,
    result: SweepResult, launcher: SubmititLauncher | None,
) -> Iterator[None]:
    """Start runs while slots (and GPUs) are free; reap finished ones. Yields after every state change."""
    pool = GpuPool(queue.gpu_ids)
    waiting = None  # the next run, while the GPUs it needs are busy
    while True:
        while len(active) < options.parallel:
            item = waiting or queue.next()
            waiting = None
            if item is None:
                break
            record, rejected = item
            if rejected:
                progress.finished(record)
                yield
                continue
            need = queue.gpus_needed.get(record.name, 0)
            gpus = pool.take(need)
            if gpus is None:
                waiting = item
                break
            active.append(_launch(record, sweep_dir, env, gpus if need else None, launcher))
            result.launched.append(record.name)
            where = f", GPUs {','.join(gpus)}" if need else ""
            job = f", job {record.job_id}" if record.job_id else ""
            print(f"  → {record.name} started (attempt {record.attempts}{where}{job}, log {record.log})", file=progress.out, flush=True)
            yield
        if not active:
            return
        time.sleep(options.poll_s)
        for item in active:
            _echo_progress(item, sweep_dir, progress.out)
        if queue.early_terminate:
            _early_terminate(queue, active, sweep_dir)
        for item in [a for a in active if a.process.poll() is not None]:
            _echo_progress(item, sweep_dir, progress.out)
            active.remove(item)
            pool.release(item.record.gpus)
            _finish(item, sweep_dir)
            if item.stopped:
                item.record.status = STOPPED
                item.record.error = f"stopped by early_terminate (hyperband on {queue.spec.metric['name']})"  # type: ignore[index]
            progress.finished(item.record)
            yield


def _early_terminate(queue: _Queue, active: list[_Active], sweep_dir: Path) -> None:
    """Kill the process group of every active run hyperband stops at its current bracket."""
    running = {a.record.name: a for a in active if not a.stopped and a.process.poll() is None}
    for name in runs_to_stop(queue.spec, queue.state.runs, sweep_dir, set(running)):
        running[name].stopped = True
        running[name].process.kill()


def _install_signal_handlers() -> dict[int, Any]:
    if not _in_main_thread():
        return {}
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        saved[sig] = signal.signal(sig, _raise_terminated)
    return saved


def _restore_signal_handlers(saved: dict[int, Any]) -> None:
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _print_totals(result: SweepResult, out: TextIO) -> None:
    if result.state is None:
        return
    counts = result.state.counts()
    parts = [f"{counts[s]} {s}" for s in ("completed", "failed", "interrupted", "pending") if counts.get(s)]
    print(f"sweep {result.state.name}: {', '.join(parts) or 'no runs'} · state: {result.sweep_dir / 'sweep.json'}", file=out, flush=True)
    failed = [r for r in result.state.runs if r.status == "failed"]
    if failed:
        print(f"failed runs keep their logs; rerun with --retry-failed to try them again: {[r.name for r in failed]}", file=out)


# -- dry run -------------------------------------------------------------------------------------


def dry_run(spec: SweepSpec, sweep_dir: Path, options: SweepOptions, out: TextIO) -> SweepResult:
    """Print every run's command (and whether a real invocation would run or skip it); write nothing."""
    state = load_state(sweep_dir)
    cap = cap_for(spec, options.max_runs)
    if spec.method == "grid":
        proposals = grid_proposals(spec)
        proposals = proposals[:cap] if cap is not None else proposals
        note = ""
    else:
        previous = list(state.runs) if state else []
        proposals = [Proposal(r.name, r.params) for r in previous]
        scratch: list[Any] = list(previous)
        while len(proposals) < (cap or 0):
            proposal = propose(spec, scratch, len(proposals), lambda r: None)
            proposals.append(proposal)
            scratch.append(_scratch_record(proposal))
        note = f" ({spec.method}: proposals after the first depend on results)" if spec.method == "bayes" else ""
    gpu_ids = run_gpus(options)
    gpus = f" · GPUs {','.join(gpu_ids)}, parallel {options.parallel}" if gpu_ids else ""
    print(f"sweep {spec.name} ({spec.method}): {len(proposals)} runs → {sweep_dir}{note}{gpus}", file=out)
    to_run: list[tuple[Proposal, str, int]] = []
    for proposal in proposals:
        record = state.run(proposal.name) if state else None
        try:
            cfg = preflight(spec, proposal, run_settings(spec, proposal.name, sweep_dir, options))
        except SweepError as err:
            if spec.method == "grid":
                raise
            print(f"  [rejected] {proposal.name}: {err}", file=out)
            continue
        status = record.status if record else "new"
        action = "run" if record is None or (needs_run(record, options.retry_failed) and not _rejected(record)) else "skip"
        to_run.append((proposal, f"{action}: {status}", gpus_needed(cfg, len(gpu_ids)) if action == "run" else 0))
    slots = plan_slots([need for _, _, need in to_run], gpu_ids, options.parallel)
    for (proposal, label, need), slot in zip(to_run, slots):
        where = "" if not need else (f" · CUDA_VISIBLE_DEVICES={','.join(slot)}" if slot else f" · needs {need} GPUs, {len(gpu_ids)} visible")
        print(f"  [{label}] {proposal.name}{where}", file=out)
        print(f"    {shlex.join(run_command(spec, proposal, sweep_dir, options))}", file=out)
    if proposals:
        print("with a W&B server (wandb sweep FILE; wandb agent ID), the agent runs e.g.:", file=out)
        print(f"    {shlex.join(agent_command(spec, proposals[0].params))}", file=out)
    return SweepResult(sweep_dir, None)


def _scratch_record(proposal: Proposal) -> RunRecord:
    return RunRecord(name=proposal.name, params=proposal.params, status="running")
