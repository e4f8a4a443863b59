"""``early_terminate`` in the local runner: W&B's own hyperband (``sweeps.stop_runs``) on the runs' logged metric.

While runs train, the runner reads each run's ``metrics.csv``: the values of the sweep's
``metric.name``, in the order logged, are the iterations hyperband counts (as W&B counts history
rows with the metric). At every bracket (``min_iter·eta^k``, or ``max_iter/eta^k``) a running run
whose value is worse than the bracket's cut (the best ``1/eta`` of all runs that reached it) is
stopped: its process group is killed and its status becomes ``stopped`` (kept, not rerun, and left
out of the report's means, like a run the W&B server stops).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

from varedit_lab.sweep.spec import SweepError, SweepSpec, import_sweeps
from varedit_lab.sweep.state import RunRecord

STOPPED = "stopped"


def check_early_terminate(spec: SweepSpec) -> bool:
    """Whether the sweep asks for early termination; a setting the runner cannot apply fails here."""
    config = spec.raw.get("early_terminate")
    if config is None:
        return False
    if not isinstance(config, dict) or config.get("type") != "hyperband":
        raise SweepError(f"early_terminate: only type 'hyperband' is supported, got {config!r}")
    if not spec.metric:
        raise SweepError("early_terminate: hyperband needs metric.name (and metric.goal) to compare runs")
    return True


def metric_history(run_dir: Path, metric: str) -> list[float]:
    """The values of ``metric`` in ``metrics.csv`` in logging order (a row being written is skipped)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    values = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                value = float(row.get(metric) or "nan")
            except ValueError:
                continue
            if math.isfinite(value):
                values.append(value)
    return values


def runs_to_stop(spec: SweepSpec, records: Iterable[RunRecord], sweep_dir: Path, running: set[str]) -> list[str]:
    """Names among ``running`` that hyperband stops now, given every run's history so far."""
    import_sweeps()
    from sweeps import RunState, SweepRun, stop_runs

    assert spec.metric is not None
    metric = spec.metric["name"]
    runs = []
    for record in records:
        if record.name not in running and record.status not in ("completed", STOPPED):
            continue
        history = [{metric: v} for v in metric_history(sweep_dir / record.run_dir, metric)]
        state = RunState.running if record.name in running else RunState.finished
        runs.append(SweepRun(name=record.name, state=state, sampledHistory=history))  # the field alias
    return [run.name for run in stop_runs(spec.sweep_config(), runs) if run.name in running]
