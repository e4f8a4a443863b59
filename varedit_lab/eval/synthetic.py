"""The synthetic benchmark: edits scored against exact targets and ground-truth masks.

The test split's shards (``varedit-lab data synth``) carry the source, the exact target, the edit
mask and the edit ``kind``. For every sample the editor's output is scored with
:class:`varedit_lab.metrics.EditQuality`: **success** (PSNR and L1 to the target inside the mask),
**preservation** (PSNR and L1 to the source outside it) and **balance** (per-sample harmonic mean of
the two PSNRs), overall and per edit kind, next to the copy-the-source baseline (the "edit" that
changes nothing: perfect preservation, the success of doing nothing). Images are decoded at the
editor's resolution (resize to cover, centre-crop), exactly as training and validation see them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from varedit_lab.metrics import EditQuality


def synthetic_shards(data: str | Path | Sequence[str], split: str = "test") -> list[str]:
    """Shard URLs of ``split``: a synthetic data folder (its ``{split}-*.tar``) or any shard spec."""
    from varedit_lab.data.shards import expand_shards

    if isinstance(data, (str, Path)) and Path(data).is_dir():
        files = sorted(Path(data).glob(f"{split}-*.tar"))
        if files:
            return [str(f) for f in files]
    urls = expand_shards(data)
    if not urls:
        raise FileNotFoundError(f"no {split} shards in {data}")
    return urls


class QualityGroups:
    """EditQuality of the edits and of the copy baseline, overall and per kind."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, EditQuality]] = defaultdict(lambda: {"edit": EditQuality(), "copy": EditQuality()})

    def update(self, kind: str, edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        for name in ("__overall__", kind or "unknown"):
            self.groups[name]["edit"].update(edited, source, target, mask)
            self.groups[name]["copy"].update(source, source, target, mask)

    def summary(self, name: str) -> dict[str, dict[str, float]]:
        out = {}
        for variant, metric in self.groups[name].items():
            values = {k: float(v) for k, v in metric.compute().items() if not torch.isnan(v)}
            out[variant] = {"n": float(metric.n_balance), **values}
        return out

    def kinds(self) -> list[str]:
        return sorted(k for k in self.groups if k != "__overall__")


def evaluate_synthetic(
    editor: Any,
    data: str | Path | Sequence[str],
    out_dir: str | Path,
    *,
    split: str = "test",
    limit: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    grid_samples: int = 8,
    grid_per_kind: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Edit the first ``limit`` test samples (0 = all), score them; writes ``grid.png`` (rows: source,
    target, edit) and ``grids/<kind>.png``; returns the metrics dict (see :mod:`varedit_lab.eval.report`)."""
    from varedit_lab.data.shards import FixedBatches, read_fixed_list

    urls = synthetic_shards(data, split)
    items, bad = read_fixed_list(urls, limit, editor.image_size, where=f"{split} shards")
    if not items:
        raise ValueError(f"no usable samples in {data} ({split})")
    settings = editor.sampling.replace(**(sampling or {}))
    groups = QualityGroups()
    grid: list[list[torch.Tensor]] = [[], [], []]
    per_kind_grid: dict[str, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], []])
    edit_seconds, done, unmasked = 0.0, 0, 0
    for index, batch in enumerate(FixedBatches(items, batch_size)):
        began = time.perf_counter()
        text = editor.encode_text(batch["instruction"])
        edited = editor.edit_tensors(batch["source"], text, settings, seed=seed + index)
        edit_seconds += time.perf_counter() - began
        for i, kind in enumerate(batch["kind"]):
            if not bool(batch["has_mask"][i]):
                unmasked += 1  # no ground-truth region: success/preservation are undefined
                continue
            row = slice(i, i + 1)
            groups.update(kind, edited[row], batch["source"][row], batch["target"][row], batch["mask"][row])
            _collect(grid, grid_samples, batch, edited, i)
            _collect(per_kind_grid[kind or "unknown"], grid_per_kind, batch, edited, i)
        done += len(batch["kind"])
        if progress is not None:
            progress(done, len(items))
    out = Path(out_dir)
    _save_grids(out, grid, per_kind_grid)
    return {
        "benchmark": "synthetic",
        "num_samples": len(items),
        "editor": editor.describe(),
        "data": {"shards": urls, "split": split, "unmasked_samples": unmasked, "bad_samples": dict(bad)},
        "metrics": groups.summary("__overall__"),
        "per_kind": {kind: groups.summary(kind) for kind in groups.kinds()},
        "timing": {"edit_seconds": round(edit_seconds, 4), "seconds_per_image": round(edit_seconds / max(len(items), 1), 4),
                   "device": str(editor.device), "precision": editor.precision},
    }


def _collect(rows: list[list[torch.Tensor]], limit: int, batch: dict[str, Any], edited: torch.Tensor, i: int) -> None:
    if len(rows[0]) < limit:
        for row, image in zip(rows, (batch["source"][i], batch["target"][i], edited[i])):
            row.append(image)


def _save_grids(out: Path, grid: list[list[torch.Tensor]], per_kind: dict[str, list[list[torch.Tensor]]]) -> None:
    from varedit_lab.images import image_grid, save_image

    if grid[0]:
        save_image(image_grid([torch.stack(r) for r in grid]), out / "grid.png")
    for kind, rows in per_kind.items():
        if rows[0]:
            save_image(image_grid([torch.stack(r) for r in rows]), out / "grids" / f"{kind}.png")
