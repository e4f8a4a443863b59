"""Sweep report: ``summary.csv``, ``report.md`` and PNG plots in the sweep directory, logged to W&B.

Runs are grouped by every swept parameter except ``seed`` (for the conditioning ablation: by
``conditioning.name``), and each metric is reported as mean ± 95 % CI over the group's completed
runs, with Student's t (``t(0.975, n−1)·s/√n``). A run's final metrics are its ``summary.json``
``metrics``, completed by the last logged value in its ``metrics.csv``; missing metrics are skipped
(``n`` says how many runs contributed).

When the sweep declares claims (``<sweep>.claims.yaml``, frozen into ``<sweep_dir>/claims.yaml`` at the
first launch), the report opens with their paired decisions; it adds the mask-split per-scale
cross-entropy, the per-edit-kind table against copying the source and the cost per strategy
(:mod:`varedit_lab.sweep.evidence`, plots in :mod:`varedit_lab.sweep.evidence_plots`).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, TextIO

import yaml

from varedit_lab.sweep import evidence_plots
from varedit_lab.sweep.claims import FROZEN_NAME, Claim, ClaimsError, claims_path, load_claims
from varedit_lab.sweep.evidence import (
    ClaimResult,
    KindRow,
    SampleCache,
    ce_scale_section,
    ce_scales,
    claims_section,
    cost_from_runs,
    cost_section,
    edits_section,
    evaluate_claims,
    find_cost_file,
    kind_rows,
    kind_section,
    read_cost_file,
    unit_of,
)
from varedit_lab.sweep.runner import read_summary
from varedit_lab.sweep.spec import SweepError, safe_name
from varedit_lab.sweep.state import SweepState, load_state
from varedit_lab.sweep.stats import MeanCI, mean_ci

# (metric key, column label, decimals) of the main table, in order.
HEADLINE: tuple[tuple[str, str, int], ...] = (
    ("val/success", "success", 3),
    ("val/preservation", "preservation", 3),
    ("val/balance", "balance", 3),
    ("val/loss", "val loss", 3),
    ("train/loss", "train loss", 3),
    ("val/bit_acc", "bit acc", 3),
    ("perf/train_step_s", "train step (s)", 3),
    ("perf/seq_len", "seq len", 0),
)
LOSS_CURVES = ("train/loss", "val/loss")
_SCALE = re.compile(r"^val/scale(\d+)_bit_acc$")
SEED_KEY = "seed"


@dataclass
class RunResult:
    name: str
    status: str
    params: dict[str, Any]
    exit_code: int | None
    duration_s: float | None
    log: str
    error: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    run_dir: Path | None = None  # the run folder (samples.jsonl lives there)


@dataclass
class Group:
    label: str
    key: tuple[Any, ...]
    runs: list[RunResult]

    @property
    def completed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "completed"]

    def stat(self, metric: str) -> MeanCI:
        return mean_ci(r.metrics.get(metric, math.nan) for r in self.completed)


# -- reading -------------------------------------------------------------------------------------


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def find_metrics_csv(run_dir: Path) -> Path | None:
    """``metrics.csv`` in the run dir (the contract), else the newest one below it (CSVLogger versions)."""
    direct = run_dir / "metrics.csv"
    if direct.is_file():
        return direct
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_curves(path: Path | None) -> dict[str, list[tuple[int, float]]]:
    """Every metric column of a CSVLogger file as (step, value) points (rows are sparse)."""
    if path is None:
        return {}
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = _float(row.get("step"))
            if step is None:
                continue
            for key, text in row.items():
                value = _float(text) if key not in ("step", "epoch") else None
                if value is not None:
                    curves.setdefault(key, []).append((int(step), value))
    return curves


def _final_metrics(run_dir: Path, curves: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    metrics = {k: points[-1][1] for k, points in curves.items() if points}
    summary = read_summary(run_dir) or {}
    for key, value in (summary.get("metrics") or {}).items():
        number = _float(value)
        if number is not None:
            metrics[key] = number  # the summary's final value wins over the last logged one
    return metrics


def load_results(sweep_dir: Path) -> tuple[SweepState, list[RunResult]]:
    state = load_state(sweep_dir)
    if state is None:
        raise SweepError(f"{sweep_dir}: no sweep.json; run `varedit-lab sweep FILE.yaml --dir {sweep_dir}` first")
    results = []
    for record in state.runs:
        run_dir = sweep_dir / (record.run_dir or Path("runs") / record.name)
        curves = read_curves(find_metrics_csv(run_dir)) if run_dir.is_dir() else {}
        results.append(
            RunResult(
                name=record.name,
                status=record.status,
                params=record.params,
                exit_code=record.exit_code,
                duration_s=record.duration_s,
                log=record.log,
                error=record.error,
                metrics=_final_metrics(run_dir, curves),
                curves=curves,
                run_dir=run_dir if run_dir.is_dir() else None,
            )
        )
    return state, results


# -- grouping ------------------------------------------------------------------------------------


def swept_keys(state: SweepState) -> list[str]:
    params = state.sweep.get("parameters") or {}
    return [k for k, conf in params.items() if not (isinstance(conf, dict) and "value" in conf)]


def group_keys(state: SweepState) -> list[str]:
    return [k for k in swept_keys(state) if k != SEED_KEY]


def group_runs(results: list[RunResult], keys: list[str]) -> list[Group]:
    """Groups in first-appearance order (the sweep's order: strategies as listed in the file)."""
    groups: dict[tuple[Any, ...], Group] = {}
    for result in results:
        key = tuple(_hashable(result.params.get(k)) for k in keys)
        if key not in groups:
            label = " / ".join(str(result.params.get(k)) for k in keys) if keys else "all runs"
            groups[key] = Group(label, key, [])
        groups[key].runs.append(result)
    return list(groups.values())


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def scale_indices(results: Iterable[RunResult]) -> list[int]:
    found = {int(m.group(1)) for r in results for k in r.metrics if (m := _SCALE.match(k))}
    return sorted(found)


def metric_columns(results: list[RunResult]) -> list[str]:
    """Headline metrics first, then per-scale bit accuracy by scale, then the rest alphabetically."""
    present = {k for r in results for k in r.metrics}
    head = [k for k, _, _ in HEADLINE if k in present]
    scales = [f"val/scale{i}_bit_acc" for i in scale_indices(results)]
    rest = sorted(present - set(head) - set(scales))
    return head + scales + rest


def paired_differences(groups: list[Group], metric: str) -> list[tuple[str, MeanCI]]:
    """``B − A`` per seed for every pair of groups (seeds shared by both), mean ± 95 % CI."""
    out = []
    for a, b in combinations(groups, 2):
        by_seed_a = {r.params.get(SEED_KEY): r.metrics.get(metric) for r in a.completed}
        diffs = [
            r.metrics[metric] - by_seed_a[r.params.get(SEED_KEY)]
            for r in b.completed
            if metric in r.metrics and by_seed_a.get(r.params.get(SEED_KEY)) is not None
        ]
        out.append((f"{b.label} − {a.label}", mean_ci(diffs)))
    return out


# -- files ---------------------------------------------------------------------------------------


def write_summary_csv(path: Path, results: list[RunResult], params: list[str], metrics: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "status", "exit_code", "duration_s", *params, *metrics])
        for r in results:
            values = [r.metrics.get(m) for m in metrics]
            writer.writerow(
                [r.name, r.status, _cell(r.exit_code), _cell(r.duration_s), *(_cell(r.params.get(p)) for p in params), *map(_cell, values)]
            )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass
