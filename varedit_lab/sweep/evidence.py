"""What the report needs beyond per-group means: declared claims evaluated on paired runs, the
mask-split per-scale cross-entropy, per-edit-kind quality against copying the source, and cost.

Inputs are the run folders' files (the training side's contract):

* ``metrics.csv`` / ``summary.json``: ``val/ce_{in,out}/s{k}``, ``val/bitacc_{in,out}/s{k}`` (teacher
  forced, mask area-pooled to scale k's grid), ``val/ce_{in,out}[_coarse|_fine]``, the pixel metrics
  ``val/{success,preservation,balance}`` and ``val/copy_*`` (dB), ``perf/seq_len``;
* ``samples.jsonl``: one JSON object per validation sample with ``key``, ``kind`` and the metrics
  without ``val/`` (``success``, ``copy_success``, ``ce_in_coarse``, ...);
* ``cost.json`` (optional; :mod:`varedit_lab.eval.cost` writes it in the demo), measured with one
  strategy at a time alone on the machine, in the sweep directory (or next to it)::

      {"measured": "alone in one process, ...", "threads": 2, "batch_size": 8, "repeats": 3,
       "strategies": {"max_scale": {"train_step_s": 0.41, "edit_s": 0.52, "seq_len": 777}, ...}}

  Each value is a number or a list of repeated measurements (mean ± 95 % CI); ``train_step_s`` is
  seconds per optimiser step, ``edit_s`` seconds per greedy edit, ``seq_len`` tokens per sequence.
  Without it the report falls back to the runs' ``perf/*`` and says that they shared the cores.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from varedit_lab.runs import RunFolder
from varedit_lab.sweep.claims import Claim
from varedit_lab.sweep.paired import (
    MAX_SEEDS,
    BootstrapCI,
    Decision,
    PairedStats,
    decide,
    minimum_detectable_effect,
    paired_bootstrap,
    paired_t,
    seeds_needed,
)
from varedit_lab.sweep.spec import SweepError
from varedit_lab.sweep.stats import MeanCI, mean_ci

COST_FILE = "cost.json"
COST_FIELDS = (("train_step_s", "train step (s)", 3), ("edit_s", "edit (s)", 3), ("seq_len", "sequence (tokens)", 0))
KIND_FIELDS = ("success", "copy_success", "preservation", "copy_preservation")
_SCALE_METRIC = re.compile(r"^val/ce_(in|out)/s(\d+)$")
_DB = re.compile(r"(success|preservation|balance)$")


class RunLike(Protocol):
    name: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, float]
    curves: dict[str, list[tuple[int, float]]]
    run_dir: Path | None


class GroupLike(Protocol):
    label: str

    @property
    def completed(self) -> list[Any]: ...


def unit_of(metric: str) -> str:
    """The unit of a contract metric, for axes and tables."""
    if _DB.search(metric):
        return "dB"
    if "/ce" in metric or metric.endswith("loss"):
        return "nats/bit"
    if "bitacc" in metric or "bit_acc" in metric:
        return "fraction of bits"
    if metric.endswith("seq_len"):
        return "tokens"
    if metric.endswith("_s"):
        return "s"
    return ""


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# -- samples.jsonl -------------------------------------------------------------------------------


@dataclass
class SampleFile:
    rows: list[dict[str, Any]]
    skipped: int = 0  # lines that were not a JSON object with a key


def read_samples(run_dir: Path | None) -> SampleFile:
    """A run's ``samples.jsonl`` (empty when absent); unreadable lines are counted, not fatal."""
    if run_dir is None or not RunFolder(run_dir).samples.is_file():
        return SampleFile([])
    rows, skipped = [], 0
    for line in RunFolder(run_dir).samples.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
        else:
            skipped += 1
    return SampleFile(rows, skipped)


