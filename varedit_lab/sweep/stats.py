"""Mean and 95 % confidence interval over seeds, with Student's t (no scipy at run time)."""

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


def t_critical(df: int) -> float:
    """t(0.975, df): the half-width multiplier of a two-sided 95 % interval."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    value = _T975[-1]
    for bound, t in _T975_LARGE:
        if df >= bound:
            value = t
    return value if df < 1000 else _Z975


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
