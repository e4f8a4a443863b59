"""Probe plots (matplotlib, PNG): block-mass heatmaps, locality vs depth, paper-style map grids.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, Agg canvas), never
pyplot: nothing touches the global backend or pyplot's figure registry, so the functions are safe in
callbacks and headless runs, and a notebook shows the returned figure with ``display(fig)``.
Every function returns the figure and writes a PNG when ``path`` is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from varedit_lab.probes import alignment, geometry
from varedit_lab.probes.probe import resolve_query_blocks
from varedit_lab.probes.stats import ProbeResult, key_column_starts


def _figure(rows: int, cols: int, cell: tuple[float, float]) -> tuple[Figure, list]:
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    return fig


def _selected_layers(result: ProbeResult, layers: Sequence[int] | None) -> list[int]:
    chosen = result.layers if layers is None else [layer for layer in layers if layer in result.layers]
    if not chosen:
        raise ValueError(f"nothing to plot: probed layers are {result.layers}, asked for {layers}")
    return chosen


# Cell numbers: 7 pt text, written only where a cell is at least this big (points); else none.
CELL_FONT_PT = 7
MIN_CELL_PT = (4 * 0.6 * CELL_FONT_PT + 4, 1.5 * CELL_FONT_PT)  # "0.42" plus a margin, one line
TICK_FONT_PT = 6


def plot_block_mass(
    result: ProbeResult,
    path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    head: int | None = None,
    annotate: bool = True,
    cell_inches: tuple[float, float] = (0.42, 0.36),
) -> Figure:
    """One heatmap per layer: rows = query blocks, columns = key blocks, colour = attention mass
    (head mean unless ``head``); grey cells: not visible (the mask). Unrecorded query blocks are left
    out. Cell numbers (``annotate``) are written only where the drawn cells are large enough to read
    them (``MIN_CELL_PT``)."""
    from matplotlib import colormaps

    chosen = _selected_layers(result, layers)
    rows, cols = _grid_shape(len(chosen))
    labels = result.block_labels()
    num_keys = max(len(result.key_labels(layer)) for layer in chosen)
    fig, axes = _figure(rows, cols, (cell_inches[0] * num_keys + 2.0, cell_inches[1] * len(labels) + 1.6))
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    drawn = []
    for ax, layer in zip(axes, chosen):
        qblocks = result.query_blocks(layer)
        mass = result.block_mass(layer, head)[qblocks].numpy()
        visible = result.layout.visibility(layer).visible[qblocks].numpy()
        image = ax.imshow(np.ma.masked_where(~visible, mass), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        ax.set_xticks(range(mass.shape[1]), result.key_labels(layer), rotation=60, ha="right", fontsize=TICK_FONT_PT + 1)
        ax.set_yticks(range(len(qblocks)), [labels[b] for b in qblocks], fontsize=TICK_FONT_PT + 1)
        ax.set_title(f"layer {layer}" + ("" if head is None else f", head {head}"), fontsize=9)
        drawn.append((ax, mass, visible))
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(chosen)], shrink=0.8, label="attention mass (grey: not visible)")
    fig.suptitle(f"block attention mass ({result.layout.description.get('name', '?')}, query block -> key block)", fontsize=10)
    if annotate:
        fig.draw_without_rendering()  # final axes sizes (constrained layout) decide whether numbers fit
        for ax, mass, visible in drawn:
            width, height = _cell_points(fig, ax, mass.shape)
            if width >= MIN_CELL_PT[0] and height >= MIN_CELL_PT[1]:
                for (i, j), value in _cells(mass):
                    if visible[i, j]:
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=CELL_FONT_PT,
                                color="white" if value < 0.6 else "black")
    return _save(fig, path)


def _cell_points(fig: Figure, ax, shape: tuple[int, int]) -> tuple[float, float]:
    """(width, height) of one heatmap cell in points, after layout."""
    box = ax.get_window_extent()
    scale = 72.0 / fig.dpi
    return box.width * scale / max(shape[1], 1), box.height * scale / max(shape[0], 1)


def _cells(mass):
    for i in range(mass.shape[0]):
        for j in range(mass.shape[1]):
            yield (i, j), float(mass[i, j])


def plot_locality(result: ProbeResult, path: str | Path | None = None, head: int | None = None) -> Figure:
    """Locality and diagonality vs depth, one line per target query scale; dashed: uniform attention."""
    labels = result.block_labels()
    layout = result.layout
    targets = range(layout.num_source_blocks, layout.num_blocks)
    fig, (ax_loc, ax_diag) = _figure(1, 2, (5.0, 3.6))
    uniform = result.uniform_locality()
    cmap = _colormap(len(targets))
    for i, block in enumerate(targets):
        points = [(layer, float(result.locality(layer, head)[block]), float(result.diagonality(layer, head)[block])) for layer in result.layers]
        points = [p for p in points if not math.isnan(p[1])]
        if not points:
            continue
        xs = [p[0] for p in points]
        color = cmap(i)
        ax_loc.plot(xs, [p[1] for p in points], "o-", color=color, label=labels[block])
        ax_loc.axhline(float(uniform[block]), color=color, ls="--", lw=0.8)
        ax_diag.plot(xs, [p[2] for p in points], "o-", color=color, label=labels[block])
    ax_diag.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax_loc.set(xlabel="layer", ylabel=f"mass within radius {result.radius:g} / source mass", title="locality (dashed: uniform)")
    ax_diag.set(xlabel="layer", ylabel="aligned mass lift over uniform", title="diagonality (1 = uniform)")
    for ax in (ax_loc, ax_diag):
        _layer_ticks(ax, result.layers)
        ax.set_xlim(min(result.layers) - 0.5, max(result.layers) + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"locality vs depth ({layout.description.get('name', '?')})", fontsize=10)
    return _save(fig, path)


def _layer_ticks(ax, layers: Sequence[int]) -> None:
    """Every probed layer as a tick while they fit (16); beyond that matplotlib's integer ticks."""
    if len(layers) <= 16:
        ax.set_xticks(list(layers))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_alignment(result: ProbeResult, path: str | Path | None = None) -> Figure:
    """The numbers of :mod:`varedit_lab.probes.alignment` vs depth, next to the paper's Fig. 3 statement:
    (a) mass on corresponding / coarser / finer source blocks and on the rest, per layer (means over
    the informative target scales); (b) lift of the corresponding+coarser share of the source mass per
    target scale; (c) locality lift and (d) diagonality on the finest source per target scale. Lifts on
    a log axis; grey: uniform attention (1); red dashed: the verdict threshold ``MIN_LIFT``."""
    rows = alignment.layer_rows(result)
    per_layer = {layer: alignment.layer_alignment(result, layer) for layer in result.layers}
    layers = result.layers
    fig, axes = _figure(2, 2, (5.0, 3.4))
    ax_mass, ax_lift, ax_loc, ax_diag = axes
    bottom = np.zeros(len(rows))
    colours = {"corresponding": "#1b9e77", "coarser": "#7570b3", "finer": "#d95f02"}
    for cls in alignment.CLASSES:
        values = np.nan_to_num(np.array([row[cls] for row in rows]))
        ax_mass.bar(layers, values, bottom=bottom, color=colours[cls], label=f"{cls} source")
        bottom += values
    ax_mass.bar(layers, 1.0 - bottom, bottom=bottom, color="#d9d9d9", label="targets / other keys")
    for x, row in zip(layers, rows):
        if row["structural"]:
            ax_mass.text(x, 1.01, "‡", ha="center", va="bottom", fontsize=8)
    ax_mass.set(ylim=(0, 1.3), xlabel="layer", ylabel="attention mass",
                title="mass per key class (‡: shares fixed by the mask)")
    ax_mass.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax_mass.legend(fontsize=6, loc="upper center", ncols=2)
    scales = result.layout.schedule.num_scales
    cmap = _colormap(scales)
    panels = ((ax_lift, "corr+coarser share of source / uniform", lambda al: al.lift, lambda al: al.informative),
              (ax_loc, "locality on the finest source / uniform", lambda al: al.locality_lift, lambda al: al.local_scales()),
              (ax_diag, "diagonality on the finest source (lift)", lambda al: al.diagonality, lambda al: al.local_scales()))
    for ax, title, values, usable in panels:
        plotted, seen = False, [1.0, alignment.MIN_LIFT]
        for s in range(scales):
            points = [(layer, float(values(al)[s])) for layer, al in per_layer.items() if s in usable(al)]
            points = [(x, y) for x, y in points if math.isfinite(y) and y > 0]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, color=cmap(s),
                        label=next(iter(per_layer.values())).scale_labels[s])
                plotted = True
                seen += [p[1] for p in points]
        ax.axhline(1.0, color="gray", lw=0.8, label="uniform attention")
        ax.axhline(alignment.MIN_LIFT, color="tab:red", ls="--", lw=0.8, label=f"verdict threshold {alignment.MIN_LIFT:g}")
        ax.set_yscale("log")
        ax.set_ylim(min(seen) / 1.6, max(seen) * 1.6)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set(xlabel="layer", ylabel="lift over uniform (log)", title=title + ("" if plotted else " — none (mask)"))
        ax.legend(fontsize=6, ncols=2)
    for ax in axes:
        _layer_ticks(ax, layers)
        ax.title.set_fontsize(9)
    fig.suptitle(f"attention vs the paper's Fig. 3 ({result.layout.description.get('name', '?')}; target scales as lines)", fontsize=10)
    return _save(fig, path)


