"""Scale schedules, token counts and RoPE positions of the multi-scale token sequence.

Everything here is a pure function of the schedule (no parameters), shared by the model, the
tokenizer and the conditioning strategies. Grids are ``(h, w)`` token grids, coarse to fine; the
sequence is always flattened row-major within a scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]

# Square (1:1) schedules of the release, keyed by their Infinity `pn` name (stride 16 px per token).
PN_SCALES: dict[str, tuple[int, ...]] = {
    "0.06M": (1, 2, 4, 6, 8, 12, 16),
    "0.25M": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32),
    "0.60M": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48),
    "1M": (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64),
}
IMAGE_SIZE_TO_PN = {256: "0.06M", 512: "0.25M", 768: "0.60M", 1024: "1M"}

# RoPE: positions live on a 2x(64+64) grid. Target scales sit at "star" positions scaled to the
# 64-wide finest grid of the 1M schedule; the source is offset by (64, 64).
ROPE_GRID = 64
SOURCE_OFFSET = (64, 64)
NUM_LEVELS = 15  # rows of lvl_embed in the released models


@dataclass(frozen=True)
class ScaleSchedule:
    """Token grids of the target scales, coarse to fine."""

    grids: tuple[Grid, ...]

    @classmethod
    def from_scales(cls, scales: Sequence[int] | Sequence[Sequence[int]] | str) -> "ScaleSchedule":
        """From side lengths ``[1, 2, 4]``, ``(h, w)`` pairs, Infinity ``(t, h, w)`` triples or a pn name."""
        if isinstance(scales, str):
            if scales not in PN_SCALES:
                raise ValueError(f"unknown schedule {scales!r}; known: {sorted(PN_SCALES)}")
            scales = PN_SCALES[scales]
        grids: list[Grid] = []
        for s in scales:
            if isinstance(s, int):
                grids.append((s, s))
            else:
                s = tuple(int(v) for v in s)
                grids.append(s[-2:])  # (t, h, w) -> (h, w)
        if not grids:
            raise ValueError("a scale schedule needs at least one scale")
        for a, b in zip(grids, grids[1:]):
            if b[0] < a[0] or b[1] < a[1]:
                raise ValueError(f"scales must grow coarse to fine, got {grids}")
        return cls(tuple(grids))

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @property
    def total(self) -> int:
        """T: tokens of all target scales."""
        return sum(self.sizes)

    @property
    def finest(self) -> Grid:
        return self.grids[-1]

    @property
    def finest_size(self) -> int:
        """S: tokens of the finest scale (the max-scale / SAR source length)."""
        return self.sizes[-1]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale within the target tokens."""
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    def vae_grids(self, patchify: bool) -> tuple[Grid, ...]:
        """VAE latent grids: twice the token grid with 2x2 spatial patchify (8B tokenizer)."""
        return tuple((2 * h, 2 * w) for h, w in self.grids) if patchify else self.grids

    def scale_ids(self) -> torch.Tensor:
        """Scale index of every target token, shape (T,)."""
        return torch.repeat_interleave(torch.arange(self.num_scales), torch.tensor(self.sizes))

    def token_weights(self) -> torch.Tensor:
        """The reference's per-token loss weights: sqrt(S / n_s), normalised to sum 1 (float64)."""
        per_scale = torch.tensor([(self.finest_size / n) ** 0.5 for n in self.sizes], dtype=torch.float64)
        w = torch.repeat_interleave(per_scale, torch.tensor(self.sizes))
        return w / w.sum()


def star_positions(grid: Grid) -> torch.Tensor:
    """(row, col) of each token of ``grid`` on the 64-grid: ``round(i * 64 / h)`` (as the code rounds).

    Computed in float32 exactly as the reference table builder does, then rounded half-to-even.
    """
    h, w = grid
    rows = (torch.arange(h) * (ROPE_GRID / h)).round().long()
    cols = (torch.arange(w) * (ROPE_GRID / w)).round().long()
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def offset_positions(positions: torch.Tensor, offset: tuple[int, int] = SOURCE_OFFSET) -> torch.Tensor:
    return positions + torch.tensor(offset, dtype=positions.dtype)


@torch.no_grad()
def reference_rope_positions(num_tokens: int) -> torch.Tensor:
    """Rows ``[0, num_tokens)`` of the released RoPE table, built from the 1M schedule.

    The table holds the 64x64 source at (64 + r, 64 + c), then the 1M target scales at their star
    positions. Any schedule reads it as one contiguous slice, so at 256 and 512 px every token lands
    on a row-major strip of the source tile (reference-model.md section 7.3).
    """
    finest = PN_SCALES["1M"][-1]
    src = offset_positions(star_positions((finest, finest)))
    tgt = torch.cat([star_positions((s, s)) for s in PN_SCALES["1M"]])
    table = torch.cat([src, tgt])
    if num_tokens > len(table):
        raise ValueError(
            f"reference_compat RoPE covers {len(table)} tokens (the 1M max-scale sequence); "
            f"this sequence has {num_tokens}. Use model.rope_layout=paper."
        )
    return table[:num_tokens]


def latent_to_tokens(latent: torch.Tensor, vae_grid: Grid, patchify: bool) -> torch.Tensor:
    """Continuous latent (B, d, H, W) -> tokens (B, h*w, d') on ``vae_grid``.

    Area-resized to ``vae_grid`` (a no-op when it already matches), 2x2 ``pixel_unshuffle`` when
    patchifying (channel order c*4 + 2i + j), flattened row-major.
    """
    if tuple(latent.shape[-2:]) != tuple(vae_grid):
        latent = F.interpolate(latent, size=vae_grid, mode="area")
    if patchify:
        latent = F.pixel_unshuffle(latent, 2)
    return latent.flatten(2).transpose(1, 2)


def tokens_to_latent(tokens: torch.Tensor, grid: Grid, patchify: bool) -> torch.Tensor:
    """Inverse of :func:`latent_to_tokens` (without the resize): (B, h*w, d') -> (B, d, H, W)."""
    b, n, c = tokens.shape
    h, w = grid
    latent = tokens.transpose(1, 2).reshape(b, c, h, w)
    return F.pixel_shuffle(latent, 2) if patchify else latent