class SampleCache:
    """Each run's samples read once per report."""

    def __init__(self) -> None:
        self._files: dict[str, SampleFile] = {}

    def get(self, run: RunLike) -> SampleFile:
        if run.name not in self._files:
            self._files[run.name] = read_samples(run.run_dir)
        return self._files[run.name]

    def skipped(self) -> dict[str, int]:
        return {name: f.skipped for name, f in self._files.items() if f.skipped}


def sample_differences(arm: SampleFile, baseline: SampleFile, field_name: str) -> list[float]:
    """``arm − baseline`` of one field for the sample keys both runs scored (sorted by key)."""
    base = {str(r["key"]): _finite(r.get(field_name)) for r in baseline.rows}
    out = []
    for row in sorted(arm.rows, key=lambda r: str(r["key"])):
        a, b = _finite(row.get(field_name)), base.get(str(row["key"]))
        if a is not None and b is not None:
            out.append(a - b)
    return out


# -- claims --------------------------------------------------------------------------------------


@dataclass
class ClaimResult:
    claim: Claim
    pairs: list[tuple[str, str]]  # (arm run, baseline run) names
    stats: PairedStats  # of arm − baseline over seed pairs
    baseline_mean: float
    delta: float  # absolute, metric units
    paper_effect: float | None  # absolute, metric units
    mde: float
    seeds_for_paper: int | None
    bootstrap: BootstrapCI | None
    decision: Decision
    curve: tuple[list[int], list[MeanCI]] = field(default_factory=lambda: ([], []))  # difference vs step


def pair_runs(runs: Sequence[RunLike], claim: Claim, swept_keys: Sequence[str]) -> list[tuple[RunLike, RunLike]]:
    """(arm, baseline) runs that agree on every swept parameter but the arm key (seed included)."""
    others = [k for k in swept_keys if k != claim.arm_key]

    def chosen(run: RunLike) -> bool:
        return run.status == "completed" and all(run.params.get(k) == v for k, v in claim.where.items())

    def key(run: RunLike) -> str:
        return json.dumps([run.params.get(k) for k in others], default=str)

    baselines = {key(r): r for r in runs if chosen(r) and r.params.get(claim.arm_key) == claim.baseline}
    return [(r, baselines[key(r)]) for r in runs if chosen(r) and r.params.get(claim.arm_key) == claim.arm and key(r) in baselines]


