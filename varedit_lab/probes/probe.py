"""The attention probe: a context manager that routes chosen layers through the eager path.

Attaching sets ``SelfAttention.probe`` (the model's named hook point) on the chosen layers; exiting
restores ``None`` even when the body raises. Layers not probed keep the fast path, and a model with
no probe attached pays one attribute read per layer.

Probes are diagnostics: they run under ``torch.no_grad()`` on fixed batches, never inside a training
step (a probed layer raises when autograd is on, which also rules out the double recording of
activation checkpointing). ``torch.no_grad`` rather than ``inference_mode`` on purpose: the model
caches RoPE tables created during a forward, and inference tensors in that cache would break the next
training step.

``torch.compile``: probing runs on the uncompiled module. :func:`probe_model` unwraps
``OptimizedModule._orig_mod``; the hook itself is excluded from compilation
(``torch.compiler.disable``), so a probe attached while calling a compiled model still runs eagerly
(at the price of a recompile for the changed attribute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from conditioning.base import ConditioningPlan, SequenceLayout
from varedit_lab.model.attention import AttentionContext
from varedit_lab.model.blocks import SelfAttention
from varedit_lab.model.transformer import TextFeatures
from varedit_lab.probes import geometry
from varedit_lab.probes.eager import DEFAULT_CHUNK_BYTES, eager_self_attention
from varedit_lab.probes.stats import BlockStats, FullMap, ProbeResult, key_column_starts, model_config_dict

DEFAULT_MAP_BYTES = 64 << 20


class ProbeBudgetError(RuntimeError):
    """The requested full attention maps exceed the probe's byte budget."""


@dataclass(frozen=True)
class MapRequest:
    """A full attention map to keep (mean over samples, float32 on CPU).

    ``head``: a head index, or None for the mean over the probe's selected heads (as in the paper).
    ``query``: a target scale index (0 = SOS), a block label (``"src@4x4"``, ``"tgt2@4x4"``), or
    None for every query block (the paper's whole-sequence map).
    """

    layer: int
    head: int | None = None
    query: int | str | None = None