def _colormap(n: int):
    from matplotlib import colormaps

    base = colormaps["viridis"]
    return lambda i: base(0.85 * i / max(n - 1, 1))


def plot_attention_maps(
    result: ProbeResult,
    path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    head: int | None = None,
    query: int | str | None = None,
) -> Figure:
    """The paper's figure: one full attention map per layer (queries x keys, mean over samples and
    heads unless ``head``), with block boundaries. Needs ``MapRequest(layer, head, query)`` maps."""
    layout = result.layout
    blocks = resolve_query_blocks(layout, query)
    available = [layer for layer in _selected_layers(result, layers) if (layer, head, blocks) in result.maps]
    if not available:
        raise ValueError(f"no full maps with head={head} query={query!r}; request them with MapRequest(layer, {head}, {query!r})")
    rows, cols = _grid_shape(len(available), max_cols=5)
    fig, axes = _figure(rows, cols, (3.4, 3.2))
    labels = geometry.block_labels(layout)
    sized = []
    for ax, layer in zip(axes, available):
        fmap = result.maps[(layer, head, blocks)]
        mean = fmap.mean()
        vmax = float(torch.quantile(mean[mean > 0], 0.99)) if bool((mean > 0).any()) else 1.0
        image = ax.imshow(mean.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto")
        vis = layout.visibility(layer)
        key_names = geometry.key_labels(layout, vis)
        starts = key_column_starts(layout, vis)
        for s in starts[1:]:
            ax.axvline(s - 0.5, color="white", lw=0.4, alpha=0.6)
        for b in blocks[1:]:
            ax.axhline(fmap.row_offsets[b] - 0.5, color="white", lw=0.4, alpha=0.6)
        _block_ticks(ax.set_xticks, starts, layout.key_block_sizes(vis), key_names, rotation=90)
        _block_ticks(ax.set_yticks, [fmap.row_offsets[b] for b in blocks], [layout.block_sizes[b] for b in blocks], [labels[b] for b in blocks])
        ax.set_title(f"layer {layer}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7, format="%.0e")
        sized.append((ax, layout.key_block_sizes(vis), [layout.block_sizes[b] for b in blocks]))
    for ax in axes[len(available) :]:
        ax.set_visible(False)
    who = "mean over heads" if head is None else f"head {head}"
    fig.suptitle(f"attention maps ({layout.description.get('name', '?')}, {who})\n"
                 "rows: queries, columns: keys; labels of small blocks left out", fontsize=9)
    fig.draw_without_rendering()  # final axes sizes decide which block labels fit
    for ax, sizes_x, sizes_y in sized:
        _thin_block_ticks(fig, ax, sizes_x, sizes_y)
    return _save(fig, path)


def _block_ticks(set_ticks, starts: Sequence[int], sizes: Sequence[int], names: Sequence[str], rotation: int = 0) -> None:
    """Tick at each block's centre, labelled with the block's name (thinned later by ``_thin_block_ticks``)."""
    centres = [s + (n - 1) / 2 for s, n in zip(starts, sizes)]
    set_ticks(centres, list(names), fontsize=TICK_FONT_PT, rotation=rotation)


def thin_labels(centres: Sequence[float], sizes: Sequence[int], min_gap: float) -> list[bool]:
    """Which tick labels to keep so that kept centres are at least ``min_gap`` apart (data units):
    larger blocks first (they are the ones a reader finds), then left to right."""
    keep = [False] * len(centres)
    for i in sorted(range(len(centres)), key=lambda i: (-sizes[i], i)):
        if all(abs(centres[i] - centres[j]) >= min_gap for j in range(len(centres)) if keep[j]):
            keep[i] = True
    return keep


def _thin_block_ticks(fig: Figure, ax, sizes_x: Sequence[int], sizes_y: Sequence[int]) -> None:
    """Blank the labels of blocks too small to hold one without overlapping a neighbour's (after layout)."""
    box = ax.get_window_extent()
    gap_pt = 1.4 * TICK_FONT_PT  # one line of text plus spacing, in points
    for axis, sizes, length_px in ((ax.xaxis, sizes_x, box.width), (ax.yaxis, sizes_y, box.height)):
        low, high = sorted(axis.get_view_interval())
        points = max(length_px * 72.0 / fig.dpi, 1e-6)
        centres = list(axis.get_ticklocs())
        names = [t.get_text() for t in axis.get_ticklabels()]
        keep = thin_labels(centres, sizes, gap_pt * (high - low) / points)
        axis.set_ticks(centres, [n if k else "" for n, k in zip(names, keep)])


def save_all(result: ProbeResult, out_dir: str | Path, map_head: int | None = None) -> list[Path]:
    """Write block_mass.png, locality.png and (when full maps were recorded) attention_maps.png."""
    out_dir = Path(out_dir)
    paths = [out_dir / "block_mass.png", out_dir / "locality.png"]
    plot_block_mass(result, paths[0])
    plot_locality(result, paths[1])
    if any(key[1] == map_head and len(key[2]) == result.layout.num_blocks for key in result.maps):
        paths.append(out_dir / "attention_maps.png")
        plot_attention_maps(result, paths[-1], head=map_head)
    return paths