def difference_curve(pairs: Sequence[tuple[RunLike, RunLike]], metric: str) -> tuple[list[int], list[MeanCI]]:
    """``arm − baseline`` at every validation step both runs of a pair logged, mean ± CI over pairs."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for arm, base in pairs:
        base_points = dict(base.curves.get(metric, []))
        for step, value in arm.curves.get(metric, []):
            if step in base_points:
                per_step[step].append(value - base_points[step])
    steps = sorted(per_step)
    return steps, [mean_ci(per_step[s]) for s in steps]


def evaluate_claim(
    claim: Claim, runs: Sequence[RunLike], swept_keys: Sequence[str], samples: SampleCache, *, n_boot: int = 2000, boot_seed: int = 0
) -> ClaimResult:
    pairs = [(a, b) for a, b in pair_runs(runs, claim, swept_keys) if claim.metric in a.metrics and claim.metric in b.metrics]
    stats = paired_t([a.metrics[claim.metric] - b.metrics[claim.metric] for a, b in pairs])
    baseline_mean = mean_ci(b.metrics[claim.metric] for _, b in pairs).mean
    delta = claim.delta if claim.delta is not None else float(claim.delta_relative or 0.0) * abs(baseline_mean)
    paper = claim.paper_effect * abs(baseline_mean) if claim.paper_effect is not None and math.isfinite(baseline_mean) else None
    bootstrap = None
    if claim.sample_field and stats.has_interval:
        per_seed = [sample_differences(samples.get(a), samples.get(b), claim.sample_field) for a, b in pairs]
        bootstrap = paired_bootstrap(per_seed, n_boot=n_boot, seed=boot_seed)
    return ClaimResult(
        claim=claim,
        pairs=[(a.name, b.name) for a, b in pairs],
        stats=stats,
        baseline_mean=baseline_mean,
        delta=delta,
        paper_effect=paper,
        mde=minimum_detectable_effect(stats.sd, stats.n),
        seeds_for_paper=seeds_needed(stats.sd, paper) if paper is not None else None,
        bootstrap=bootstrap,
        decision=decide(stats, claim.sign, delta),
        curve=difference_curve(pairs, claim.metric),
    )


def evaluate_claims(claims: Iterable[Claim], runs: Sequence[RunLike], swept_keys: Sequence[str], samples: SampleCache) -> list[ClaimResult]:
    return [evaluate_claim(c, runs, swept_keys, samples) for c in claims]


def _number(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def claims_section(results: list[ClaimResult], source: str) -> list[str]:
    lines = [
        "",
        "## Declared claims",
        "",
        f"Declared before the runs in `{source}`; each claim is \"arm better than baseline\". Difference = arm − baseline, "
        "paired by seed (same initial shared weights and data order); decided on the seed-paired 95 % t-CI: "
        "**supported** if it excludes 0 in the claimed direction, **refuted at δ** if it excludes every effect ≥ δ in "
        "that direction, else **inconclusive**. The per-sample bootstrap (validation samples paired by key, resampled "
        "within each seed) shows validation-set noise only. MDE: the smallest effect these seeds detect with 80 % power "
        "(two-sided 5 %); seeds needed: for the paper's relative effect at this variance.",
        "",
    ]
    header = ["claim", "comparison", "pairs (seeds)", "samples", "arm − baseline (95 % CI)", "bootstrap 95 % CI", "δ", "decision", "MDE", "paper effect → seeds needed"]
    rows = []
    for r in results:
        c, unit = r.claim, unit_of(r.claim.metric)
        if r.stats.has_interval:
            diff = f"{_number(r.stats.mean)} [{_number(r.stats.low)}, {_number(r.stats.high)}] {unit}".strip()
        else:
            diff = f"{_number(r.stats.mean)} {unit} (no CI)".strip() if r.stats.n else "—"
        boot = f"[{_number(r.bootstrap.low)}, {_number(r.bootstrap.high)}]" if r.bootstrap else "—"
        samples = str(r.bootstrap.n_samples) if r.bootstrap else "—"
        if r.paper_effect is None:
            paper = "—"
        else:
            needed = "—" if not r.stats.has_interval else (str(r.seeds_for_paper) if r.seeds_for_paper else f"> {MAX_SEEDS}")
            paper = f"{r.paper_effect:.3g} {unit} → {needed}"
        mde = f"{r.mde:.3g}" if math.isfinite(r.mde) else "—"
        rows.append([f"`{c.name}`", c.describe(), str(r.stats.n), samples, diff, boot, f"{r.delta:.3g}", r.decision.format(), mde, paper])
    return lines + _table(header, rows)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# -- per-scale cross-entropy ---------------------------------------------------------------------


def ce_scales(runs: Iterable[RunLike]) -> list[int]:
    return sorted({int(m.group(2)) for r in runs for k in r.metrics if (m := _SCALE_METRIC.match(k))})


def ce_scale_section(groups: Sequence[GroupLike], scales: list[int]) -> list[str]:
    if not scales:
        return []
    header = ["group", "where", *(f"s{k}" for k in scales), "coarse", "fine"]
    rows = []
    for g in groups:
        for side in ("in", "out"):
            cells = [_stat([r.metrics.get(f"val/ce_{side}/s{k}") for r in g.completed]) for k in scales]
            cells += [_stat([r.metrics.get(f"val/ce_{side}_{part}") for r in g.completed]) for part in ("coarse", "fine")]
            rows.append([g.label, "inside mask" if side == "in" else "outside", *cells])
    return [
        "",
        "## Teacher-forced cross-entropy per scale, inside / outside the edit mask (nats/bit, last validation)",
        "",
        "Mask area-pooled to each scale's grid; no sampling noise. Mean ± 95 % CI over seeds ((n=1): one run, no interval).",
        "",
    ] + _table(header, rows)


def _stat(values: Iterable[float | None], digits: int = 3) -> str:
    return mean_ci(v for v in values if v is not None).format(digits)


# -- per edit kind -------------------------------------------------------------------------------


@dataclass
class KindRow:
    group: str
    kind: str
    samples: int
    stats: dict[str, MeanCI]  # KIND_FIELDS and "margin" (success − copy_success), over runs


def kind_rows(groups: Sequence[GroupLike], samples: SampleCache) -> list[KindRow]:
    """Per group and edit kind: each run's mean per field, then mean ± CI over the group's runs."""
    out = []
    for g in groups:
        per_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        counts: dict[str, int] = defaultdict(int)
        for run in g.completed:
            by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in samples.get(run).rows:
                by_kind[str(row.get("kind", "?"))].append(row)
            for kind, rows in by_kind.items():
                counts[kind] += len(rows)
                for name in KIND_FIELDS:
                    values = [v for r in rows if (v := _finite(r.get(name))) is not None]
                    if values:
                        per_kind[kind][name].append(sum(values) / len(values))
                margins = [s - c for r in rows if (s := _finite(r.get("success"))) is not None and (c := _finite(r.get("copy_success"))) is not None]
                if margins:
                    per_kind[kind]["margin"].append(sum(margins) / len(margins))
        for kind in sorted(per_kind):
            stats = {name: mean_ci(per_kind[kind].get(name, [])) for name in (*KIND_FIELDS, "margin")}
            out.append(KindRow(g.label, kind, counts[kind], stats))
    return out


def kind_section(rows: list[KindRow]) -> list[str]:
    if not rows:
        return []
    header = ["group", "edit kind", "samples", "success (dB)", "copy success (dB)", "success − copy (dB)", "preservation (dB)", "copy preservation (dB)"]
    body = [
        [r.group, r.kind, str(r.samples), *(r.stats[n].format(2) for n in ("success", "copy_success", "margin", "preservation", "copy_preservation"))]
        for r in rows
    ]
    losing = [f"{r.group}/{r.kind}" for r in rows if r.stats["margin"].n and r.stats["margin"].mean <= 0]
    unclear = [f"{r.group}/{r.kind}" for r in rows if r.stats["margin"].n >= 2 and r.stats["margin"].mean > 0 >= r.stats["margin"].low]
    if losing:
        verdict = f"Edit kinds that do **not** beat copying the source on success: {', '.join(losing)}."
    else:
        verdict = "Every edit kind beats copying the source on success (mean margin > 0) for every group."
    if unclear:
        verdict += f" Not clearly (the margin's 95 % CI reaches 0): {', '.join(unclear)}."
    return [
        "",
        "## Per edit kind (greedy validation edits, from samples.jsonl)",
        "",
        "*copy*: the unedited source through the tokenizer, scored the same way as the edits (as in `varedit-lab eval`). "
        "success − copy: the per-sample margin over copying, mean ± 95 % CI over seeds.",
        "",
    ] + _table(header, body) + ["", verdict]


# -- cost ----------------------------------------------------------------------------------------


@dataclass
class Cost:
    source: str  # the cost.json used, or "runs"
    machine: str
    per_group: dict[str, dict[str, MeanCI]]
    note: str = ""


def find_cost_file(sweep_dir: Path) -> Path | None:
    for path in (sweep_dir / COST_FILE, sweep_dir.parent / COST_FILE):
        if path.is_file():
            return path
    return None


def read_cost_file(path: Path) -> Cost:
    """Parse ``cost.json`` (format in the module doc); a malformed file is an error naming the key."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SweepError(f"{path}: not JSON: {err}") from None
    strategies = data.get("strategies") if isinstance(data, dict) else None
    if not isinstance(strategies, dict) or not strategies:
        raise SweepError(f"{path}: 'strategies' must be a mapping strategy → {{train_step_s, edit_s, seq_len}}")
    per_group: dict[str, dict[str, MeanCI]] = {}
    for name, fields in strategies.items():
        if not isinstance(fields, dict):
            raise SweepError(f"{path}: strategies.{name} must be a mapping of measurements")
        per_group[str(name)] = {}
        for key, value in fields.items():
            values = value if isinstance(value, list) else [value]
            if not values or any(_finite(v) is None for v in values):
                raise SweepError(f"{path}: strategies.{name}.{key} must be a number or a list of numbers, got {value!r}")
            per_group[str(name)][key] = mean_ci(float(v) for v in values)
    return Cost(str(path), _cost_setting(data), per_group)


