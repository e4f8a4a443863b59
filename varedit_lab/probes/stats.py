"""Reduced attention statistics: running sums keyed by (layer, query block), read out as means.

Every statistic is first averaged over the query tokens of a block, then over samples. Because a
(layer, query block) always contributes all its query rows for each sample, both means are
``sum over (samples x queries) / rows``. Entries are keyed, never appended: running the same probe
over more batches refines the same numbers, and reading them out never changes them.

Definitions (for one head; head means average the probe's selected heads):

* **block mass** ``M[q, k]``: mean over the queries of block q of the attention mass on key block k.
  Key blocks are the sequence blocks (sources ``src@HxW``, ``sos``, targets ``tgt{s}@HxW``) followed
  by the layer's extra blocks (SAR's pooled reference ``ref@HxW``). Invisible blocks get 0; every
  recorded row sums to 1.
* **entropy**: mean over queries of ``-sum_k p_k log p_k`` (nats); ``max_entropy`` is
  ``log(number of visible keys)`` (uniform attention).
* **locality** (target queries that see the finest source block): with ``p`` the weights on that
  block and ``W_q`` the source tokens within Chebyshev distance ``radius`` (source tokens) of the
  query's centre mapped onto the source grid (:func:`geometry.locality_window`),
  ``locality = sum_{W_q} p / sum p``. Uniform attention gives ``|W_q| / S`` (reported as ``uniform``).
* **diagonality** (same queries): with ``A_q`` the aligned source tokens (centres inside the query's
  cell mapped onto the source grid, :func:`geometry.aligned_tokens`),
  ``diagonality = (sum_{A_q} p / sum p) / (|A_q| / S)``: the lift of the mass on the aligned tokens
  over uniform attention. 1 means no spatial preference, ``S / |A_q|`` means all mass on the aligned
  tokens. Uninformative (always 1) when one query cell covers the whole source (the SOS scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conditioning.base import LayerVisibility, SequenceLayout
from varedit_lab.probes import geometry


@dataclass
class BlockStats:
    """Running sums of one (layer, query block) over (samples x queries), per selected head."""

    key_blocks: tuple[int, ...]  # visible key blocks of this query block
    mass: torch.Tensor  # (Hs, num key blocks of the layer) float64
    entropy: torch.Tensor  # (Hs,)
    locality: torch.Tensor | None = None  # (Hs,) when the finest source block is visible
    diagonality: torch.Tensor | None = None
    rows: int = 0  # sample x query rows accumulated
    samples: int = 0

    def add(self, other: "BlockStats") -> None:
        self.mass += other.mass
        self.entropy += other.entropy
        if self.locality is not None and other.locality is not None:
            self.locality += other.locality
            self.diagonality += other.diagonality
        self.rows += other.rows
        self.samples += other.samples


@dataclass
class FullMap:
    """Sum over samples of one (layer, head, query blocks) map; columns are the layer's key axis
    in sequence coordinates followed by the extra blocks (``SequenceLayout.token_mask`` order)."""

    layer: int
    head: int | None  # None: mean over the selected heads
    query_blocks: tuple[int, ...]
    row_offsets: dict[int, int]  # query block -> first row of the map
    total: torch.Tensor  # (rows, cols) float32
    counts: torch.Tensor  # (rows,) samples per row

    def mean(self) -> torch.Tensor:
        return self.total / self.counts.clamp_min(1)[:, None]


def layer_key_sizes(layout: SequenceLayout, vis: LayerVisibility) -> tuple[int, ...]:
    return layout.key_block_sizes(vis)


def key_column_starts(layout: SequenceLayout, vis: LayerVisibility) -> tuple[int, ...]:
    """First column of every key block on the layer's full key axis (sequence, then extras)."""
    starts, acc = [], 0
    for n in layer_key_sizes(layout, vis):
        starts.append(acc)
        acc += n
    return tuple(starts)


