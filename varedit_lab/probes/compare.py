"""Compare probe results across strategies: the paper's layer-1-vs-deeper contrast in numbers and a plot.

For every result, the first probed layer (the paper's "layer 1") and the last one are summarised per
target query scale ``s >= 1`` (the SOS scale is left out: its single cell covers the whole image):

* ``source_mass``: attention mass on source-derived keys (source blocks and SAR's pooled references).
* ``same_scale_share``: the share of that mass on the source-derived block with the query's own grid
  (full-scale: ``src`` of the same scale; SAR layer 1: its pooled ``ref``; max-scale: only the last
  scale has one). The paper: layer 1 focuses on the corresponding (and coarser) source scales; SAR's
  layer 1 on its own reference. **Structural** where the mask alone fixes it (the visible
  source-derived blocks all have the query's grid, or none has: max-scale, SAR, and full-scale's SOS),
  so it is not learned: ``same_scale_structural`` (1 where fixed), marked in the table and drawn with
  hollow markers in the figure.
* ``locality`` (and ``uniform_locality``, its value under uniform attention, given for the same
  scales): the share of the mass on the finest source that lies within the probe's radius of the
  aligned position; NaN where the finest source is invisible (SAR's layer 1; full-scale's coarse
  target scales under its default ``coarser`` visibility). The paper: deeper layers are local/diagonal.
* ``diagonality``: lift of the mass on the aligned source tokens over uniform attention (1 = none).
* ``norm_entropy``: attention entropy / log(number of visible keys); 1 = uniform, lower = peaked.

:func:`summarize` returns the scale means, :func:`summary_markdown` a table of them and
:func:`compare_strategies` the figure (per scale, solid: first layer, dashed: last layer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from matplotlib.figure import Figure

from varedit_lab.probes import alignment, geometry
from varedit_lab.probes.stats import ProbeResult

METRICS = ("source_mass", "same_scale_share", "same_scale_structural", "locality", "uniform_locality", "diagonality", "norm_entropy")
STRUCTURAL_NOTE = "structural: fixed by the attention mask, not learned"


def target_blocks(result: ProbeResult) -> list[int]:
    """Sequence blocks of target scales 1..K-1 (SOS excluded)."""
    layout = result.layout
    return list(range(layout.num_source_blocks + 1, layout.num_blocks))


def same_scale_mass(result: ProbeResult, layer: int) -> torch.Tensor:
    """(num blocks,) mass on the source-derived key block whose grid equals the query block's."""
    layout = result.layout
    vis = layout.visibility(layer)
    mass = result.block_mass(layer)
    out = torch.zeros(layout.num_blocks, dtype=torch.float64)
    for kb in range(mass.shape[1]):
        if not geometry.is_source_derived(layout, vis, kb):
            continue
        kgrid = geometry.key_grid(layout, vis, kb)
        for qb in range(layout.num_blocks):
            if kgrid is not None and tuple(kgrid) == tuple(geometry.block_grid(layout, qb)):
                out[qb] += mass[qb, kb]
    return out


def layer_profile(result: ProbeResult, layer: int) -> dict[str, torch.Tensor]:
    """Every metric of ``METRICS`` per target scale 1..K-1 of one layer (NaN where undefined)."""
    blocks = target_blocks(result)
    source = result.source_mass(layer)["total"]
    share = same_scale_mass(result, layer) / source.clamp_min(1e-12)
    share = torch.where(source > 0, share, torch.full_like(share, math.nan))
    locality = result.locality(layer)
    # the baseline only where the locality is defined, so that scale means compare like with like
    uniform = torch.where(torch.isnan(locality), locality, result.uniform_locality())
    layout = result.layout
    vis = layout.visibility(layer)
    fixed = [alignment.share_fixed_by_mask(layout, vis, b, {alignment.CORRESPONDING}) for b in blocks]
    return {
        "source_mass": source[blocks],
        "same_scale_share": share[blocks],
        "same_scale_structural": torch.tensor(fixed, dtype=torch.float64),
        "locality": locality[blocks],
        "uniform_locality": uniform[blocks],
        "diagonality": result.diagonality(layer)[blocks],
        "norm_entropy": (result.entropy(layer) / result.max_entropy(layer))[blocks],
    }


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def summarize(result: ProbeResult) -> dict[str, dict[str, float]]:
    """``{"first": {...}, "last": {...}}``: scale means of every metric at the first and last probed
    layer; each dict also holds its ``layer`` index."""
    layers = result.layers
    out = {}
    for key, layer in (("first", layers[0]), ("last", layers[-1])):
        profile = layer_profile(result, layer)
        out[key] = {"layer": float(layer), **{name: _nanmean(values) for name, values in profile.items()}}
    return out


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _share(summary: dict[str, float]) -> str:
    """The same-scale share, marked where the mask fixes it at every target scale (or some)."""
    fixed = summary["same_scale_structural"]
    mark = " (structural)" if fixed == 1.0 else "" if fixed == 0.0 or math.isnan(fixed) else " (partly structural)"
    return _fmt(summary["same_scale_share"]) + mark


