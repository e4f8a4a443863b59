"""Attention-map probes: reduced attention statistics of any checkpoint and strategy.

``AttentionProbe`` (a context manager) routes chosen layers through an eager attention path that
returns the same outputs as the fast kernels and records block masses, locality, diagonality and
entropy (``ProbeResult``); ``probe_model`` runs one teacher-forced batch under a probe.
:mod:`varedit_lab.probes.alignment` sets those numbers next to the paper's Fig. 3 statement (mass on the
corresponding / coarser / finer source scales, locality on the finest source) with declared verdict
rules, and :mod:`varedit_lab.probes.compare` compares strategies. Plots live in
:mod:`varedit_lab.probes.plots` (matplotlib) and the Lightning callback in
:mod:`varedit_lab.probes.callback`; both are imported on first use (``varedit_lab.probes.plots``,
``varedit_lab.probes.ProbeCallback``) so that importing the probes stays light.
"""

from varedit_lab.probes.eager import eager_self_attention
from varedit_lab.probes.probe import (
    AttentionProbe,
    MapRequest,
    ProbeBudgetError,
    probe_model,
    unwrap_compiled,
)
from varedit_lab.probes.stats import ProbeResult

__all__ = [
    "AttentionProbe",
    "MapRequest",
    "ProbeBudgetError",
    "ProbeResult",
    "eager_self_attention",
    "probe_model",
    "unwrap_compiled",
    "ProbeCallback",
]


def __getattr__(name: str):
    if name == "ProbeCallback":  # imports lightning
        from varedit_lab.probes.callback import ProbeCallback

        return ProbeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
