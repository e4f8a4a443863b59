"""Multi-scale bitwise residual quantisation (BSQ), shared by the tokenizer and the transformer.

Binary spherical quantisation maps each l2-normalised latent vector to ``sign(z) / sqrt(d)``; the bit
label is ``z > 0``. A target latent is quantised coarse to fine on residuals; the teacher-forcing
input of scale s+1 is the accumulated codes resized to scale s+1. The resize modes differ by
direction exactly as in the release: residuals go down with ``area``, codes go up with trilinear
(= bilinear, ``align_corners=False``, on a single frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from varedit_lab.model.layout import Grid, ScaleSchedule, latent_to_tokens, tokens_to_latent


def resize_down(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(grid) else F.interpolate(x, size=grid, mode="area")


def resize_up(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


def bsq_quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a latent (B, d, h, w): returns straight-through codes (B, d, h, w) and bits (B, h, w, d).

    Codes are ``z_hat = sign(z)/sqrt(d)`` of the l2-normalised input in the straight-through form
    ``z + (z_hat - z).detach()`` (gradients flow to ``z``), as the release computes them.
    """
    d = z.shape[1]
    z = F.normalize(z.float(), dim=1)
    z_hat = torch.where(z > 0, 1.0, -1.0).to(z.dtype) * (1.0 / d**0.5)
    codes = z + (z_hat - z).detach()
    bits = (codes > 0).permute(0, 2, 3, 1).to(torch.uint8)
    return codes, bits


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits (B, h, w, d) in {0, 1} -> codes (B, d, h, w) of value +-1/sqrt(d) (unit vectors)."""
    d = bits.shape[-1]
    scale = 1.0 / d**0.5
    codes = bits.float() * (2 * scale) - scale
    return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)


def token_bits_to_codes(bits: torch.Tensor, grid: Grid, patchify: bool) -> torch.Tensor:
    """Transformer-token bits (B, h*w, d') -> VAE codes (B, d, H, W) (pixel_shuffle when patchified)."""
    latent_bits = tokens_to_latent(bits, grid, patchify)  # (B, d, H, W) of {0, 1}
    return bits_to_codes(latent_bits.permute(0, 2, 3, 1))


def bits_to_tokens(bits: torch.Tensor, patchify: bool) -> torch.Tensor:
    """VAE-grid bits (B, H, W, d) -> token bits (B, h*w, d') (pixel_unshuffle order c*4 + 2i + j)."""
    latent = bits.permute(0, 3, 1, 2)
    return latent_to_tokens(latent, tuple(latent.shape[-2:]), patchify)


@dataclass
class MultiScaleTokens:
    """A target latent quantised over a schedule."""

    bits: list[torch.Tensor]  # per scale, token space (B, n_s, d'), uint8
    teacher_inputs: torch.Tensor  # (B, T - n_0, d'): inputs of scales 1..K-1 (scale 0's is the SOS)
    summed_codes: torch.Tensor  # (B, d, H, W): decoder input of the quantised latent


def flip_bits(bits: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bitwise self-correction noise: flip each bit with probability ``prob`` (out of place)."""
    if prob <= 0:
        return bits
    flips = torch.rand(bits.shape, generator=generator, device=bits.device) < prob
    return torch.where(flips, 1 - bits, bits)


def multiscale_quantize(
    latent: torch.Tensor,
    schedule: ScaleSchedule,
    patchify: bool,
    flip_probs: Sequence[float] = (),
    generator: torch.Generator | None = None,
) -> MultiScaleTokens:
    """Quantise a continuous latent (B, d, H, W) on ``schedule``: bit labels and teacher inputs.

    ``flip_probs[s]`` (bitwise self-correction) flips bits of scale s before they are re-quantised
    into the running sum, so later inputs carry the error; the labels stay clean.
    """
    vae_grids = schedule.vae_grids(patchify)
    final = vae_grids[-1]
    latent = latent.float()
    summed = torch.zeros_like(latent)
    bits_per_scale, inputs = [], []
    for s, grid in enumerate(vae_grids):
        residual = latent - summed
        if s < len(vae_grids) - 1:
            residual = resize_down(residual, grid)
        codes, bits = bsq_quantize(residual)
        bits_per_scale.append(bits_to_tokens(bits, patchify))
        if s < len(flip_probs) and flip_probs[s] > 0:
            codes = bits_to_codes(flip_bits(bits, flip_probs[s], generator))
        summed = summed + resize_up(codes, final)
        if s < len(vae_grids) - 1:
            inputs.append(latent_to_tokens(resize_up(summed, vae_grids[s + 1]), vae_grids[s + 1], patchify))
    teacher = torch.cat(inputs, dim=1) if inputs else latent.new_zeros(latent.shape[0], 0, bits_per_scale[0].shape[-1])
    return MultiScaleTokens(bits_per_scale, teacher, summed)


class CodeAccumulator:
    """Running sum of decoded codes during generation; yields the next scale's input tokens."""

    def __init__(self, schedule: ScaleSchedule, patchify: bool, codebook_dim: int, batch: int, device, dtype=torch.float32):
        self.schedule, self.patchify = schedule, patchify
        self.vae_grids = schedule.vae_grids(patchify)
        self.summed = torch.zeros(batch, codebook_dim, *self.vae_grids[-1], device=device, dtype=dtype)

    def add(self, scale: int, token_bits: torch.Tensor) -> torch.Tensor | None:
        """Accumulate the bits of ``scale``; return the input tokens of ``scale + 1`` (None at the end)."""
        codes = token_bits_to_codes(token_bits, self.schedule.grids[scale], self.patchify)
        self.summed = self.summed + resize_up(codes, self.vae_grids[-1])
        if scale + 1 >= self.schedule.num_scales:
            return None
        nxt = self.vae_grids[scale + 1]
        return latent_to_tokens(resize_up(self.summed, nxt), nxt, self.patchify)


def teacher_inputs_from_bits(bits: Sequence[torch.Tensor], schedule: ScaleSchedule, patchify: bool, codebook_dim: int) -> torch.Tensor:
    """Teacher-forcing inputs rebuilt from stored bit labels (precomputed shards skip the VAE)."""
    acc = CodeAccumulator(schedule, patchify, codebook_dim, bits[0].shape[0], bits[0].device)
    inputs = [acc.add(s, b) for s, b in enumerate(bits)]
    return torch.cat([x for x in inputs if x is not None], dim=1)