def summary_markdown(results: Mapping[str, ProbeResult]) -> str:
    """A markdown table: per strategy, first vs last layer of each metric (means over target scales).
    Same-scale shares the mask fixes are marked ``(structural)`` and explained under the table."""
    header = ["strategy", "layers", "source mass", "same-scale share", "locality (uniform)", "diagonality", "entropy / max"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        s = summarize(result)
        first, last = s["first"], s["last"]

        def pair(metric: str) -> str:
            return f"{_fmt(first[metric])} → {_fmt(last[metric])}"

        locality = f"{pair('locality')} ({_fmt(last['uniform_locality'])})"
        row = [name, f"{int(first['layer'])} → {int(last['layer'])}", pair("source_mass"), f"{_share(first)} → {_share(last)}",
               locality, pair("diagonality"), pair("norm_entropy")]
        lines.append("| " + " | ".join(row) + " |")
    if any(s[key]["same_scale_structural"] > 0 for s in map(summarize, results.values()) for key in ("first", "last")):
        lines += ["", f"Same-scale share — {STRUCTURAL_NOTE} (only one kind of source block is visible to those target scales)."]
    return "\n".join(lines) + "\n"


def compare_strategies(results: Mapping[str, ProbeResult], path: str | Path | None = None) -> Figure:
    """First (solid) vs last (dashed) probed layer per strategy (colour), per target scale: source
    mass, same-scale share, locality (grey dotted: uniform attention) and normalised entropy."""
    from matplotlib import colormaps

    from varedit_lab.probes.plots import _figure, _save

    if not results:
        raise ValueError("nothing to compare: no probe results")
    panels = [("source_mass", "mass on source-derived keys"),
              ("same_scale_share", "share of it on the same-grid src/ref\n(hollow: structural, fixed by the mask)"),
              ("locality", "locality on the finest source"), ("norm_entropy", "entropy / max entropy")]
    fig, axes = _figure(2, 2, (4.6, 3.4))
    colors = colormaps["tab10"]
    for index, (name, result) in enumerate(results.items()):
        blocks = target_blocks(result)
        labels = [geometry.block_labels(result.layout)[b].split("@")[-1] for b in blocks]
        xs = list(range(len(labels)))
        first, last = result.layers[0], result.layers[-1]
        for layer, style in ((first, "o-"), (last, "s--")):
            profile = layer_profile(result, layer)
            for ax, (metric, _) in zip(axes, panels):
                ax.plot(xs, profile[metric].numpy(), style, color=colors(index), label=f"{name}, layer {layer}")
            fixed = profile["same_scale_structural"].bool().numpy()
            if fixed.any():  # hollow white markers over the structural points
                share = profile["same_scale_share"].numpy()
                axes[1].plot([x for x, f in zip(xs, fixed) if f], share[fixed], style[0], ls="none", mfc="white",
                             color=colors(index))
        for ax in axes:
            ax.set_xticks(xs, labels)
    first_result = next(iter(results.values()))
    uniform = first_result.uniform_locality()[target_blocks(first_result)]  # per scale, whatever the masks
    axes[2].plot(range(len(uniform)), uniform.numpy(), ":", color="gray", label="uniform attention")
    for ax, (metric, title) in zip(axes, panels):
        ax.set(title=title, xlabel="target scale (query grid)")
        if metric == "locality":  # small values on large grids: autoscale, from 0
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(-0.03, 1.03)
    handles, names = axes[2].get_legend_handles_labels()  # every line, the uniform baseline included
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize=7)
    fig.suptitle("first probed layer (the paper's layer 1; solid) vs the last (dashed), per strategy", fontsize=10)
    return _save(fig, path)
