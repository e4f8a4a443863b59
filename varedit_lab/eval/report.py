"""Evaluation outputs: ``metrics.json``, ``metrics.md`` (markdown tables) and a W&B run.

A metrics dict (from :func:`~varedit_lab.eval.synthetic.evaluate_synthetic` or
:func:`~varedit_lab.eval.benchmarks.evaluate_benchmark`) holds ``metrics`` (overall) and
``per_kind``, each ``{"edit": {...}, "copy": {...}}`` with ``n`` and metric means; plus ``editor``,
``timing`` and ``benchmark``. The W&B run is offline unless ``WANDB_MODE`` says otherwise and is
skipped when ``WANDB_MODE=disabled``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

VARIANTS = ("edit", "copy")
# Column order of the tables; other metrics follow alphabetically.
PREFERRED = ("success", "preservation", "balance", "success_l1", "preservation_l1", "clip_i", "clip_out", "clip_dir",
             "dino", "l1", "clip_whole", "clip_edit", "bg_psnr", "bg_l1")


def metric_names(metrics: dict[str, Any]) -> list[str]:
    groups = [metrics["metrics"], *metrics.get("per_kind", {}).values()]
    names = {k for group in groups for v in VARIANTS for k in group.get(v, {}) if k != "n"}
    return [n for n in PREFERRED if n in names] + sorted(names - set(PREFERRED))


def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows (variant, kind, n, metrics...) of the overall and per-kind results."""
    names = metric_names(metrics)
    columns = ["variant", "kind", "n", *names]
    rows = []
    for variant in VARIANTS:
        for kind, group in [("all", metrics["metrics"]), *sorted(metrics.get("per_kind", {}).items())]:
            values = group.get(variant)
            if values is None:
                continue
            rows.append([variant, kind, int(values.get("n", 0)), *[values.get(n, float("nan")) for n in names]])
    return columns, rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown(metrics: dict[str, Any]) -> str:
    """One table per variant (the editor's edits, the copy-the-source baseline)."""
    columns, rows = table_rows(metrics)
    editor = metrics.get("editor", {})
    timing = metrics.get("timing", {})
    lines = [f"# {metrics.get('benchmark', 'evaluation')}: {metrics.get('num_samples', 0)} samples", ""]
    lines.append(f"Editor: `{editor.get('source', '?')}` {editor.get('path', '')} at {editor.get('image_size', '?')} px, "
                 f"sampling {json.dumps(editor.get('sampling', {}))}.")
    if timing:
        lines.append(f"Editing time: {timing.get('seconds_per_image', float('nan')):.4g} s/image on "
                     f"{timing.get('device', '?')} ({timing.get('precision', '?')}).")
    for variant, title in (("edit", "Edits"), ("copy", "Copy-the-source baseline")):
        body = [r for r in rows if r[0] == variant]
        if not body:
            continue
        lines += ["", f"## {title}", "", "| " + " | ".join(columns[1:]) + " |", "|" + "---|" * (len(columns) - 1)]
        lines += ["| " + " | ".join(_fmt(v) for v in r[1:]) + " |" for r in body]
    return "\n".join(lines) + "\n"


def write_report(metrics: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "metrics.json", out / "metrics.md"
    json_path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=_json_default) + "\n")
    md_path.write_text(markdown(metrics))
    return json_path, md_path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def flat_summary(metrics: dict[str, Any]) -> dict[str, float]:
    """``{benchmark}/{variant}/{metric}`` and ``.../{kind}/{metric}`` scalars for a W&B summary."""
    prefix = metrics.get("benchmark", "eval")
    out: dict[str, float] = {}
    for variant in VARIANTS:
        for name, value in metrics["metrics"].get(variant, {}).items():
            out[f"{prefix}/{variant}/{name}"] = value
        for kind, group in metrics.get("per_kind", {}).items():
            for name, value in group.get(variant, {}).items():
                out[f"{prefix}/{variant}/{kind}/{name}"] = value
    for name, value in metrics.get("timing", {}).items():
        if isinstance(value, (int, float)):
            out[f"{prefix}/timing/{name}"] = value
    return out


def log_to_wandb(metrics: dict[str, Any], out_dir: str | Path, project: str = "varedit-lab-eval", name: str | None = None,
                 images: Sequence[str | Path] = (), mode: str | None = None) -> str | None:
    """Log the table, the scalars and the grids as one W&B run; returns its directory (None if disabled)."""
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    import wandb

    columns, rows = table_rows(metrics)
    run = wandb.init(project=project, name=name, dir=str(out_dir), mode=mode, job_type="eval",
                     config={"benchmark": metrics.get("benchmark"), "editor": metrics.get("editor", {})})
    try:
        run.log({f"{metrics.get('benchmark', 'eval')}/table": wandb.Table(columns=columns, data=rows)})
        for path in images:
            run.log({f"{metrics.get('benchmark', 'eval')}/{Path(path).stem}": wandb.Image(str(path))})
        run.summary.update(flat_summary(metrics))
        return str(Path(run.dir).parent)
    finally:
        run.finish()
