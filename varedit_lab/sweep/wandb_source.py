"""Sweep results from a W&B server: ``varedit-lab sweep report --wandb ENTITY/PROJECT/SWEEP_ID``.

Runs started by ``wandb agent`` leave no local ``sweep.json``; their results live on the server.
This module reads them through the public API (``wandb.Api().sweep(path)``) into the same
:class:`~varedit_lab.sweep.state.SweepState` and :class:`~varedit_lab.sweep.report.RunResult`
records the local runner's directory gives, so one report code path serves both sources.

Field mapping: a run's parameters are the sweep's parameter keys, read from its config (flat
``optim.lr`` as the agent sets them, else the nested run config ``train`` logs); its final metrics
are its summary (keys starting with ``_`` dropped), completed by the last value in its history,
as locally; its curves are its history by ``trainer/global_step`` (Lightning's step; ``_step``
otherwise); its status maps ``finished → completed``, ``failed``/``crashed → failed``,
``killed → interrupted``, ``running``/``pending`` unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from varedit_lab.sweep.report import RunResult
from varedit_lab.sweep.spec import SweepError, safe_name
from varedit_lab.sweep.state import RunRecord, SweepState

STATUS = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "interrupted", "running": "running", "pending": "pending"}
STEP_KEYS = ("trainer/global_step", "_step")


def split_sweep_path(path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise SweepError(f"--wandb {path!r}: expected ENTITY/PROJECT/SWEEP_ID (as printed by `wandb sweep`)")
    return parts[0], parts[1], parts[2]


def _unwrap(value: Any) -> Any:
    """Config values as stored by the server ({"value": v, "desc": ...}) or already plain."""
    if isinstance(value, Mapping) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """``key`` of a run config: the flat entry (sweep parameter) or the nested path (train's config)."""
    if key in config:
        return _unwrap(config[key])
    node: Any = {k: _unwrap(v) for k, v in config.items()}
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def history_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step_key = next((k for k in STEP_KEYS if _number(row.get(k)) is not None), None)
        if step_key is None:
            continue
        step = int(_number(row[step_key]))  # type: ignore[arg-type]
        for key, value in row.items():
            number = _number(value)
            if number is not None and not key.startswith("_") and key not in ("epoch", "trainer/global_step"):
                curves.setdefault(key, []).append((step, number))
    return curves


def run_result(run: Any, parameter_keys: list[str]) -> RunResult:
    curves = history_curves(run.scan_history())
    metrics = {k: points[-1][1] for k, points in curves.items() if points}
    summary = dict(run.summary.items()) if hasattr(run.summary, "items") else dict(run.summary)
    for key, value in summary.items():
        number = _number(value)
        if number is not None and not key.startswith("_") and key not in ("epoch", "trainer/global_step"):
            metrics[key] = number  # the summary's final value wins, as with summary.json locally
    state = STATUS.get(str(run.state).lower(), "failed")
    return RunResult(
        name=str(run.name),
        status=state,
        params={k: config_value(run.config, k) for k in parameter_keys},
        exit_code=None,
        duration_s=_number(summary.get("_runtime")),
        log=str(getattr(run, "url", "") or ""),
        error=None if state in ("completed", "running", "pending") else f"W&B state {run.state}",
        metrics=metrics,
        curves=curves,
    )


def load_wandb_results(path: str, api: Any = None) -> tuple[SweepState, list[RunResult]]:
    """The sweep ``ENTITY/PROJECT/SWEEP_ID`` and its runs, read through ``wandb.Api`` (or ``api``)."""
    entity, project, sweep_id = split_sweep_path(path)
    if api is None:
        import wandb  # only this path talks to a server

        api = wandb.Api()
    try:
        sweep = api.sweep(f"{entity}/{project}/{sweep_id}")
    except Exception as err:  # noqa: BLE001 - wandb raises CommError/ValueError variants
        raise SweepError(f"--wandb {path}: cannot read the sweep from W&B: {err}") from None
    config = dict(sweep.config or {})
    keys = list(config.get("parameters") or {})
    # Oldest first, as the runs were started (the local report's order).
    runs = sorted(sweep.runs, key=lambda run: str(getattr(run, "created_at", "") or ""))
    results = [run_result(run, keys) for run in runs]
    records = [RunRecord(name=r.name, params=r.params, status=r.status, log=r.log, duration_s=r.duration_s, error=r.error) for r in results]
    state = SweepState(
        name=safe_name(str(config.get("name") or getattr(sweep, "name", None) or sweep_id)),
        sweep_file=f"wandb:{entity}/{project}/{sweep_id}",
        sweep=config,
        runs=records,
    )
    return state, results