def _same_layout(a: SequenceLayout, b: SequenceLayout) -> bool:
    """Structural equality (layouts are cached per schedule, but a re-built one must match too)."""
    if a is b:
        return True
    if (a.block_sizes, a.source_grids, a.schedule, a.description) != (b.block_sizes, b.source_grids, b.schedule, b.description):
        return False
    if set(a.layer_visibility) != set(b.layer_visibility):
        return False
    pairs = [(a.default_visibility, b.default_visibility)] + [(a.layer_visibility[i], b.layer_visibility[i]) for i in a.layer_visibility]
    return all(torch.equal(x.visible, y.visible) for x, y in pairs)


@dataclass
class ProbeResult:
    """Statistics of one probe (one sequence layout), accumulated over every batch it saw."""

    heads: tuple[int, ...] | None = None  # selected heads (None until the first call resolves "all")
    radius: float = 1.0
    num_heads: int | None = None
    layout: SequenceLayout | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    blocks: dict[tuple[int, int], BlockStats] = field(default_factory=dict)
    maps: dict[tuple[int, int | None, tuple[int, ...]], FullMap] = field(default_factory=dict)

    # -- binding ------------------------------------------------------------------------------------
    def bind(self, layout: SequenceLayout, num_heads: int) -> None:
        """Attach the layout on the first call; one result describes one layout."""
        if self.layout is None:
            self.layout, self.num_heads = layout, num_heads
            if self.heads is None:
                self.heads = tuple(range(num_heads))
            return
        if not _same_layout(self.layout, layout):
            raise ValueError(
                "this probe result already holds statistics of another sequence layout "
                f"({self.layout.description}, {self.layout.schedule.grids}); use a new probe per layout"
            )
        if num_heads != self.num_heads:
            raise ValueError(f"layer has {num_heads} heads, the probe result {self.num_heads}")

    def _require_layout(self) -> SequenceLayout:
        if self.layout is None:
            raise ValueError("the probe has recorded nothing yet (run a forward inside the probe context)")
        return self.layout

    def add_block(self, layer: int, block: int, stats: BlockStats) -> None:
        key = (layer, block)
        if key in self.blocks:
            self.blocks[key].add(stats)
        else:
            self.blocks[key] = stats

    # -- read-out -----------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.blocks})

    def query_blocks(self, layer: int) -> list[int]:
        return sorted(block for lyr, block in self.blocks if lyr == layer)

    def block_labels(self) -> list[str]:
        return geometry.block_labels(self._require_layout())

    def key_labels(self, layer: int) -> list[str]:
        layout = self._require_layout()
        return geometry.key_labels(layout, layout.visibility(layer))

    def _head_index(self, head: int | None) -> int | None:
        if head is None:
            return None
        if head not in self.heads:
            raise KeyError(f"head {head} was not probed (probed heads: {list(self.heads)})")
        return self.heads.index(head)

    def _reduce(self, per_head: torch.Tensor, head: int | None) -> torch.Tensor:
        i = self._head_index(head)
        return per_head.mean(0) if i is None else per_head[i]

    def block_mass(self, layer: int, head: int | None = None) -> torch.Tensor:
        """(num blocks, num key blocks) float64; rows of unrecorded query blocks are NaN."""
        layout = self._require_layout()
        ncols = len(layout.key_block_sizes(layout.visibility(layer)))
        out = torch.full((layout.num_blocks, ncols), math.nan, dtype=torch.float64)
        for block in self.query_blocks(layer):
            st = self.blocks[(layer, block)]
            out[block] = self._reduce(st.mass / st.rows, head)
        return out

    def block_mass_std(self, layer: int) -> torch.Tensor:
        """Spread of the block mass over the selected heads (population std), NaN where unrecorded."""
        layout = self._require_layout()
        ncols = len(layout.key_block_sizes(layout.visibility(layer)))
        out = torch.full((layout.num_blocks, ncols), math.nan, dtype=torch.float64)
        for block in self.query_blocks(layer):
            st = self.blocks[(layer, block)]
            out[block] = (st.mass / st.rows).std(0, correction=0)
        return out

    def _per_block(self, layer: int, name: str, head: int | None) -> torch.Tensor:
        layout = self._require_layout()
        out = torch.full((layout.num_blocks,), math.nan, dtype=torch.float64)
        for block in self.query_blocks(layer):
            st = self.blocks[(layer, block)]
            value = getattr(st, name)
            if value is not None:
                out[block] = self._reduce(value / st.rows, head)
        return out

    def entropy(self, layer: int, head: int | None = None) -> torch.Tensor:
        """(num blocks,) mean attention entropy (nats) per query block; NaN where unrecorded."""
        return self._per_block(layer, "entropy", head)

    def max_entropy(self, layer: int) -> torch.Tensor:
        """(num blocks,) log(number of visible keys) per query block (uniform attention)."""
        layout = self._require_layout()
        vis = layout.visibility(layer)
        sizes = torch.tensor(layout.key_block_sizes(vis), dtype=torch.float64)
        return (vis.visible.double() @ sizes).log()

    def locality(self, layer: int, head: int | None = None) -> torch.Tensor:
        """(num blocks,) locality per query block; NaN where undefined or unrecorded."""
        return self._per_block(layer, "locality", head)

    def diagonality(self, layer: int, head: int | None = None) -> torch.Tensor:
        """(num blocks,) diagonality per query block; NaN where undefined or unrecorded."""
        return self._per_block(layer, "diagonality", head)

    def uniform_locality(self) -> torch.Tensor:
        """(num blocks,) the locality of uniform attention, per target query block (NaN elsewhere)."""
        layout = self._require_layout()
        out = torch.full((layout.num_blocks,), math.nan, dtype=torch.float64)
        src = geometry.finest_source_block(layout)
        if src is None:
            return out
        for block in range(layout.num_source_blocks, layout.num_blocks):
            out[block] = geometry.uniform_locality(geometry.block_grid(layout, block), layout.source_grids[src], self.radius)
        return out

    def source_mass(self, layer: int, head: int | None = None) -> dict[str, torch.Tensor]:
        """Per query block: mass on all source-derived key blocks (sources and pooled references),
        split into blocks whose grid is coarser than or equal to the query's and finer ones."""
        layout = self._require_layout()
        vis = layout.visibility(layer)
        mass = self.block_mass(layer, head)
        total = torch.zeros(layout.num_blocks, dtype=torch.float64)
        coarser = torch.zeros_like(total)
        for kb in range(mass.shape[1]):
            if not geometry.is_source_derived(layout, vis, kb):
                continue
            total += mass[:, kb]
            kgrid = geometry.key_grid(layout, vis, kb)
            for qb in range(layout.num_blocks):
                qgrid = geometry.block_grid(layout, qb)
                if kgrid is not None and kgrid[0] <= qgrid[0] and kgrid[1] <= qgrid[1]:
                    coarser[qb] += mass[qb, kb]
        return {"total": total, "coarser_or_same": coarser, "finer": total - coarser}

    def full_map(self, layer: int, head: int | None = None, query: int | str | None = None) -> torch.Tensor:
        """Mean over samples of a requested full map (see :class:`MapRequest`)."""
        from varedit_lab.probes.probe import resolve_query_blocks

        blocks = resolve_query_blocks(self._require_layout(), query)
        key = (layer, head, blocks)
        if key not in self.maps:
            raise KeyError(f"no full map for layer={layer} head={head} query={query!r}; request it with MapRequest")
        return self.maps[key].mean()

    def num_samples(self, layer: int) -> dict[int, int]:
        return {block: self.blocks[(layer, block)].samples for block in self.query_blocks(layer)}

    # -- export -------------------------------------------------------------------------------------
    def layout_description(self) -> dict[str, Any]:
        layout = self._require_layout()
        return {
            "schedule": [list(g) for g in layout.schedule.grids],
            "source_grids": [list(g) for g in layout.source_grids],
            "blocks": geometry.block_labels(layout),
            "block_sizes": list(layout.block_sizes),
            "length": layout.length,
            "num_source_blocks": layout.num_source_blocks,
            "finest_source_block": geometry.finest_source_block(layout),
        }

    def _layer_dict(self, layer: int) -> dict[str, Any]:
        labels = self.block_labels()
        qblocks = self.query_blocks(layer)
        qlabels = [labels[b] for b in qblocks]

        def rows(mat: torch.Tensor) -> list[list[float]]:
            return [[float(x) for x in mat[b]] for b in qblocks]

        def per_block(name: str) -> dict[str, Any]:
            mean = getattr(self, name)(layer)
            per_head = torch.stack([getattr(self, name)(layer, h) for h in self.heads], dim=1)
            keep = [b for b in qblocks if not math.isnan(float(mean[b]))]
            return {
                "mean": {labels[b]: float(mean[b]) for b in keep},
                "per_head": {labels[b]: [float(x) for x in per_head[b]] for b in keep},
            }

        layout = self._require_layout()
        vis = layout.visibility(layer)
        src_mass = self.source_mass(layer)
        out = {
            "key_blocks": self.key_labels(layer),
            "key_block_sizes": list(layout.key_block_sizes(vis)),
            "query_blocks": qlabels,
            "num_samples": {labels[b]: n for b, n in self.num_samples(layer).items()},
            "block_mass": {
                "mean": rows(self.block_mass(layer)),
                "std_over_heads": rows(self.block_mass_std(layer)),
                "per_head": {str(h): rows(self.block_mass(layer, h)) for h in self.heads},
            },
            "entropy": per_block("entropy"),
            "max_entropy": {labels[b]: float(self.max_entropy(layer)[b]) for b in qblocks},
            "locality": per_block("locality"),
            "diagonality": per_block("diagonality"),
            "source_mass": {labels[b]: {k: float(v[b]) for k, v in src_mass.items()} for b in qblocks},
        }
        uniform = self.uniform_locality()
        out["locality"]["uniform"] = {q: float(uniform[labels.index(q)]) for q in out["locality"]["mean"]}
        return out

    def to_dict(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON-serialisable statistics, with the layout, the strategy and the probe configuration."""
        layout = self._require_layout()
        return {
            "format_version": 1,
            "strategy": dict(layout.description),
            "layout": self.layout_description(),
            "config": {
                "layers": self.layers,
                "heads": list(self.heads),
                "num_heads": self.num_heads,
                "radius": self.radius,
                "model": dict(self.model_config),
                **(config or {}),
            },
            "layers": {str(layer): self._layer_dict(layer) for layer in self.layers},
            "maps": [
                {"layer": m.layer, "head": m.head, "query_blocks": [self.block_labels()[b] for b in m.query_blocks], "shape": list(m.total.shape)}
                for m in self.maps.values()
            ],
        }

    def save_json(self, path: str | Path, config: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(config), indent=1, allow_nan=False))
        return path

    def scalars(self, prefix: str = "probe") -> dict[str, float]:
        """Flat head-mean scalars for loggers: locality, diagonality, entropy and source mass per
        (layer, query block)."""
        labels = self.block_labels()
        out: dict[str, float] = {}
        for layer in self.layers:
            src = self.source_mass(layer)["total"]
            series = {"locality": self.locality(layer), "diagonality": self.diagonality(layer), "entropy": self.entropy(layer), "source_mass": src}
            for block in self.query_blocks(layer):
                for name, values in series.items():
                    value = float(values[block])
                    if not math.isnan(value):
                        out[f"{prefix}/layer{layer}/{name}/{labels[block]}"] = value
        return out


def model_config_dict(model: Any) -> dict[str, Any]:
    """The model's config as a plain dict (empty when it has none)."""
    cfg = getattr(model, "cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