def resolve_query_blocks(layout: SequenceLayout, query: int | str | None) -> tuple[int, ...]:
    """Sequence blocks named by a :class:`MapRequest` query."""
    if query is None:
        return tuple(range(layout.num_blocks))
    if isinstance(query, int):
        if not 0 <= query < layout.schedule.num_scales:
            raise ValueError(f"target scale {query} out of range [0, {layout.schedule.num_scales})")
        return (layout.target_block(query),)
    labels = geometry.block_labels(layout)
    if query not in labels:
        raise ValueError(f"unknown query block {query!r}; blocks: {labels}")
    return (labels.index(query),)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile`` (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


class AttentionProbe:
    """Record reduced attention statistics of chosen layers (and heads) while attached.

    >>> with torch.no_grad(), AttentionProbe(model, layers=[0, -1]) as probe:
    ...     model(plan, teacher_inputs, text)
    >>> probe.result.block_mass(0)

    ``layers``: layer indices (negative counts from the end), None for all. ``heads``: head indices
    recorded (all heads are still computed), None for all. ``maps``: full maps to keep, bounded by
    ``max_map_bytes`` (:class:`ProbeBudgetError` when exceeded, before anything is allocated).
    ``radius``: the locality radius in source tokens (>= 0.5). ``result``: a result to keep
    accumulating into (several batches, several probe sessions).

    Every forward adds its samples to the running means of the (layer, query block) keys it
    computes. In ``generate`` with CFG both branches count as samples; with ``use_cache=False``
    each scale re-runs the prefix, so earlier blocks are counted once per scale (same means).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        *,
        maps: Sequence[MapRequest] = (),
        radius: float = 1.0,
        max_map_bytes: int = DEFAULT_MAP_BYTES,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        result: ProbeResult | None = None,
    ):
        if radius < 0.5:
            raise ValueError(f"radius={radius}: must be >= 0.5 source tokens (the query's own source cell)")
        self.model = unwrap_compiled(model)
        self.modules = self._find_modules(self.model)
        self.layers = self._resolve_layers(layers)
        num_heads = self.modules[self.layers[0]].num_heads
        self.heads = self._resolve_heads(heads, num_heads)
        depth = max(self.modules) + 1
        self.maps = tuple(dataclasses.replace(r, layer=r.layer + depth) if r.layer < 0 else r for r in maps)
        for req in self.maps:
            if req.layer not in self.layers:
                raise ValueError(f"map requested for layer {req.layer}, which is not probed (layers {self.layers})")
            if req.head is not None and req.head not in self.heads:
                raise ValueError(f"map requested for head {req.head}, which is not probed (heads {list(self.heads)})")
        self.max_map_bytes = max_map_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.result = result if result is not None else ProbeResult(heads=self.heads, radius=radius)
        if self.result.heads is not None and tuple(self.result.heads) != self.heads:
            raise ValueError(f"result holds heads {self.result.heads}, the probe selects {self.heads}")
        if self.result.radius != radius:
            raise ValueError(f"result uses radius {self.result.radius}, the probe {radius}")
        self.result.heads = self.heads
        self.result.model_config = model_config_dict(self.model)
        self._attached: list[SelfAttention] = []
        self._budget_checked = False

    # -- setup --------------------------------------------------------------------------------------
    @staticmethod
    def _find_modules(model: nn.Module) -> dict[int, SelfAttention]:
        modules = {m.layer_index: m for m in model.modules() if isinstance(m, SelfAttention)}
        if not modules:
            raise ValueError(f"{type(model).__name__} has no SelfAttention layers to probe")
        return modules

    def _resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        depth = max(self.modules) + 1
        if layers is None:
            return sorted(self.modules)
        resolved = []
        for layer in layers:
            index = layer + depth if layer < 0 else layer
            if index not in self.modules:
                raise ValueError(f"layer {layer} out of range for depth {depth}")
            resolved.append(index)
        return sorted(set(resolved))

    @staticmethod
    def _resolve_heads(heads: Sequence[int] | None, num_heads: int) -> tuple[int, ...]:
        if heads is None:
            return tuple(range(num_heads))
        bad = [h for h in heads if not 0 <= h < num_heads]
        if bad or not heads:
            raise ValueError(f"heads {list(heads)}: need a non-empty subset of 0..{num_heads - 1}")
        return tuple(sorted(set(heads)))

    def map_bytes(self, layout: SequenceLayout) -> int:
        """Bytes the requested full maps take for ``layout`` (float32 sums + per-row counts)."""
        total = 0
        for req in self.maps:
            rows = sum(layout.block_sizes[b] for b in resolve_query_blocks(layout, req.query))
            cols = sum(layout.key_block_sizes(layout.visibility(req.layer)))
            total += 4 * rows * (cols + 1)
        return total

    def check_budget(self, layout: SequenceLayout) -> None:
        """Raise :class:`ProbeBudgetError` if the requested maps do not fit ``max_map_bytes``."""
        need = self.map_bytes(layout)
        if need > self.max_map_bytes:
            raise ProbeBudgetError(
                f"requested full maps need {need / 2**20:.1f} MiB for a {layout.length}-token sequence; "
                f"the budget is {self.max_map_bytes / 2**20:.1f} MiB. Request fewer maps (one layer, head "
                "and query scale) or raise max_map_bytes."
            )

    # -- context manager ----------------------------------------------------------------------------
    def __enter__(self) -> "AttentionProbe":
        if self._attached:
            raise RuntimeError("this probe is already attached")
        busy = [layer for layer in self.layers if self.modules[layer].probe is not None]
        if busy:
            raise RuntimeError(f"layers {busy} already have a probe attached; probes do not nest")
        for layer in self.layers:
            self.modules[layer].probe = _LayerHook(self, layer)
            self._attached.append(self.modules[layer])
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def detach(self) -> None:
        """Restore the fast path on every layer this probe attached to (idempotent)."""
        while self._attached:
            self._attached.pop().probe = None

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    # -- recording ----------------------------------------------------------------------------------
    def record(self, layer: int, layout: SequenceLayout, num_heads: int, block: int, row0: int, probs: torch.Tensor, key_blocks: tuple[int, ...]) -> None:
        """Add the weights ``probs`` (B, H, n, K_visible) of rows ``row0..row0+n`` of ``block``."""
        self.result.bind(layout, num_heads)
        if not self._budget_checked:  # the layout is known only now (e.g. inside generate)
            self.check_budget(layout)
            self._budget_checked = True
        selected = probs if len(self.heads) == num_heads else probs[:, list(self.heads)]
        self.result.add_block(layer, block, self._block_stats(layout, layer, block, row0, selected, key_blocks))
        for req in self.maps:
            if req.layer == layer:
                self._add_to_map(req, layout, block, row0, probs, selected, key_blocks)

    def _block_stats(self, layout: SequenceLayout, layer: int, block: int, row0: int, p: torch.Tensor, key_blocks: tuple[int, ...]) -> BlockStats:
        vis = layout.visibility(layer)
        all_sizes = layout.key_block_sizes(vis)
        sizes = [all_sizes[kb] for kb in key_blocks]
        b, hs, n, _ = p.shape
        pieces = p.split(sizes, dim=-1)
        mass = torch.zeros(hs, len(all_sizes), dtype=torch.float64)
        mass[:, list(key_blocks)] = torch.stack([c.sum(-1) for c in pieces], dim=-1).sum((0, 2)).double().cpu()
        entropy = torch.special.entr(p).sum(-1).sum((0, 2)).double().cpu()
        stats = BlockStats(key_blocks, mass, entropy, rows=b * n, samples=b if row0 == 0 else 0)
        src = geometry.finest_source_block(layout)
        if block >= layout.num_source_blocks and src is not None and src in key_blocks:
            p_src = pieces[key_blocks.index(src)]
            stats.locality, stats.diagonality = self._locality(layout, block, row0, src, p_src)
        return stats

    def _locality(self, layout: SequenceLayout, block: int, row0: int, src: int, p_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums over (samples x queries) of locality and diagonality (definitions in ``stats``)."""
        qgrid, sgrid = geometry.block_grid(layout, block), layout.source_grids[src]
        n = p_src.shape[2]
        window = geometry.locality_window(qgrid, sgrid, self.result.radius)[row0 : row0 + n].to(p_src)
        aligned = geometry.aligned_tokens(qgrid, sgrid)[row0 : row0 + n].to(p_src)
        on_source = p_src.sum(-1).clamp_min(torch.finfo(p_src.dtype).tiny)
        local = torch.einsum("bhns,ns->bhn", p_src, window) / on_source
        uniform_aligned = aligned.sum(-1) / aligned.shape[-1]
        diag = torch.einsum("bhns,ns->bhn", p_src, aligned) / on_source / uniform_aligned
        return local.sum((0, 2)).double().cpu(), diag.sum((0, 2)).double().cpu()

    def _add_to_map(self, req: MapRequest, layout: SequenceLayout, block: int, row0: int, probs: torch.Tensor, selected: torch.Tensor, key_blocks: tuple[int, ...]) -> None:
        blocks = resolve_query_blocks(layout, req.query)
        if block not in blocks:
            return
        vis = layout.visibility(req.layer)
        key = (req.layer, req.head, blocks)
        fmap = self.result.maps.get(key)
        if fmap is None:
            offsets, acc = {}, 0
            for b in blocks:
                offsets[b] = acc
                acc += layout.block_sizes[b]
            cols = sum(layout.key_block_sizes(vis))
            fmap = FullMap(req.layer, req.head, blocks, offsets, torch.zeros(acc, cols), torch.zeros(acc))
            self.result.maps[key] = fmap
        rows = selected.mean(1) if req.head is None else probs[:, req.head]  # (B, n, K_visible)
        starts, sizes = key_column_starts(layout, vis), layout.key_block_sizes(vis)
        cols = torch.cat([torch.arange(starts[kb], starts[kb] + sizes[kb]) for kb in key_blocks])
        r = fmap.row_offsets[block] + row0
        n = rows.shape[1]
        fmap.total[r : r + n, cols] += rows.sum(0).float().cpu()
        fmap.counts[r : r + n] += rows.shape[0]


class _LayerHook:
    """The callable set as ``SelfAttention.probe`` for one layer."""

    def __init__(self, probe: AttentionProbe, layer: int):
        self.probe, self.layer = probe, layer

    @torch.compiler.disable
    def __call__(self, module: SelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("attention probes run under torch.no_grad() on fixed batches, never inside a training step")
        num_heads = q.shape[1]

        def observe(block: int, row0: int, probs: torch.Tensor, key_blocks: tuple[int, ...]) -> None:
            self.probe.record(self.layer, ctx.layout, num_heads, block, row0, probs, key_blocks)

        return eager_self_attention(q, k, v, module.layer_index, ctx, observe, self.probe.max_chunk_bytes)


def probe_model(
    model: nn.Module,
    plan: ConditioningPlan,
    teacher_inputs: torch.Tensor,
    text: TextFeatures,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    *,
    maps: Sequence[MapRequest] = (),
    radius: float = 1.0,
    max_map_bytes: int = DEFAULT_MAP_BYTES,
    result: ProbeResult | None = None,
) -> ProbeResult:
    """Run the teacher-forced forward of one batch under a probe (no-grad, eval mode, then the
    previous mode is restored) and return the statistics. Pass ``result`` to accumulate batches.

    A ``torch.compile``d model is probed through its uncompiled module."""
    base = unwrap_compiled(model)
    probe = AttentionProbe(base, layers, heads, maps=maps, radius=radius, max_map_bytes=max_map_bytes, result=result)
    probe.check_budget(plan.layout)  # fail before the forward
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), probe:
            base(plan, teacher_inputs, text)
    finally:
        base.train(was_training)
    return probe.result
