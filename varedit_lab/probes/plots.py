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

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from varedit_lab.probes import geometry
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


def plot_block_mass(
    result: ProbeResult,
    path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    head: int | None = None,
    annotate: bool = True,
) -> Figure:
    """One heatmap per layer: rows = query blocks, columns = key blocks, colour = attention mass
    (head mean unless ``head``). Unrecorded query blocks are left out."""
    chosen = _selected_layers(result, layers)
    rows, cols = _grid_shape(len(chosen))
    labels = result.block_labels()
    num_keys = max(len(result.key_labels(layer)) for layer in chosen)
    fig, axes = _figure(rows, cols, (0.42 * num_keys + 2.0, 0.36 * len(labels) + 1.6))
    image = None
    for ax, layer in zip(axes, chosen):
        qblocks = result.query_blocks(layer)
        mass = result.block_mass(layer, head)[qblocks].numpy()
        image = ax.imshow(mass, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(mass.shape[1]), result.key_labels(layer), rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(qblocks)), [labels[b] for b in qblocks], fontsize=7)
        ax.set_title(f"layer {layer}" + ("" if head is None else f", head {head}"), fontsize=9)
        if annotate and mass.size <= 400:
            for (i, j), value in _cells(mass):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5, color="white" if value < 0.6 else "black")
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(chosen)], shrink=0.8, label="attention mass")
    fig.suptitle(f"block attention mass ({result.layout.description.get('name', '?')}, query block -> key block)", fontsize=10)
    return _save(fig, path)


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
        ax.set_xticks(result.layers)
        ax.set_xlim(min(result.layers) - 0.5, max(result.layers) + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"locality vs depth ({layout.description.get('name', '?')})", fontsize=10)
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
    for ax in axes[len(available) :]:
        ax.set_visible(False)
    who = "mean over heads" if head is None else f"head {head}"
    fig.suptitle(f"attention maps ({layout.description.get('name', '?')}, {who}; rows: queries, columns: keys)", fontsize=10)
    return _save(fig, path)


def _block_ticks(set_ticks, starts: Sequence[int], sizes: Sequence[int], names: Sequence[str], rotation: int = 0) -> None:
    """Tick at each block's centre, labelled with the block's name (tiny blocks only when room)."""
    centres = [s + (n - 1) / 2 for s, n in zip(starts, sizes)]
    set_ticks(centres, list(names), fontsize=5, rotation=rotation)


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
