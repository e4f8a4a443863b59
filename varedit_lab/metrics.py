"""Edit-quality metrics on decoded pixels, as torchmetrics ``Metric``s (they sync across ranks).

The synthetic benchmark knows the exact edit region, so quality splits into
* **success**: how close the edit is to the target *inside* the mask (PSNR and L1),
* **preservation**: how close the edit is to the source *outside* the mask (PSNR and L1),
* **balance**: the per-sample harmonic mean of the two PSNRs, averaged (like the paper's GPT-Bal,
  which is a per-sample harmonic mean of success and over-editing scores).
Images are expected in [-1, 1]; PSNR uses the [0, 1] range and is capped at ``MAX_PSNR``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

MAX_PSNR = 60.0


def masked_mse_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample MSE and L1 over the pixels where ``mask`` (B, 1, H, W) is 1, in [0, 1] units;
    also the number of masked pixels per sample."""
    diff = (a.float() - b.float()) / 2  # [-1, 1] -> [0, 1] units
    weight = mask.float().expand_as(diff)
    count = weight.flatten(1).sum(1)
    denom = count.clamp_min(1)
    mse = (diff.pow(2) * weight).flatten(1).sum(1) / denom
    l1 = (diff.abs() * weight).flatten(1).sum(1) / denom
    return mse, l1, count / diff.shape[1]


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-MAX_PSNR / 10)))).clamp(max=MAX_PSNR)


class EditQuality(Metric):
    """Success (inside the mask, vs target), preservation (outside, vs source) and balance."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("success_psnr", "success_l1", "preservation_psnr", "preservation_l1", "balance"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_success", "n_preservation", "n_balance"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """All images (B, 3, H, W) in [-1, 1]; ``mask`` (B, 1, H, W) with 1 = edit region."""
        mask = (mask > 0.5).float()
        s_mse, s_l1, s_count = masked_mse_l1(edited, target, mask)
        p_mse, p_l1, p_count = masked_mse_l1(edited, source, 1 - mask)
        has_s, has_p = s_count > 0, p_count > 0
        s_psnr, p_psnr = psnr_from_mse(s_mse), psnr_from_mse(p_mse)
        self.success_psnr += s_psnr[has_s].double().sum()
        self.success_l1 += s_l1[has_s].double().sum()
        self.n_success += int(has_s.sum())
        self.preservation_psnr += p_psnr[has_p].double().sum()
        self.preservation_l1 += p_l1[has_p].double().sum()
        self.n_preservation += int(has_p.sum())
        both = has_s & has_p
        harmonic = 2 * s_psnr * p_psnr / (s_psnr + p_psnr).clamp_min(1e-8)
        self.balance += harmonic[both].double().sum()
        self.n_balance += int(both.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        def mean(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            return (total / n).float() if n > 0 else torch.tensor(float("nan"))

        return {
            "success": mean(self.success_psnr, self.n_success),
            "success_l1": mean(self.success_l1, self.n_success),
            "preservation": mean(self.preservation_psnr, self.n_preservation),
            "preservation_l1": mean(self.preservation_l1, self.n_preservation),
            "balance": mean(self.balance, self.n_balance),
        }


class ScaleBitAccuracy(Metric):
    """Bit accuracy per scale (and overall), summed over tokens and bits across batches and ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, scale_sizes: tuple[int, ...], **kwargs):
        super().__init__(**kwargs)
        self.scale_sizes = tuple(scale_sizes)
        k = len(self.scale_sizes)
        self.add_state("correct", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted_bits: torch.Tensor, target_bits: torch.Tensor) -> None:
        """Bits (B, T, d') in {0, 1}, T = sum of the scale sizes."""
        right = (predicted_bits.to(torch.uint8) == target_bits.to(torch.uint8)).double()
        for k, chunk in enumerate(right.split(self.scale_sizes, dim=1)):
            self.correct[k] += chunk.sum()
            self.total[k] += chunk.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        per_scale = (self.correct / self.total.clamp_min(1)).float()
        out = {f"scale{k}_bit_acc": v for k, v in enumerate(per_scale)}
        out["bit_acc"] = (self.correct.sum() / self.total.sum().clamp_min(1)).float()
        return out