class Evidence:
    """The report's sections beyond group means (empty parts are left out)."""

    claims: list[ClaimResult] = field(default_factory=list)
    claims_source: str | None = None
    scales: list[int] = field(default_factory=list)  # scales with val/ce_{in,out}/s{k}
    kind_rows: list[KindRow] = field(default_factory=list)
    ce: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    cost: list[str] = field(default_factory=list)
    edits: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def render_markdown(
    state: SweepState,
    results: list[RunResult],
    groups: list[Group],
    keys: list[str],
    images: dict[str, Path],
    evidence: Evidence | None = None,
) -> str:
    evidence = evidence or Evidence()
    counts = state.counts()
    metric = (state.sweep.get("metric") or {}).get("name")
    goal = (state.sweep.get("metric") or {}).get("goal", "minimize")
    group_title = ", ".join(keys) if keys else "all runs"
    lines = [
        f"# Sweep `{state.name}`",
        "",
        f"- method: {state.sweep.get('method')} · file: `{state.sweep_file}`" + (f" · metric: `{metric}` ({goal})" if metric else ""),
        f"- runs: {', '.join(f'{n} {s}' for s, n in counts.items() if n)} · overrides for every run: {state.overrides or 'none'}",
        f"- generated {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *evidence.notes,
    ]
    if evidence.claims_source:
        lines += claims_section(evidence.claims, evidence.claims_source)
    lines += [
        "",
        f"## Results per {group_title} (mean ± 95 % CI over seeds)",
        "",
    ]
    headline = [(k, label, d) for k, label, d in HEADLINE if any(k in r.metrics for r in results)]
    rows = []
    for g in groups:
        failed = sum(1 for r in g.runs if r.status == "failed")
        cells = [g.stat(k).format(d) for k, _, d in headline]
        rows.append([g.label, f"{len(g.completed)}" + (f" (+{failed} failed)" if failed else ""), *cells])
    baseline = _baseline_row(results, headline)
    lines += _table([group_title, "runs", *(label for _, label, _ in headline)], rows + ([baseline] if baseline else []))
    lines += [
        "",
        "95 % CI: mean ± t(0.975, n−1)·s/√n over the group's completed runs (one per seed); "
        "a cell with (n=1) has no interval. Runs missing a metric are left out of that cell.",
    ]
    if baseline:
        lines += ["*copy source*: the unedited source through the tokenizer, scored like the edits (the bar to beat on success)."]
    lines += _scale_section(groups, results)
    lines += evidence.ce + evidence.kinds + evidence.cost + evidence.edits
    lines += _paired_section(groups, keys, metric or "val/balance")
    lines += _best_section(groups, metric, goal)
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in images.items()]
    lines += _runs_section(results, metric)
    return "\n".join(lines) + "\n"


