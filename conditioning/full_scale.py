"""Full-scale conditioning: the source enters at every scale (sequence length 2T).

Not in the release; this implements the definition chosen in ``reference-model.md`` section 9:

* Source block s is the continuous source latent area-resized to scale s's grid (so its finest
  block equals the max-scale prefix exactly; strategies differ only in what is visible).
* Layout ``[src_0 .. src_{K-1} | SOS | tgt_1 .. tgt_{K-1}]``.
* Visibility (``visibility: coarser``, default; the release's unused ``var_edit_block`` mask):
  target scale s sees source scales <= s and target scales <= s; source scale s sees source
  scales <= s. ``visibility: all`` is the literal Eq. 4: every target scale sees every source scale,
  and source scales see each other bidirectionally.
* Level embedding: source scale s gets ``lvl_embed[s]`` (``source_levels: finest`` gives all of
  them ``lvl_embed[K-1]``).
* RoPE: ``paper``: source scale s sits at the star positions of scale s + (64, 64).
  ``reference_compat``: the release's contiguous table slice, extended literally: the source blocks
  read rows [0, T) in sequence order and the target rows [T, 2T) (see ``source_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conditioning.base import (
    ConditioningStrategy,
    LayerVisibility,
    SequenceLayout,
    source_positions,
    target_levels,
    target_positions,
)
from varedit_lab.model.layout import Grid, ScaleSchedule

VISIBILITY_CHOICES = ("coarser", "all")
SOURCE_LEVEL_CHOICES = ("per_scale", "finest")


@dataclass
class FullScaleOptions:
    visibility: str = "coarser"  # coarser | all
    source_levels: str = "per_scale"  # per_scale | finest

    def __post_init__(self):
        if self.visibility not in VISIBILITY_CHOICES:
            raise ValueError(f"full_scale.visibility={self.visibility!r}; valid choices: {list(VISIBILITY_CHOICES)}")
        if self.source_levels not in SOURCE_LEVEL_CHOICES:
            raise ValueError(f"full_scale.source_levels={self.source_levels!r}; valid choices: {list(SOURCE_LEVEL_CHOICES)}")


class FullScale(ConditioningStrategy):
    name = "full_scale"
    Options = FullScaleOptions

    def source_grids(self, schedule: ScaleSchedule) -> tuple[Grid, ...]:
        return schedule.grids

    def visibility(self, k: int) -> torch.Tensor:
        vis = torch.zeros(2 * k, 2 * k, dtype=torch.bool)
        idx = torch.arange(k)
        coarser_or_same = idx[:, None] >= idx[None, :]
        vis[k:, k:] = coarser_or_same  # target s sees target <= s
        if self.options.visibility == "coarser":
            vis[:k, :k] = coarser_or_same  # source s sees source <= s
            vis[k:, :k] = coarser_or_same  # target s sees source <= s
        else:
            vis[:k, :k] = True
            vis[k:, :k] = True
        return vis

    def build_layout(self, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
        k = schedule.num_scales
        grids = self.source_grids(schedule)
        if self.options.source_levels == "per_scale":
            src_levels = schedule.scale_ids()
        else:
            src_levels = torch.full((schedule.total,), k - 1)
        levels = torch.cat([src_levels, target_levels(schedule)])
        positions = torch.cat([source_positions(grids, rope_layout), target_positions(schedule, schedule.total, rope_layout)])
        return SequenceLayout(schedule, grids, levels, positions, LayerVisibility(self.visibility(k)), description=self.describe())
