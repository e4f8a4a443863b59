"""Paired statistics and the decision rule for a declared claim (numbers in, numbers out).

* **Seed-paired t-interval**: runs with the same seed (same shared initial weights, same data
  order) differ only by the arm, so ``d_s = arm_s − baseline_s`` removes what they share; mean ± 95 %
  t-CI over the n seeds. This interval includes training noise and decides the claim.
* **Per-sample paired bootstrap**: validation samples paired by key within each seed pair;
  samples are resampled within each seed (stratified), per-seed means averaged. It measures the
  validation-set noise of these trained models only, so it is reported beside the decision.
* **Decision** (``c = sign · d``, sign = +1 when higher is better, CI ``[lo, hi]`` of ``c``):
  supported if ``lo > 0``; refuted at δ if ``hi < δ`` (every effect ≥ δ in the claimed direction
  is excluded); inconclusive otherwise; with fewer than two pairs, "inconclusive (n=1)".
* **Power**: minimum detectable effect ``MDE = (t(0.975, n−1) + t(0.80, n−1)) · s_d / √n`` (80 %
  power, two-sided 5 %), and the smallest n with ``MDE(n) ≤ |paper effect|`` at this ``s_d``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from varedit_lab.sweep.stats import MeanCI, t_critical, t_power

SUPPORTED = "supported"
REFUTED = "refuted at δ"
INCONCLUSIVE = "inconclusive"
INCONCLUSIVE_N1 = "inconclusive (n=1)"
NO_PAIRS = "no pairs"
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class PairedStats(MeanCI):
    """Mean of n paired differences with its 95 % t half-width (``MeanCI``) and standard deviation (NaN if n < 2)."""

    sd: float = math.nan

    @property
    def has_interval(self) -> bool:
        return self.n >= 2


def paired_t(differences: Sequence[float]) -> PairedStats:
    values = [float(d) for d in differences if d is not None and math.isfinite(float(d))]
    n = len(values)
    if n == 0:
        return PairedStats(mean=math.nan, half_width=math.nan, n=0)
    mean = statistics.fmean(values)
    if n == 1:
        return PairedStats(mean=mean, half_width=math.nan, n=1)
    sd = statistics.stdev(values)
    return PairedStats(mean=mean, half_width=t_critical(n - 1) * sd / math.sqrt(n), n=n, sd=sd)


def minimum_detectable_effect(sd: float, n: int) -> float:
    """Smallest |true mean difference| a two-sided 5 % paired t-test finds with 80 % power (NaN if n < 2)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_critical(n - 1) + t_power(n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float, max_n: int = MAX_SEEDS) -> int | None:
    """Smallest n ≥ 2 whose MDE at this ``sd`` is ≤ |effect|; None when beyond ``max_n`` or undefined."""
    if not (math.isfinite(sd) and math.isfinite(effect)) or effect == 0:
        return None
    for n in range(2, max_n + 1):
        if minimum_detectable_effect(sd, n) <= abs(effect):
            return n
    return None


@dataclass(frozen=True)
class BootstrapCI:
    mean: float
    low: float
    high: float
    n_samples: int
    n_seeds: int


def paired_bootstrap(per_seed: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> BootstrapCI | None:
    """Percentile CI of the mean per-sample difference, resampling samples within each seed pair.

    ``per_seed[i]`` holds the differences of seed pair i's samples (paired by key). Each seed counts
    equally (the mean of per-seed means). Reproducible: the same ``seed`` gives the same interval.
    """
    groups = [np.asarray([v for v in g if math.isfinite(v)], dtype=np.float64) for g in per_seed]
    groups = [g for g in groups if g.size]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    replicate_means = np.zeros(n_boot)
    for values in groups:
        index = rng.integers(0, values.size, size=(n_boot, values.size))
        replicate_means += values[index].mean(axis=1)
    replicate_means /= len(groups)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(replicate_means, [tail, 100 - tail])
    mean = float(np.mean([g.mean() for g in groups]))
    return BootstrapCI(mean, float(low), float(high), int(sum(g.size for g in groups)), len(groups))


@dataclass(frozen=True)
class Decision:
    label: str  # SUPPORTED, REFUTED, INCONCLUSIVE, INCONCLUSIVE_N1 or NO_PAIRS
    note: str = ""

    def format(self) -> str:
        return f"**{self.label}**" + (f" ({self.note})" if self.note else "")


def decide(stats: PairedStats, sign: int, delta: float) -> Decision:
    """The decision for "arm better than baseline" from the seed-paired interval (see module doc)."""
    if stats.n == 0:
        return Decision(NO_PAIRS)
    if not stats.has_interval:
        return Decision(INCONCLUSIVE_N1)
    low, high = sorted((sign * stats.low, sign * stats.high))
    if low > 0:
        return Decision(SUPPORTED, "the whole CI is below δ: a real but small effect" if high < delta else "")
    if high < delta:
        return Decision(REFUTED, "the opposite direction is supported" if high < 0 else "")
    return Decision(INCONCLUSIVE)