def _baseline_row(results: list[RunResult], headline: list[tuple[str, str, int]]) -> list[str] | None:
    """The copy-the-source baseline (``val/copy_*``) as a table row, averaged over the runs that logged it."""
    done = [r for r in results if r.status == "completed" and "val/copy_success" in r.metrics]
    if not done:
        return None
    cells = []
    for key, _, decimals in headline:
        copy_key = key.replace("val/", "val/copy_", 1) if key.startswith("val/") else None
        values = [r.metrics[copy_key] for r in done if copy_key and copy_key in r.metrics]
        cells.append(f"{sum(values) / len(values):.{decimals}f}" if values else "")
    return ["*copy source*", str(len(done)), *cells]


def _scale_section(groups: list[Group], results: list[RunResult]) -> list[str]:
    scales = scale_indices(results)
    if not scales:
        return []
    rows = [[g.label, *(g.stat(f"val/scale{i}_bit_acc").format(3) for i in scales)] for g in groups]
    return ["", "## Per-scale bit accuracy (validation, mean ± 95 % CI)", ""] + _table(["group", *(f"scale {i}" for i in scales)], rows)


def _paired_section(groups: list[Group], keys: list[str], metric: str) -> list[str]:
    if len(keys) != 1 or len(groups) < 2:
        return []
    pairs = [(label, ci) for label, ci in paired_differences(groups, metric) if ci.n >= 2]  # n = 1: no "paired" row
    if not pairs:
        return []
    rows = [[label, str(ci.n), ci.format(3)] for label, ci in pairs]
    return [
        "",
        f"## Paired differences in `{metric}` (same seed)",
        "",
        "Seed-matched differences remove the variation the strategies share; an interval that excludes 0 "
        "is a difference these seeds resolve.",
        "",
    ] + _table(["comparison", "pairs", "mean diff ± 95 % CI"], rows)


def _best_section(groups: list[Group], metric: str | None, goal: str) -> list[str]:
    scored = [(g, g.stat(metric)) for g in groups] if metric else []
    scored = [(g, s) for g, s in scored if s.n]
    if not scored:
        return []
    ranked = sorted(scored, key=lambda item: item[1].mean, reverse=goal == "maximize")
    (best, stat), rest = ranked[0], ranked[1:]
    line = f"Best group by `{metric}` ({goal}): **{best.label}** ({stat.format(3)})"
    if rest and _overlap(stat, rest[0][1]):
        line += f"; its 95 % CI overlaps that of {rest[0][0].label} ({rest[0][1].format(3)}): these seeds do not separate them"
    return ["", line + "."]


