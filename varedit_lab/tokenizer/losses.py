"""Training losses of the tokenizer: reconstruction plus the BSQ commitment and entropy terms.

The BSQ terms follow Zhao et al., "Image and Video Tokenization with Binary Spherical Quantization"
(2024): for an l2-normalised vector u (d components) and its code q = sign(u)/sqrt(d),

* commitment ``||u - sg(q)||^2`` keeps the encoder output near its code;
* the entropy term ``H_sample - gamma * H_codebook`` (both approximated per bit, the factorised form
  that makes BSQ's 2^d codebook tractable) asks each position to commit to a code (low per-sample
  entropy) while the batch uses all codes (high codebook entropy). The soft assignment of bit j is
  ``p_j = sigmoid(4 * tau * u_j / sqrt(d))``: a softmax over the two candidate values ``+-1/sqrt(d)``
  with logits ``-tau * ||u - c||^2``.

Everything is computed per scale on the residual the multi-scale quantiser sees, with the codes of
earlier scales treated as constants (as the release's quantiser detaches them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.quant import CodeAccumulator, MultiScaleTokens, resize_down


@dataclass
class BSQTerms:
    commitment: torch.Tensor  # mean over scales of ||u - sg(q)||^2 (per position)
    sample_entropy: torch.Tensor  # mean over scales of the per-position bit entropy (nats, summed over bits)
    codebook_entropy: torch.Tensor  # mean over scales of the batch-average bit entropy (nats, summed over bits)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-8)) + (1 - p) * torch.log((1 - p).clamp_min(1e-8)))


def bsq_terms_one(residual: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Commitment, per-sample entropy and codebook entropy of one residual map (B, d, h, w)."""
    d = residual.shape[1]
    u = F.normalize(residual.float(), dim=1)
    q = torch.where(u > 0, 1.0, -1.0) / d**0.5
    commitment = (u - q).pow(2).sum(dim=1).mean()
    p = torch.sigmoid(4.0 * inv_temperature * u / d**0.5)  # (B, d, h, w): P(bit = 1)
    sample_entropy = _binary_entropy(p).sum(dim=1).mean()
    codebook_entropy = _binary_entropy(p.mean(dim=(0, 2, 3))).sum()
    return commitment, sample_entropy, codebook_entropy


def bsq_terms(
    latent: torch.Tensor,
    tokens: MultiScaleTokens,
    schedule: ScaleSchedule,
    patchify: bool,
    inv_temperature: float = 100.0,
) -> BSQTerms:
    """The BSQ terms of every scale of a quantised latent (gradients flow into ``latent`` only).

    The residual of scale s is rebuilt from the labels of scales < s with the shared
    :class:`~varedit_lab.model.quant.CodeAccumulator`, so this adds no second copy of the
    quantisation loop's decisions: the bits are the ones :func:`multiscale_quantize` chose.
    """
    d = latent.shape[1]
    vae_grids = schedule.vae_grids(patchify)
    acc = CodeAccumulator(schedule, patchify, d, latent.shape[0], latent.device)
    parts = []
    for s, grid in enumerate(vae_grids):
        residual = latent - acc.summed  # acc.summed is built from bits: a constant
        if s < len(vae_grids) - 1:
            residual = resize_down(residual, grid)
        parts.append(bsq_terms_one(residual, inv_temperature))
        acc.add(s, tokens.bits[s])
    commitment, sample_h, codebook_h = (torch.stack(x).mean() for x in zip(*parts))
    return BSQTerms(commitment, sample_h, codebook_h)
