"""Block labels and the spatial geometry behind the locality statistics (pure functions of grids).

Coordinates: a token ``(i, j)`` of an ``(h, w)`` grid covers the cell ``[i, i+1) x [j, j+1)`` of that
grid; mapped onto an ``(H, W)`` grid its cell becomes ``[i*H/h, (i+1)*H/h) x [j*W/w, (j+1)*W/w)``
and its centre ``((i + 1/2) * H/h, (j + 1/2) * W/w)``. Source tokens ``(r, c)`` have centres
``(r + 1/2, c + 1/2)``. All comparisons are done in exact integer arithmetic (scaled by ``2h``/``2w``)
so that boundary cases do not depend on float rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from conditioning.base import KVExtension, LayerVisibility, SequenceLayout
from varedit_lab.model.layout import Grid


def _grid_str(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def _dedupe(labels: list[str]) -> list[str]:
    """Make labels unique (schedules may repeat a grid) by suffixing ``#n`` to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label if n == 0 else f"{label}#{n}")
    return out


def block_grid(layout: SequenceLayout, block: int) -> Grid:
    """Token grid of sequence block ``block`` (a source block or a target scale)."""
    nsb = layout.num_source_blocks
    return layout.source_grids[block] if block < nsb else layout.schedule.grids[block - nsb]


def block_labels(layout: SequenceLayout) -> list[str]:
    """``src@HxW`` per source block, ``sos`` for target scale 0, ``tgt{s}@HxW`` for scale s >= 1."""
    labels = [f"src@{_grid_str(g)}" for g in layout.source_grids]
    for s, grid in enumerate(layout.schedule.grids):
        labels.append("sos" if s == 0 else f"tgt{s}@{_grid_str(grid)}")
    return _dedupe(labels)


def extension_grid(extension: KVExtension, index: int) -> Grid | None:
    """Grid of extra key block ``index`` when the extension exposes one (SAR's pooled reference
    exposes ``target_grids``); None for extensions without spatial structure."""
    grids = getattr(extension, "grids", None) or getattr(extension, "target_grids", None)
    return tuple(grids[index]) if grids is not None else None


def key_labels(layout: SequenceLayout, vis: LayerVisibility) -> list[str]:
    """Labels of a layer's key blocks: the sequence blocks, then ``ref@HxW`` per extra block."""
    labels = block_labels(layout)
    if vis.extension is not None:
        for j in range(len(vis.extension.block_sizes)):
            grid = extension_grid(vis.extension, j)
            labels.append(f"ref@{_grid_str(grid)}" if grid is not None else f"ext{j}")
    return _dedupe(labels)


def key_grid(layout: SequenceLayout, vis: LayerVisibility, key_block: int) -> Grid | None:
    """Grid of a key block (sequence or extra), None if unknown."""
    if key_block < layout.num_blocks:
        return block_grid(layout, key_block)
    return extension_grid(vis.extension, key_block - layout.num_blocks)


def is_source_derived(layout: SequenceLayout, vis: LayerVisibility, key_block: int) -> bool:
    """Source blocks and extra blocks computed only from source blocks (SAR's reference)."""
    if key_block < layout.num_blocks:
        return key_block < layout.num_source_blocks
    derived = vis.extension.source_blocks(key_block - layout.num_blocks)
    return all(b < layout.num_source_blocks for b in derived)


def finest_source_block(layout: SequenceLayout) -> int | None:
    """The source block with the most tokens (the last one on ties); None without a source."""
    if layout.num_source_blocks == 0:
        return None
    areas = [h * w for h, w in layout.source_grids]
    return max(range(len(areas)), key=lambda b: (areas[b], b))


@lru_cache(maxsize=256)
def locality_window(query_grid: Grid, source_grid: Grid, radius: float) -> torch.Tensor:
    """(n_q, S) bool: source tokens whose centre lies within Chebyshev distance ``radius`` (in source
    tokens) of the query's centre mapped onto the source grid. ``radius >= 0.5`` always includes
    the source token that contains the mapped centre."""
    (h, w), (sh, sw) = query_grid, source_grid
    # |(r + 1/2) - (i + 1/2) * sh / h| <= radius  <=>  |(2r + 1) * h - (2i + 1) * sh| <= 2 * radius * h
    dr = ((2 * torch.arange(sh) + 1)[None, :] * h - (2 * torch.arange(h) + 1)[:, None] * sh).abs()  # (h, sh)
    dc = ((2 * torch.arange(sw) + 1)[None, :] * w - (2 * torch.arange(w) + 1)[:, None] * sw).abs()  # (w, sw)
    rows = dr <= 2 * radius * h
    cols = dc <= 2 * radius * w
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, sh * sw)


def _aligned_1d(n: int, m: int) -> torch.Tensor:
    """(n, m) bool: source index r is aligned with query index i when its centre lies in the
    query's cell mapped onto the source axis; when none does (source coarser than the query), the
    source cell containing the query's mapped centre."""
    i = torch.arange(n)[:, None]
    r = torch.arange(m)[None, :]
    # i * m / n <= r + 1/2 < (i + 1) * m / n  <=>  2 i m <= (2r + 1) n < 2 (i + 1) m
    inside = (2 * i * m <= (2 * r + 1) * n) & ((2 * r + 1) * n < 2 * (i + 1) * m)
    containing = r == ((2 * i + 1) * m) // (2 * n)  # floor((i + 1/2) * m / n)
    return torch.where(inside.any(dim=1, keepdim=True), inside, containing)


@lru_cache(maxsize=256)
def aligned_tokens(query_grid: Grid, source_grid: Grid) -> torch.Tensor:
    """(n_q, S) bool: the source tokens spatially aligned with each query token (see ``_aligned_1d``)."""
    (h, w), (sh, sw) = query_grid, source_grid
    rows, cols = _aligned_1d(h, sh), _aligned_1d(w, sw)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, sh * sw)


def uniform_locality(query_grid: Grid, source_grid: Grid, radius: float) -> float:
    """Locality of uniform attention over the source block: mean window size / S (the baseline)."""
    window = locality_window(query_grid, source_grid, radius)
    return float(window.float().mean())
