"""Max-scale ("finest-scale") conditioning: only the finest source scale enters the sequence.

Source tokens: the continuous finest-scale source latent (S = h_K * w_K tokens), level embedding of
the finest target scale, RoPE at the source positions. Every layer uses the block-causal mask:
sources see the source; target scale s sees the whole source and target scales <= s.
"""

from __future__ import annotations

import torch

from conditioning.base import (
    ConditioningStrategy,
    LayerVisibility,
    SequenceLayout,
    block_causal,
    source_positions,
    target_levels,
    target_positions,
)
from varedit_lab.model.layout import Grid, ScaleSchedule


class MaxScale(ConditioningStrategy):
    name = "max_scale"

    def source_grids(self, schedule: ScaleSchedule) -> tuple[Grid, ...]:
        return (schedule.finest,)

    def build_layout(self, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
        grids = self.source_grids(schedule)
        num_src = schedule.finest_size
        levels = torch.cat([torch.full((num_src,), schedule.num_scales - 1), target_levels(schedule)])
        positions = torch.cat([source_positions(grids, rope_layout), target_positions(schedule, num_src, rope_layout)])
        visibility = LayerVisibility(block_causal(1, 1 + schedule.num_scales))
        return SequenceLayout(schedule, grids, levels, positions, visibility, description=self.describe())
