"""Evaluation of editors: the synthetic benchmark and public benchmarks from local copies.

Submodules import lazily (``import varedit_lab.eval`` stays light):

* :mod:`varedit_lab.eval.synthetic`: success inside / preservation outside the ground-truth mask,
  balance, per edit kind, against the copy-the-source baseline; image grids;
* :mod:`varedit_lab.eval.benchmarks`: EMU-Edit test and PIE-Bench folder loaders (layouts documented
  there) and their evaluation;
* :mod:`varedit_lab.eval.clip_metrics`: CLIP-I, CLIP-Out (CLIP-T), CLIP-Dir, DINO and L1 with
  CLIP/DINO weights from local folders;
* :mod:`varedit_lab.eval.report`: ``metrics.json``, ``metrics.md`` and the W&B run.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_synthetic": "synthetic",
    "evaluate_benchmark": "benchmarks",
    "load_emu_edit": "benchmarks",
    "load_pie_bench": "benchmarks",
    "decode_pie_mask": "benchmarks",
    "ClipScorer": "clip_metrics",
    "DinoScorer": "clip_metrics",
    "write_report": "report",
    "log_to_wandb": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'varedit_lab.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"varedit_lab.eval.{_EXPORTS[name]}"), name)