def _cost_setting(data: dict[str, Any]) -> str:
    """How the times were taken, from the file's own fields (``varedit_lab.eval.cost`` writes these)."""
    parts = [str(data[k]) for k in ("machine", "measured") if data.get(k)]
    parts += [f"{label} {data[k]}" for k, label in (("threads", "threads"), ("batch_size", "batch"), ("repeats", "repeats")) if data.get(k) is not None]
    return "; ".join(parts)


def cost_from_runs(groups: Sequence[GroupLike]) -> Cost:
    metrics = {"train_step_s": "perf/train_step_s", "seq_len": "perf/seq_len"}
    per_group = {g.label: {f: mean_ci(r.metrics.get(m, math.nan) for r in g.completed) for f, m in metrics.items()} for g in groups}
    note = (
        "No cost.json: times are the runs' own `perf/train_step_s`, measured while runs shared the machine's cores; "
        "only the sequence lengths are exact. Measure each strategy alone (e.g. `benchmarks/run.py`) into cost.json for cost claims."
    )
    return Cost("runs", "", per_group, note)


def _cost_cell(stat: MeanCI | None, digits: int) -> str:
    """One measurement (e.g. a median of timings) as a plain number; repeats as mean ± 95 % CI."""
    if stat is None or not stat.n:
        return "—"
    return f"{stat.mean:.{digits}f}" if stat.n == 1 else stat.format(digits)


