"""Edit-quality metrics on decoded pixels, as torchmetrics ``Metric``s (they sync across ranks).

The synthetic benchmark knows the exact edit region, so quality splits into
* **success**: how close the edit is to the target *inside* the mask (PSNR and L1),
* **preservation**: how close the edit is to the source *outside* the mask (PSNR and L1),
* **balance**: the per-sample harmonic mean of the two PSNRs, averaged (like the paper's GPT-Bal,
  which is a per-sample harmonic mean of success and over-editing scores).
Images are expected in [-1, 1]; PSNR uses the [0, 1] range and is capped at ``MAX_PSNR``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
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

    @staticmethod
    def per_sample(edited: torch.Tensor, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``success`` / ``preservation`` / ``balance`` (dB) and L1s, NaN where the mask
        (or its complement) is empty. Images (B, 3, H, W) in [-1, 1]; ``mask`` (B, 1, H, W), 1 = edited."""
        mask = (mask > 0.5).float()
        s_mse, s_l1, s_count = masked_mse_l1(edited, target, mask)
        p_mse, p_l1, p_count = masked_mse_l1(edited, source, 1 - mask)
        has_s, has_p = s_count > 0, p_count > 0
        s_psnr, p_psnr = psnr_from_mse(s_mse), psnr_from_mse(p_mse)
        harmonic = 2 * s_psnr * p_psnr / (s_psnr + p_psnr).clamp_min(1e-8)
        nan = torch.tensor(float("nan"), device=s_psnr.device)
        return {
            "success": torch.where(has_s, s_psnr, nan), "success_l1": torch.where(has_s, s_l1, nan),
            "preservation": torch.where(has_p, p_psnr, nan), "preservation_l1": torch.where(has_p, p_l1, nan),
            "balance": torch.where(has_s & has_p, harmonic, nan),
        }

    def update(self, edited: torch.Tensor | None = None, source: torch.Tensor | None = None, target: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, *, values: dict[str, torch.Tensor] | None = None) -> None:
        """All images (B, 3, H, W) in [-1, 1]; ``mask`` (B, 1, H, W) with 1 = edit region. Or ``values``:
        the per-sample values of :meth:`per_sample`, already computed (NaN = not measured). Both go
        through ``update`` so that torchmetrics counts them (else ``compute`` warns on every validation)."""
        self._accumulate(values if values is not None else self.per_sample(edited, source, target, mask))

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for total, count, name in (("success_psnr", "n_success", "success"), ("preservation_psnr", "n_preservation", "preservation"),
                                   ("balance", "n_balance", "balance")):
            seen = ~torch.isnan(values[name])
            setattr(self, total, getattr(self, total) + values[name][seen].double().sum())
            setattr(self, count, getattr(self, count) + int(seen.sum()))
        for total, name in (("success_l1", "success_l1"), ("preservation_l1", "preservation_l1")):
            seen = ~torch.isnan(values[name])
            setattr(self, total, getattr(self, total) + values[name][seen].double().sum())

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


