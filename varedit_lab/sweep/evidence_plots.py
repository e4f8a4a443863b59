"""Plots of the report's evidence: claim differences vs training step, per-scale cross-entropy
inside / outside the mask, per-edit-kind quality against the copy baseline.

Rules: units on every axis; dB values as points on a free axis (never bars from zero); the copy
baseline as a line; intervals only where there are at least two seeds (n = 1 gets a bare point).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from varedit_lab.sweep.evidence import ClaimResult, GroupLike, KindRow, unit_of
from varedit_lab.sweep.stats import MeanCI, mean_ci


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _point(ax: Any, x: float, stat: MeanCI, **style: Any) -> None:
    """A mean as a marker, with its 95 % CI whisker only when n ≥ 2."""
    if not stat.n:
        return
    err = None if math.isnan(stat.half_width) else [[stat.half_width], [stat.half_width]]
    ax.errorbar([x], [stat.mean], yerr=err, fmt=style.pop("fmt", "o"), capsize=3 if err else 0, **style)


def plot_claim_differences(path: Path, results: Sequence[ClaimResult]) -> Path | None:
    """arm − baseline against training step for every claim with validation curves (0 and ±δ marked)."""
    shown = [r for r in results if r.curve[0]]
    if not shown:
        return None
    plt = pyplot()
    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.4 * rows), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        steps, stats = r.curve
        means = [s.mean for s in stats]
        ax.plot(steps, means, marker="o" if len(steps) < 20 else None, color="C0", label=f"mean over pairs (n={r.stats.n})")
        with_ci = [(x, s) for x, s in zip(steps, stats) if s.n >= 2]
        if with_ci:
            xs = [x for x, _ in with_ci]
            ax.fill_between(xs, [s.low for _, s in with_ci], [s.high for _, s in with_ci], color="C0", alpha=0.2, label="95 % CI")
        ax.axhline(0.0, color="black", linewidth=0.8)
        if r.delta > 0:
            ax.axhline(r.claim.sign * r.delta, color="gray", linestyle="--", linewidth=0.8, label=f"δ in the claimed direction ({r.delta:.3g})")
        unit = unit_of(r.claim.metric)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{r.claim.arm} − {r.claim.baseline}" + (f" ({unit})" if unit else ""))
        ax.set_title(f"{r.claim.name}: {r.claim.metric} ({r.claim.direction} is better)", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    return _save(fig, path)


def plot_ce_scales(path: Path, groups: Sequence[GroupLike], scales: list[int]) -> Path | None:
    """Last-validation cross-entropy per scale: inside the mask (solid) and outside (dashed), per group."""
    if not scales:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, g in enumerate(groups):
        for side, style in (("in", "-"), ("out", "--")):
            stats = [mean_ci(r.metrics.get(f"val/ce_{side}/s{k}", math.nan) for r in g.completed) for k in scales]
            points = [(k + (i - len(groups) / 2) * 0.05, s) for k, s in zip(scales, stats) if s.n]
            if not points:
                continue
            n = max(s.n for _, s in points)
            ax.plot([x for x, _ in points], [s.mean for _, s in points], style, color=f"C{i}", label=f"{g.label} {'inside' if side == 'in' else 'outside'} (n={n})")
            for x, s in points:
                _point(ax, x, s, color=f"C{i}", fmt="o" if side == "in" else "s", markersize=4)
    ax.set_xlabel("target scale k (coarse → fine)")
    ax.set_ylabel("teacher-forced cross-entropy (nats/bit)")
    ax.set_xticks(scales)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("per-scale cross-entropy inside / outside the edit mask (last validation)", fontsize=9)
    return _save(fig, path)


def plot_ce_curves(path: Path, groups: Sequence[GroupLike], scales: list[int]) -> Path | None:
    """Validation curves of the per-scale cross-entropy, one panel per scale, mean over seeds."""
    if not scales or not any(r.curves.get(f"val/ce_in/s{scales[0]}") for g in groups for r in g.completed):
        return None
    plt = pyplot()
    cols = min(4, len(scales))
    rows = math.ceil(len(scales) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, k in zip(axes.flat, scales):
        for i, g in enumerate(groups):
            for side, style in (("in", "-"), ("out", "--")):
                points: dict[int, list[float]] = {}
                for r in g.completed:
                    for step, value in r.curves.get(f"val/ce_{side}/s{k}", []):
                        points.setdefault(step, []).append(value)
                if points:
                    steps = sorted(points)
                    ax.plot(steps, [sum(points[s]) / len(points[s]) for s in steps], style, color=f"C{i}", marker=".",
                            label=f"{g.label} {side}")
        ax.set_title(f"scale {k}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("CE (nats/bit)")
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(scales) :]:
        ax.axis("off")
    fig.suptitle("validation cross-entropy per scale: inside (solid) / outside (dashed) the mask, mean over seeds", fontsize=9)
    return _save(fig, path)


def plot_kinds(path: Path, rows: Sequence[KindRow]) -> Path | None:
    """Success and preservation per edit kind: one marker per group, the copy baseline as a line."""
    if not rows:
        return None
    plt = pyplot()
    kinds = sorted({r.kind for r in rows})
    groups = list(dict.fromkeys(r.group for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(5.2 * 2, 3.6), squeeze=False)
    for ax, (name, copy) in zip(axes.flat, (("success", "copy_success"), ("preservation", "copy_preservation"))):
        for x, kind in enumerate(kinds):
            copies = [r.stats[copy] for r in rows if r.kind == kind and r.stats[copy].n]
            if copies:
                level = sum(c.mean for c in copies) / len(copies)
                ax.hlines(level, x - 0.4, x + 0.4, color="black", linewidth=1.5, label="copy source" if x == 0 else None)
            for i, group in enumerate(groups):
                match = [r for r in rows if r.kind == kind and r.group == group]
                if match:
                    _point(ax, x + (i - (len(groups) - 1) / 2) * 0.15, match[0].stats[name], color=f"C{i}",
                           label=group if x == 0 else None)
        ax.set_xticks(range(len(kinds)), kinds, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{name} (dB)")
        ax.set_title(f"{name} per edit kind (mean, 95 % CI when n ≥ 2)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)
