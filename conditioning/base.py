"""The conditioning-strategy interface and the plan the model executes.

A strategy decides only (1) which source tokens enter the sequence, with their level ids and RoPE
positions, (2) who may attend to whom in each layer, and (3) optional extra key/value blocks a layer
derives from the sequence's own keys/values (SAR's pooled reference). It returns a
:class:`SequenceLayout` (data independent, cached per schedule) and the source tokens of a batch;
together they form a :class:`ConditioningPlan`. The model executes any plan and never branches on
the strategy.

Sequence order is always ``[source blocks | target scale 0 (SOS) | target scale 1 | ...]``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from varedit_lab.model.layout import (
    Grid,
    ScaleSchedule,
    latent_to_tokens,
    offset_positions,
    reference_rope_positions,
    star_positions,
)


class KVExtension(ABC):
    """Extra key/value blocks one layer computes from the keys/values of the sequence blocks.

    Extra block ``j`` is addressed as key block ``num_blocks + j`` in :class:`LayerVisibility`.
    ``compute`` receives per-block keys/values shaped (B, H, n_b, D) and must only read blocks that
    precede every query block that sees block ``j`` (so cached inference can compute it).
    """

    block_sizes: tuple[int, ...]

    @abstractmethod
    def compute(self, index: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of extra block ``index``, each (B, H, block_sizes[index], D)."""

    @abstractmethod
    def source_blocks(self, index: int) -> tuple[int, ...]:
        """The sequence blocks extra block ``index`` is computed from."""


@dataclass(frozen=True, eq=False)
class LayerVisibility:
    """Block-level attention visibility of one layer.

    ``visible[q, k]``: queries of block q see every key of block k (bidirectionally inside a block).
    Key blocks are the sequence blocks followed by the ``extension``'s extra blocks.
    """

    visible: torch.Tensor  # bool (num_blocks, num_blocks + num_extra)
    extension: KVExtension | None = None

    @property
    def num_extra(self) -> int:
        return 0 if self.extension is None else len(self.extension.block_sizes)


@dataclass(eq=False)
class SequenceLayout:
    """Everything about the sequence that does not depend on the batch."""

    schedule: ScaleSchedule
    source_grids: tuple[Grid, ...]  # token grid of each source block
    levels: torch.Tensor  # (L,) long: lvl_embed row of every token
    positions: torch.Tensor  # (L, 2) long: RoPE (row, col) of every token
    default_visibility: LayerVisibility
    layer_visibility: dict[int, LayerVisibility] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)  # recorded with results

    def __post_init__(self) -> None:
        self.block_sizes: tuple[int, ...] = tuple(h * w for h, w in self.source_grids) + self.schedule.sizes
        starts, acc = [], 0
        for n in self.block_sizes:
            starts.append(acc)
            acc += n
        self.block_starts: tuple[int, ...] = tuple(starts)
        self.length = acc
        assert self.levels.shape == (acc,) and self.positions.shape == (acc, 2), "levels/positions must cover the sequence"
        for vis in (self.default_visibility, *self.layer_visibility.values()):
            assert vis.visible.shape == (self.num_blocks, self.num_blocks + vis.num_extra), "visibility shape"

    @property
    def num_source_blocks(self) -> int:
        return len(self.source_grids)

    @property
    def num_blocks(self) -> int:
        return len(self.block_sizes)

    @property
    def num_source_tokens(self) -> int:
        return self.block_starts[self.num_source_blocks] if self.num_source_blocks < self.num_blocks else self.length

    def visibility(self, layer: int) -> LayerVisibility:
        return self.layer_visibility.get(layer, self.default_visibility)

    def block_range(self, block: int) -> tuple[int, int]:
        return self.block_starts[block], self.block_starts[block] + self.block_sizes[block]

    def target_block(self, scale: int) -> int:
        return self.num_source_blocks + scale

    def key_block_sizes(self, vis: LayerVisibility) -> tuple[int, ...]:
        return self.block_sizes + (vis.extension.block_sizes if vis.extension else ())

    def token_mask(self, layer: int) -> torch.Tensor:
        """Dense (L, L + extra tokens) bool mask of ``layer`` (True = attend), for tests and probes."""
        vis = self.visibility(layer)
        q_sizes = torch.tensor(self.block_sizes)
        k_sizes = torch.tensor(self.key_block_sizes(vis))
        rows = vis.visible.repeat_interleave(q_sizes, dim=0)
        return rows.repeat_interleave(k_sizes, dim=1)


