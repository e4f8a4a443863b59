"""Bitwise cross-entropy with the release's per-scale reweighting, and per-scale metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from varedit_lab.model.layout import ScaleSchedule


@dataclass
class BitLoss:
    loss: torch.Tensor  # scalar: mean over batch of sum_t w_t * ce[b, t]
    ce_per_token: torch.Tensor  # (B, T): mean bit cross-entropy of each token
    scale_loss: torch.Tensor  # (K,): mean ce per scale (detached)
    scale_bit_acc: torch.Tensor  # (K,): bit accuracy per scale (detached)
    scale_token_acc: torch.Tensor  # (K,): fraction of tokens with all bits right (detached)


def token_weights(schedule: ScaleSchedule, reweight: bool, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-token weights (T,) summing to 1: sqrt(S / n_s) normalised (``reweight``), else 1/T."""
    w = schedule.token_weights() if reweight else torch.full((schedule.total,), 1.0 / schedule.total, dtype=torch.float64)
    return w.to(device=device, dtype=dtype)


def bitwise_loss(
    logits: torch.Tensor,
    bits: torch.Tensor,
    schedule: ScaleSchedule,
    reweight: bool = True,
    label_smoothing: float = 0.0,
) -> BitLoss:
    """``logits`` (B, T, 2d'), ``bits`` (B, T, d') in {0, 1}."""
    b, t, v = logits.shape
    pairs = logits.reshape(b, t, v // 2, 2)
    labels = bits.long()
    ce = F.cross_entropy(pairs.reshape(-1, 2), labels.reshape(-1), reduction="none", label_smoothing=label_smoothing)
    ce_tok = ce.view(b, t, v // 2).mean(-1)
    w = token_weights(schedule, reweight, logits.device, ce_tok.dtype)
    loss = (ce_tok * w).sum(-1).mean()
    with torch.no_grad():
        correct = (pairs[..., 1] > pairs[..., 0]) == labels.bool()
        sizes = list(schedule.sizes)
        scale_loss = torch.stack([c.mean() for c in ce_tok.split(sizes, dim=1)])
        scale_bit_acc = torch.stack([c.float().mean() for c in correct.split(sizes, dim=1)])
        scale_token_acc = torch.stack([c.all(-1).float().mean() for c in correct.split(sizes, dim=1)])
    return BitLoss(loss, ce_tok, scale_loss, scale_bit_acc, scale_token_acc)
