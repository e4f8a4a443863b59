"""Text-only: no source tokens at all, the lower bound of the ablation.

The sequence is the target alone (``[SOS | target scales]``, block-causal); the model must generate
the target from the instruction, never seeing the source image. Anything a strategy that *does*
see the source adds over this is what source conditioning buys.
"""

from __future__ import annotations

import torch

from conditioning.base import ConditioningStrategy, LayerVisibility, SequenceLayout, block_causal, target_levels, target_positions
from varedit_lab.model.layout import Grid, ScaleSchedule


class TextOnly(ConditioningStrategy):
    name = "text_only"

    def source_grids(self, schedule: ScaleSchedule) -> tuple[Grid, ...]:
        return ()

    def build_layout(self, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
        positions = target_positions(schedule, 0, rope_layout)
        visibility = LayerVisibility(block_causal(0, schedule.num_scales))
        return SequenceLayout(schedule, (), target_levels(schedule), positions, visibility, description=self.describe())