@dataclass(eq=False)
class ConditioningPlan:
    """A layout plus the source tokens of one batch: what the model executes."""

    layout: SequenceLayout
    source_tokens: torch.Tensor  # (B, num_source_tokens, d')

    def repeat(self, times: int) -> "ConditioningPlan":
        """The same plan for a batch tiled ``times`` (the CFG branches keep the source)."""
        return ConditioningPlan(self.layout, self.source_tokens.repeat(times, 1, 1))


@dataclass
class NoOptions:
    """A strategy without options."""


def block_causal(num_source_blocks: int, num_blocks: int) -> torch.Tensor:
    """Target scale s sees every source block and target scales <= s; sources see all sources.

    (The "var" mask over ``[source] + schedule`` used by max-scale in every layer.)
    """
    vis = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    vis[:num_source_blocks, :num_source_blocks] = True
    for q in range(num_source_blocks, num_blocks):
        vis[q, : q + 1] = True
    return vis


class ConditioningStrategy(ABC):
    """Base class of all strategies. Subclasses set ``name`` and may declare an ``Options`` dataclass."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "ConditioningStrategy":
        """Build from a plain dict, type-checked against ``Options`` (unknown keys are named)."""
        known = sorted(f.name for f in dataclasses.fields(cls.Options))
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise KeyError(f"{cls.name}: unknown option(s) {unknown}; valid options: {known}")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls.Options), options or {})
        except ValidationError as err:
            raise TypeError(f"{cls.name}: option '{err.full_key}': {err.msg.splitlines()[0]}") from None
        return cls(OmegaConf.to_object(merged))

    # -- what a strategy defines -------------------------------------------------------------------
    @abstractmethod
    def source_grids(self, schedule: ScaleSchedule) -> tuple[Grid, ...]:
        """Token grid of each source block, in sequence order."""

    @abstractmethod
    def build_layout(self, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
        """The sequence layout for ``schedule`` (called once per schedule, then cached)."""

    # -- shared machinery ---------------------------------------------------------------------------
    def layout(self, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
        return _cached_layout(self, schedule, rope_layout)

    def source_tokens(self, source_latent: torch.Tensor, schedule: ScaleSchedule, patchify: bool) -> torch.Tensor:
        """Continuous source latent (B, d, H, W) -> source tokens (B, N_src, d'), block by block.

        Each source block is the latent area-resized to that block's grid (the finest block equals
        the released max-scale prefix exactly).
        """
        scale = 2 if patchify else 1
        blocks = [latent_to_tokens(source_latent, (h * scale, w * scale), patchify) for h, w in self.source_grids(schedule)]
        if not blocks:  # no source in the sequence (text_only): an empty block keeps batch size and width
            channels = source_latent.shape[1] * (4 if patchify else 1)
            return source_latent.new_zeros(source_latent.shape[0], 0, channels)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def plan(self, source_latent: torch.Tensor, schedule: ScaleSchedule, rope_layout: str, patchify: bool) -> ConditioningPlan:
        return ConditioningPlan(self.layout(schedule, rope_layout), self.source_tokens(source_latent, schedule, patchify))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.options)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


@lru_cache(maxsize=64)
def _cached_layout(strategy: ConditioningStrategy, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
    return strategy.build_layout(schedule, rope_layout)


# -- helpers for levels and positions ----------------------------------------------------------------
def target_levels(schedule: ScaleSchedule) -> torch.Tensor:
    return schedule.scale_ids()


def target_positions(schedule: ScaleSchedule, num_source_tokens: int, rope_layout: str) -> torch.Tensor:
    """RoPE positions of the target tokens following ``num_source_tokens`` source tokens."""
    if rope_layout == "reference_compat":
        return reference_rope_positions(num_source_tokens + schedule.total)[num_source_tokens:]
    if rope_layout == "paper":
        return torch.cat([star_positions(g) for g in schedule.grids])
    raise ValueError(f"unknown rope_layout {rope_layout!r}; valid: ['reference_compat', 'paper']")


def source_positions(grids: Sequence[Grid], rope_layout: str) -> torch.Tensor:
    """RoPE positions of source blocks: star positions of each block's grid + (64, 64) (paper layout),
    or the first rows of the released table (reference_compat).

    The release reads its table as one contiguous slice from row 0, whatever the sequence holds
    (reference-model.md section 7.3). Several source blocks (full-scale) extend that literally: they
    read rows ``[0, sum of block sizes)`` in sequence order, and the target follows them."""
    if rope_layout == "reference_compat":
        return reference_rope_positions(sum(h * w for h, w in grids))
    if rope_layout == "paper":
        return torch.cat([offset_positions(star_positions(g)) for g in grids])
    raise ValueError(f"unknown rope_layout {rope_layout!r}; valid: ['reference_compat', 'paper']")