def scale_mask_weights(mask: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The edit mask (B, 1, H, W) area-pooled to every scale's token grid and flattened in sequence
    order: (B, T) in [0, 1], the fraction of each token's pixels inside the edit."""
    mask = (mask > 0.5).float()
    return torch.cat([F.adaptive_avg_pool2d(mask, grid).flatten(1) for grid in grids], dim=1)


def coarse_scales(grids: Sequence[tuple[int, int]]) -> list[int]:
    """Scale indices counted as *coarse*: sides at most half the finest's (1..8 of [1, .., 16])."""
    finest = max(grids[-1])
    return [k for k, grid in enumerate(grids) if 2 * max(grid) <= finest]


class MaskSplitScaleMetrics(Metric):
    """Teacher-forced cross-entropy and bit accuracy per scale, split inside / outside the edit mask.

    Token t of scale k counts with weight m_t inside and 1 - m_t outside (m = the mask area-pooled to
    scale k's grid), summed over samples and ranks. These need no sampling, so they see small effects
    that sampled-edit pixel metrics drown in noise. ``compute`` gives ``ce_in/s{k}``,
    ``ce_out/s{k}``, ``bitacc_in/s{k}``, ``bitacc_out/s{k}`` and the unweighted means over scales
    ``ce_in`` / ``ce_out`` (all), ``ce_in_coarse`` ... (:func:`coarse_scales`) and ``..._fine`` (the rest).
    """

    full_state_update = False

    def __init__(self, grids: Sequence[tuple[int, int]], **kwargs):
        super().__init__(**kwargs)
        self.grids = tuple(tuple(g) for g in grids)
        self.sizes = [h * w for h, w in self.grids]
        k = len(self.grids)
        for name in ("ce_in", "ce_out", "acc_in", "acc_out", "w_in", "w_out"):
            self.add_state(name, default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ce_per_token: torch.Tensor, bit_acc_per_token: torch.Tensor, inside: torch.Tensor) -> None:
        """``ce_per_token``, ``bit_acc_per_token`` and ``inside`` (from :func:`scale_mask_weights`): (B, T)."""
        w_in, w_out = inside.double(), 1 - inside.double()
        for k, (ce, acc, a, b) in enumerate(zip(*(t.split(self.sizes, 1) for t in (ce_per_token.double(), bit_acc_per_token.double(), w_in, w_out)))):
            self.ce_in[k] += (ce * a).sum()
            self.ce_out[k] += (ce * b).sum()
            self.acc_in[k] += (acc * a).sum()
            self.acc_out[k] += (acc * b).sum()
            self.w_in[k] += a.sum()
            self.w_out[k] += b.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        per_scale = {
            "ce_in": torch.where(self.w_in > 0, self.ce_in / self.w_in.clamp_min(1e-12), nan),
            "ce_out": torch.where(self.w_out > 0, self.ce_out / self.w_out.clamp_min(1e-12), nan),
            "bitacc_in": torch.where(self.w_in > 0, self.acc_in / self.w_in.clamp_min(1e-12), nan),
            "bitacc_out": torch.where(self.w_out > 0, self.acc_out / self.w_out.clamp_min(1e-12), nan),
        }
        out = {f"{name}/s{k}": v[k].float() for name, v in per_scale.items() for k in range(len(self.grids))}
        out.update({name: value.float() for name, value in scale_group_means(per_scale["ce_in"][None], per_scale["ce_out"][None], self.grids).items()})
        return {name: value.reshape(()) if value.numel() == 1 else value for name, value in out.items()}


def scale_group_means(ce_in: torch.Tensor, ce_out: torch.Tensor, grids: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """(N, K) per-scale values -> (N,) unweighted means over all / coarse / fine scales (NaNs skipped)."""
    coarse = coarse_scales(grids)
    fine = [k for k in range(len(grids)) if k not in coarse]
    out = {}
    for side, values in (("in", ce_in), ("out", ce_out)):
        out[f"ce_{side}"] = values.nanmean(1)
        out[f"ce_{side}_coarse"] = values[:, coarse].nanmean(1)
        out[f"ce_{side}_fine"] = values[:, fine].nanmean(1)
    return out


def per_sample_mask_split(ce_per_token: torch.Tensor, inside: torch.Tensor, grids: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Per-sample versions of :class:`MaskSplitScaleMetrics`' cross-entropy means, (B,) each."""
    sizes = [h * w for h, w in grids]
    per_in, per_out = [], []
    for ce, a in zip(ce_per_token.double().split(sizes, 1), inside.double().split(sizes, 1)):
        b = 1 - a
        per_in.append(torch.where(a.sum(1) > 0, (ce * a).sum(1) / a.sum(1).clamp_min(1e-12), float("nan")))
        per_out.append(torch.where(b.sum(1) > 0, (ce * b).sum(1) / b.sum(1).clamp_min(1e-12), float("nan")))
    return {name: value.float() for name, value in scale_group_means(torch.stack(per_in, 1), torch.stack(per_out, 1), grids).items()}
