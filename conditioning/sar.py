"""SAR: max-scale plus a Scale-Aligned Reference in the first self-attention layer(s).

In a SAR layer, target scale s does not see the full-resolution source: it sees the source keys and
values area-pooled to its own grid (``pool_s``), plus target scales <= s. Sources still see the
source. Pooling happens after the q/k l2-normalisation and RoPE, on values after projection (with
``v_bias``), exactly where the release pools, so released weights give released numerics. Other
layers are max-scale layers. With ``layers=[]`` SAR is max-scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from conditioning.base import KVExtension, LayerVisibility, SequenceLayout, block_causal
from conditioning.max_scale import MaxScale
from varedit_lab.model.layout import Grid, ScaleSchedule


@lru_cache(maxsize=256)
def area_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 matrix of 1-D ``F.interpolate(mode="area")`` (= adaptive average
    pooling): output i averages inputs [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.float()


def area_pool(x: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """Area-pool (B, H, S, D) keys or values laid out on ``source`` to ``target`` -> (B, H, n, D).

    Area pooling is separable: one matmul pools rows, one pools columns. Both read (B, S, H*D)
    rows, and the model keeps keys/values as (B, H, S, D) views of (B, S, H, D) memory, so nothing
    is transposed or copied; the backward is two more matmuls. (Pooling each head as an image
    costs a transposed copy in and out plus an adaptive-pool backward: ~6x slower per SAR layer
    in a 256 px train step; equal to ``F.interpolate(mode="area")`` up to float rounding.)"""
    b, h, s, d = x.shape
    (hs, ws), (ht, wt) = source, target
    rows = torch.matmul(_pool_matrix(hs, ht, x), x.transpose(1, 2).reshape(b, hs, ws * h * d))  # (B, ht, ws*H*D)
    cols = torch.matmul(_pool_matrix(ws, wt, x), rows.view(b * ht, ws, h * d))  # (B*ht, wt, H*D)
    return cols.view(b, ht * wt, h, d).transpose(1, 2)


def _pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    return area_pool_matrix(n_in, n_out).to(device=like.device, dtype=like.dtype)


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
        return area_pool(k, self.source_grid, grid), area_pool(v, self.source_grid, grid)

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
