"""Sweeps: W&B-format sweep files, a resumable local runner (one process per run) and a report.

``varedit-lab sweep FILE.yaml`` runs a sweep locally; the same file works with ``wandb sweep`` and
``wandb agent``. See :mod:`varedit_lab.sweep.spec` (format, validation), :mod:`.runner` (processes,
state, progress) and :mod:`.report` (summary.csv, report.md, plots, W&B). Claims declared before
running live beside the sweep file (:mod:`.claims`); :mod:`.paired` decides them and :mod:`.evidence`
gathers what the report shows beyond group means.
"""

from varedit_lab.sweep.claims import Claim, ClaimsError, claims_path, load_claims
from varedit_lab.sweep.plan import Proposal, grid_proposals, propose
from varedit_lab.sweep.report import write_report
from varedit_lab.sweep.runner import SweepOptions, SweepResult, default_sweep_dir, run_sweep
from varedit_lab.sweep.spec import SweepError, SweepSpec, agent_command, expand_command, load_sweep, parse_sweep, run_name
from varedit_lab.sweep.state import RunRecord, SweepState, load_state
from varedit_lab.sweep.stats import MeanCI, mean_ci, t_critical

__all__ = [
    "Claim",
    "ClaimsError",
    "MeanCI",
    "Proposal",
    "RunRecord",
    "SweepError",
    "SweepOptions",
    "SweepResult",
    "SweepSpec",
    "SweepState",
    "agent_command",
    "claims_path",
    "default_sweep_dir",
    "expand_command",
    "grid_proposals",
    "load_claims",
    "load_state",
    "load_sweep",
    "mean_ci",
    "parse_sweep",
    "propose",
    "run_name",
    "run_sweep",
    "t_critical",
    "write_report",
]
