"""Which runs a sweep makes: the full grid, or the next proposal of W&B's random/bayes search."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from varedit_lab.sweep.spec import SweepError, SweepSpec, grid_values, import_sweeps, params_hash, run_name, to_python
from varedit_lab.sweep.state import RunRecord


@dataclass(frozen=True)
class Proposal:
    name: str
    params: dict[str, Any]


def grid_proposals(spec: SweepSpec) -> list[Proposal]:
    """Every grid point, in file order (the first parameter varies slowest)."""
    keys = list(spec.parameters)
    axes = []
    for key in keys:
        values = grid_values(key, spec.parameters[key])
        if values is None:  # validation rejects this earlier; kept as a guard for direct callers
            raise SweepError(f"parameters.{key}: not a discrete parameter; grid search cannot expand it")
        axes.append(values)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*axes)]
    return _unique([Proposal(run_name(p, spec.name_keys), p) for p in points])


def _unique(proposals: list[Proposal]) -> list[Proposal]:
    """Distinct parameter sets whose readable names coincide get a hash suffix each."""
    counts: dict[str, int] = {}
    for p in proposals:
        counts[p.name] = counts.get(p.name, 0) + 1
    return [Proposal(f"{p.name}-{params_hash(p.params)}", p.params) if counts[p.name] > 1 else p for p in proposals]


def cap_for(spec: SweepSpec, max_runs: int | None) -> int | None:
    """How many runs the sweep makes: ``--max-runs``, else the file's ``run_cap``; None = whole grid."""
    cap = max_runs if max_runs is not None else spec.run_cap
    if cap is not None and cap < 1:
        raise SweepError(f"--max-runs must be >= 1, got {cap}")
    if cap is None and spec.method != "grid":
        raise SweepError(
            f"sweep '{spec.name}': method '{spec.method}' never runs out of proposals; "
            "pass --max-runs N (or set run_cap in the sweep file)"
        )
    return cap


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNGs ``sweeps`` samples from, then restore them (proposals are reproducible)."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _sweep_run(record: RunRecord, metric_of: Callable[[RunRecord], float | None], metric: str | None) -> Any:
    sweeps = import_sweeps()
    state = {"completed": "finished", "failed": "failed", "running": "running"}.get(record.status, "pending")
    value = metric_of(record) if metric and record.status == "completed" else None
    return sweeps.SweepRun(
        name=record.name,
        state=state,
        config={k: {"value": v} for k, v in record.params.items()},
        summary_metrics={metric: value} if value is not None else {},
    )


def propose(
    spec: SweepSpec, records: Sequence[RunRecord], index: int, metric_of: Callable[[RunRecord], float | None]
) -> Proposal:
    """The next random/bayes proposal given the runs so far (bayes learns from completed metrics).

    ``index`` (the run's position in the sweep) seeds the search, so the same sweep proposes the
    same parameters; names are ``r{index}-...`` because continuous values make poor names alone.
    """
    sweeps = import_sweeps()
    metric = spec.metric["name"] if spec.metric else None
    runs = [_sweep_run(r, metric_of, metric) for r in records]
    seed = int(hashlib.sha1(f"{spec.name}:{index}".encode()).hexdigest()[:8], 16)
    with _seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's GP convergence warnings on a handful of points
        suggestion = sweeps.next_run(spec.sweep_config(), runs)
    if suggestion is None:
        raise SweepError(f"sweep '{spec.name}': the {spec.method} search proposed no further run")
    params = {k: to_python(suggestion.config[k]["value"]) for k in spec.parameters}
    return Proposal(f"r{index:03d}-{run_name(params, spec.name_keys, max_len=40, hash_lossy=False)}", params)