def cost_section(cost: Cost) -> list[str]:
    fields = [f for f in COST_FIELDS if any(f[0] in v for v in cost.per_group.values())]
    if not fields:
        return []
    rows = [[group, *(_cost_cell(values.get(k), d) for k, _, d in fields)] for group, values in cost.per_group.items()]
    where = f"from `{cost.source}`" + (f" ({cost.machine})" if cost.machine else "") if cost.source != "runs" else "from the runs"
    lines = ["", f"## Cost per strategy ({where})", ""] + _table(["strategy", *(label for _, label, _ in fields)], rows)
    return lines + (["", cost.note] if cost.note else [])


def edits_section(groups: Sequence[GroupLike], sweep_dir: Path) -> list[str]:
    """The last validation grid of each group's lowest-seed run, one under the other: the same
    validation samples edited by every strategy (rows: source | target | edit)."""
    lines: list[str] = []
    for group in groups:
        runs = sorted(group.completed, key=lambda r: (r.params.get("seed", 0), r.name))
        run = next((r for r in runs if r.run_dir is not None and list(Path(r.run_dir).glob("val_edits/*.png"))), None)
        if run is None:
            continue
        grid = max(Path(run.run_dir).glob("val_edits/*.png"))
        try:
            where = grid.relative_to(sweep_dir)
        except ValueError:
            where = grid
        lines += [f"**{group.label}** (`{run.name}`, {grid.stem})", "", f"![{group.label} validation edits]({where.as_posix()})", ""]
    if not lines:
        return []
    return ["", "## Validation edits per strategy", "",
            "The same validation samples, edited by each strategy's lowest-seed run at its last validation "
            "(each row: source | target | edit):", "", *lines]