def _overlap(a: MeanCI, b: MeanCI) -> bool:
    """Whether two intervals overlap (an undefined interval, n < 2, counts as overlapping)."""
    if math.isnan(a.half_width) or math.isnan(b.half_width):
        return True
    return a.low <= b.high and b.low <= a.high


def _runs_section(results: list[RunResult], metric: str | None) -> list[str]:
    rows = []
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items())
        value = r.metrics.get(metric) if metric else None
        took = f"{r.duration_s:.0f} s" if r.duration_s is not None else ""
        rows.append([r.name, r.status, params, "" if value is None else f"{value:.4g}", took, f"`{r.log}`"])
    lines = ["", "## Runs", ""] + _table(["run", "status", "parameters", metric or "metric", "time", "log"], rows)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines += ["", "### Failed runs", ""] + [f"- `{r.name}`: {r.error} — log `{r.log}`" for r in failed]
    return lines


# -- plots ---------------------------------------------------------------------------------------


_pyplot = evidence_plots.pyplot


def plot_metrics(path: Path, groups: list[Group], results: list[RunResult]) -> Path | None:
    """One panel per headline metric: group means as points (95 % CI whiskers when n ≥ 2) on a free axis,
    the copy-the-source baseline as a line; no bars from zero, which would hide dB differences."""
    metrics = [(k, label) for k, label, _ in HEADLINE if any(k in r.metrics for r in results)]
    if not metrics:
        return None
    plt = _pyplot()
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    x = list(range(len(groups)))
    for ax, (key, label) in zip(axes.flat, metrics):
        stats = [g.stat(key) for g in groups]
        for xi, s in zip(x, stats):
            evidence_plots._point(ax, xi, s, color=f"C{xi}")
            if s.n:
                ax.annotate(f"n={s.n}", (xi, s.mean), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7)
        copy_key = key.replace("val/", "val/copy_", 1) if key.startswith("val/") else None
        copies = [r.metrics[copy_key] for r in results if r.status == "completed" and copy_key and copy_key in r.metrics]
        if copies:
            ax.axhline(sum(copies) / len(copies), color="black", linewidth=1.2, linestyle="--", label="copy source")
            ax.legend(fontsize=7)
        ax.set_xticks(x, [g.label for g in groups], rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        unit = unit_of(key)
        ax.set_ylabel(f"{label} ({unit})" if unit else label, fontsize=8)
        ax.set_title(label, fontsize=10)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("mean over seeds (95 % CI whiskers where n ≥ 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scales(path: Path, groups: list[Group], results: list[RunResult]) -> Path | None:
    scales = scale_indices(results)
    if not scales:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, g in enumerate(groups):
        stats = [g.stat(f"val/scale{k}_bit_acc") for k in scales]
        errors = [0.0 if math.isnan(s.half_width) else s.half_width for s in stats]
        with_ci = any(s.n >= 2 for s in stats)  # n = 1: bare points, no whiskers
        ax.errorbar([k + (i - len(groups) / 2) * 0.06 for k in scales], [s.mean for s in stats], yerr=errors if with_ci else None,
                    marker="o", capsize=3 if with_ci else 0, label=g.label)
    ax.set_xlabel("target scale k (coarse → fine)")
    ax.set_ylabel("bit accuracy")
    ax.set_xticks(scales)
    ax.legend(fontsize=8)
    ax.set_title("per-scale validation bit accuracy (mean ± 95 % CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and 95 % CI half-width over runs at every step any run logged (runs interpolated
    linearly inside their own step range, never extrapolated)."""
    import numpy as np

    steps = sorted({s for c in curves for s, _ in c})
    means, halves = [], []
    for step in steps:
        values = []
        for c in curves:
            xs, ys = [s for s, _ in c], [v for _, v in c]
            if xs and xs[0] <= step <= xs[-1]:
                values.append(float(np.interp(step, xs, ys)))
        stat = mean_ci(values)
        means.append(stat.mean)
        halves.append(0.0 if math.isnan(stat.half_width) else stat.half_width)
    return steps, means, halves


def plot_loss_curves(path: Path, groups: list[Group]) -> Path | None:
    present = [k for k in LOSS_CURVES if any(k in r.curves for g in groups for r in g.completed)]
    if not present:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for i, g in enumerate(groups):
            curves = [sorted(r.curves[key]) for r in g.completed if r.curves.get(key)]
            if not curves:
                continue
            steps, means, halves = mean_curve(curves)
            label = f"{g.label} (n={len(curves)})"
            if len(steps) == 1:  # e.g. one validation at the end: a band would be invisible
                with_ci = len(curves) >= 2
                ax.errorbar(steps, means, yerr=halves if with_ci else None, color=f"C{i}", marker="o", capsize=4 if with_ci else 0, label=label)
                continue
            ax.plot(steps, means, color=f"C{i}", label=label, marker="." if len(steps) < 20 else None)
            ax.fill_between(steps, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)], color=f"C{i}", alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} ({unit_of(key)})" if unit_of(key) else key)
        ax.set_title(f"{key} (mean over seeds, 95 % CI band where n ≥ 2)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- W&B -----------------------------------------------------------------------------------------


def _logger_settings(sweep_dir: Path, results: list[RunResult]) -> tuple[str, str]:
    """(mode, project) as the runs used them; the ``WANDB_MODE`` environment variable wins."""
    mode, project = "offline", "varedit-lab"
    for r in results:
        config = sweep_dir / "runs" / r.name / "config.yaml"
        if r.status == "completed" and config.is_file():
            logger = (yaml.safe_load(config.read_text()) or {}).get("logger") or {}
            mode, project = logger.get("mode", mode), logger.get("project", project)
            break
    return os.environ.get("WANDB_MODE") or mode, project


def log_to_wandb(
    sweep_dir: Path,
    state: SweepState,
    results: list[RunResult],
    groups: list[Group],
    images: dict[str, Path],
    columns: tuple[list[str], list[str]],
    claims: Iterable[ClaimResult] = (),
) -> Path | None:
    """A ``sweep-report`` run in the sweep's group with the summary table, group stats and plots.

    Returns the local W&B run directory, or None when logging is disabled.
    """
    mode, project = _logger_settings(sweep_dir, results)
    if mode == "disabled":
        return None
    import wandb

    project = state.sweep.get("project") or project
    run_id = safe_name(f"{state.name}-report-{hashlib.sha1(str(sweep_dir.resolve()).encode()).hexdigest()[:8]}")
    params, metrics = columns
    run = wandb.init(
        project=project,
        group=state.name,
        name=f"{state.name}-report",
        job_type="sweep-report",
        id=run_id,
        resume="allow",
        dir=str(sweep_dir),
        mode=mode,
        config={"sweep": state.sweep, "overrides": state.overrides},
    )
    try:
        header = ["run", "status", *params, *metrics]
        rows = [[r.name, r.status, *(str(r.params.get(p)) for p in params), *(r.metrics.get(m) for m in metrics)] for r in results]
        stat_header = ["group", "metric", "mean", "ci95_half_width", "n"]
        stat_rows = [[g.label, m, g.stat(m).mean, g.stat(m).half_width, g.stat(m).n] for g in groups for m in metrics]
        payload: dict[str, Any] = {
            "sweep/runs": wandb.Table(columns=header, data=rows),
            "sweep/groups": wandb.Table(columns=stat_header, data=stat_rows),
        }
        claim_rows = [
            [c.claim.name, c.claim.metric, str(c.claim.arm), str(c.claim.baseline), c.claim.direction, c.stats.n,
             c.stats.mean, c.stats.low, c.stats.high, c.delta, c.decision.label]
            for c in claims
        ]
        if claim_rows:
            claim_header = ["claim", "metric", "arm", "baseline", "better", "pairs", "mean_diff", "ci_low", "ci_high", "delta", "decision"]
            payload["sweep/claims"] = wandb.Table(columns=claim_header, data=claim_rows)
        payload.update({f"sweep/{name}": wandb.Image(str(path)) for name, path in images.items()})
        run.log(payload)
        for g in groups:
            for m in metrics:
                stat = g.stat(m)
                if stat.n:
                    run.summary[f"{g.label}/{m}"] = stat.mean
        return Path(run.dir).parent
    finally:
        run.finish()


# -- evidence ------------------------------------------------------------------------------------


def sweep_claims(sweep_dir: Path, state: SweepState) -> tuple[tuple[Claim, ...], str | None]:
    """The claims frozen at the sweep's first launch, else those beside the sweep file; and their file."""
    frozen = sweep_dir / FROZEN_NAME
    path = frozen if frozen.is_file() else (claims_path(state.sweep_file) if state.sweep_file else None)
    if path is None or not path.is_file():
        return (), None
    try:
        return load_claims(path, state.sweep.get("parameters") or {}), str(path)
    except ClaimsError as err:
        raise SweepError(str(err)) from None


def gather_evidence(sweep_dir: Path, state: SweepState, results: list[RunResult], groups: list[Group]) -> Evidence:
    samples = SampleCache()
    claims, source = sweep_claims(sweep_dir, state)
    evaluated = evaluate_claims(claims, results, swept_keys(state), samples)
    completed = [r for g in groups for r in g.completed]
    cost_file = find_cost_file(sweep_dir)
    cost = read_cost_file(cost_file) if cost_file else cost_from_runs(groups)
    scales, kinds = ce_scales(completed), kind_rows(groups, samples)
    evidence = Evidence(
        claims=evaluated,
        claims_source=source,
        scales=scales,
        kind_rows=kinds,
        ce=ce_scale_section(groups, scales),
        kinds=kind_section(kinds),
        cost=cost_section(cost),
        edits=edits_section(groups, sweep_dir),
    )
    if source is None:
        evidence.notes.append(f"- no declared claims (put them in `{state.name or Path(state.sweep_file or 'SWEEP').stem}.claims.yaml` beside the sweep file)")
    skipped = samples.skipped()
    if skipped:
        evidence.notes.append(f"- unreadable samples.jsonl lines skipped: {skipped}")
    return evidence


# -- entry point ---------------------------------------------------------------------------------


def write_report(
    sweep_dir: str | Path, *, wandb: bool = True, out: TextIO | None = None, source: tuple[SweepState, list[RunResult]] | None = None
) -> dict[str, Path]:
    """Write ``summary.csv``, ``report.md`` and the plots into ``sweep_dir``; log them to W&B.

    The runs are read from ``sweep_dir`` (the local runner's ``sweep.json`` and run folders) unless
    ``source`` gives them (e.g. :func:`varedit_lab.sweep.wandb_source.load_wandb_results`).

    Returns the written paths by name (``summary``, ``report``, each plot, and ``wandb`` when a W&B
    run was written).
    """
    out = out or sys.stdout
    sweep_dir = Path(sweep_dir)
    state, results = source if source is not None else load_results(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    keys = group_keys(state)
    groups = group_runs(results, keys)
    params = list(state.sweep.get("parameters") or {})
    metrics = metric_columns(results)
    paths: dict[str, Path] = {"summary": sweep_dir / "summary.csv", "report": sweep_dir / "report.md"}
    write_summary_csv(paths["summary"], results, params, metrics)
    evidence = gather_evidence(sweep_dir, state, results, groups)
    plots = {
        "metrics": plot_metrics(sweep_dir / "metrics.png", groups, results),
        "claim_differences": evidence_plots.plot_claim_differences(sweep_dir / "claim_differences.png", evidence.claims),
        "ce_scales": evidence_plots.plot_ce_scales(sweep_dir / "ce_scales.png", groups, evidence.scales),
        "ce_scale_curves": evidence_plots.plot_ce_curves(sweep_dir / "ce_scale_curves.png", groups, evidence.scales),
        "edit_kinds": evidence_plots.plot_kinds(sweep_dir / "edit_kinds.png", evidence.kind_rows),
        "scale_bit_acc": plot_scales(sweep_dir / "scale_bit_acc.png", groups, results),
        "loss_curves": plot_loss_curves(sweep_dir / "loss_curves.png", groups),
    }
    images = {name: path for name, path in plots.items() if path is not None}
    paths["report"].write_text(render_markdown(state, results, groups, keys, images, evidence))
    paths.update(images)
    if wandb:
        try:
            wandb_dir = log_to_wandb(sweep_dir, state, results, groups, images, (params, metrics), evidence.claims)
        except Exception as err:  # noqa: BLE001 - the files are written; a W&B problem must not hide them
            print(f"warning: logging the report to W&B failed: {type(err).__name__}: {err}", file=out)
        else:
            if wandb_dir is not None:
                paths["wandb"] = wandb_dir
    return paths
