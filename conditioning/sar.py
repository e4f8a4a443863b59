"""SAR: max-scale plus a Scale-Aligned Reference in the first self-attention layer(s).

In a SAR layer, target scale s does not see the full-resolution source: it sees the source keys and
values area-pooled to its own grid (``pool_s``), plus target scales <= s. Sources still see the
source. Pooling happens after the q/k l2-normalisation and RoPE, on values after projection (with
``v_bias``), exactly where the release pools, so released weights give released numerics. Other
layers are max-scale layers. With ``layers=[]`` SAR is max-scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from conditioning.base import KVExtension, LayerVisibility, SequenceLayout, block_causal
from conditioning.max_scale import MaxScale
from varedit_lab.model.layout import Grid, ScaleSchedule


class PooledSourceReference(KVExtension):
    """Extra key/value block s = the source block's keys/values area-pooled to target grid s."""

    def __init__(self, source_grid: Grid, target_grids: Sequence[Grid]):
        self.source_grid = source_grid
        self.target_grids = tuple(target_grids)
        self.block_sizes = tuple(h * w for h, w in self.target_grids)

    def compute(self, index, keys, values):
        grid = self.target_grids[index]
        k, v = keys[0], values[0]
        if grid == self.source_grid:
            return k, v
        kv = torch.cat([k, v], dim=1)  # pool keys and values in one call: (B, 2H, S, D)
        b, h2, _, d = kv.shape
        img = kv.transpose(2, 3).reshape(b, h2 * d, *self.source_grid)
        pooled = F.adaptive_avg_pool2d(img, grid)  # == F.interpolate(mode="area")
        pooled = pooled.reshape(b, h2, d, -1).transpose(2, 3)
        return pooled.chunk(2, dim=1)

    def source_blocks(self, index):
        return (0,)


@dataclass
class SAROptions:
    layers: list[int] = field(default_factory=lambda: [0])  # layers that use the pooled reference


class SAR(MaxScale):
    name = "sar"
    Options = SAROptions

    def build_layout(self, schedule: ScaleSchedule, rope_layout: str) -> SequenceLayout:
        layout = super().build_layout(schedule, rope_layout)
        k = schedule.num_scales
        extension = PooledSourceReference(schedule.finest, schedule.grids)
        vis = torch.zeros(1 + k, 1 + k + k, dtype=torch.bool)
        vis[:, : 1 + k] = block_causal(1, 1 + k)
        vis[1:, 0] = False  # targets do not see the full-resolution source ...
        vis[1:, 1 + k :] = torch.eye(k, dtype=torch.bool)  # ... but its pooling to their own grid
        sar_layer = LayerVisibility(vis, extension)
        layout.layer_visibility = {layer: sar_layer for layer in self.options.layers}
        layout.description = self.describe()
        return layout
