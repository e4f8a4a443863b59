"""Mean and 95 % confidence interval over seeds, with Student's t (no scipy at run time).

Two tables of Student's t quantiles: t(0.975, df) for two-sided 95 % intervals and t(0.80, df) for
80 % power (minimum detectable effects, seeds needed; see :mod:`varedit_lab.sweep.paired`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

# Two-sided 95 % critical values t(0.975, df), df = 1..30 (standard tables, 3 decimals).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
# Beyond 30 the table is sparse; the value at the next lower tabulated df is used (conservative).
_T975_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))
_Z975 = 1.960
# One-sided 80 % quantiles t(0.80, df), df = 1..30, then 40 / 60 / 120 and the normal limit.
_T80 = (
    1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879,
    0.876, 0.873, 0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860,
    0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854,
)  # fmt: skip
_T80_LARGE = ((40, 0.851), (60, 0.848), (120, 0.845))
_Z80 = 0.842


def _lookup(df: int, table: tuple[float, ...], large: tuple[tuple[int, float], ...], limit: float) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(table):
        return table[df - 1]
    value = table[-1]
    for bound, t in large:
        if df >= bound:
            value = t
    return value if df < 1000 else limit


def t_critical(df: int) -> float:
    """t(0.975, df): the half-width multiplier of a two-sided 95 % interval."""
    return _lookup(df, _T975, _T975_LARGE, _Z975)


def t_power(df: int) -> float:
    """t(0.80, df): the extra multiplier that buys 80 % power in a two-sided 5 % t-test."""
    return _lookup(df, _T80, _T80_LARGE, _Z80)


@dataclass(frozen=True)
class MeanCI:
    """Mean ± half-width of the 95 % CI over ``n`` finite values (half-width NaN when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "—"
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Iterable[float]) -> MeanCI:
    """Mean ± t(0.975, n−1)·s/√n of the finite values (NaN and missing values are dropped)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return MeanCI(math.nan, math.nan, 0)
    mean = statistics.fmean(finite)
    if n == 1:
        return MeanCI(mean, math.nan, 1)
    half = t_critical(n - 1) * statistics.stdev(finite) / math.sqrt(n)
    return MeanCI(mean, half, n)
