"""Declared claims, paired statistics with decisions, and the report's evidence sections.

Statistics are checked on synthetic numbers with answers computed by hand; the report is built from
fake run folders written by ``tests/sweep_fake_train.py`` through the real sweep runner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from varedit_lab.cli import main
from varedit_lab.config import experiments_dir
from varedit_lab.sweep import SweepError, SweepOptions, load_sweep, parse_sweep, run_sweep, write_report
from varedit_lab.sweep.claims import CLAIM_KEYS, ClaimsError, claims_path, load_claims
from varedit_lab.sweep.paired import (
    INCONCLUSIVE,
    INCONCLUSIVE_N1,
    REFUTED,
    SUPPORTED,
    decide,
    minimum_detectable_effect,
    paired_bootstrap,
    paired_t,
    seeds_needed,
)
from varedit_lab.sweep.stats import t_power

FAKE = Path(__file__).with_name("sweep_fake_train.py")
SWEEPS = experiments_dir() / "sweeps"
T2, T4 = 4.303, 2.776  # t(0.975, 2), t(0.975, 4)
PARAMS = {"conditioning.name": {"values": ["full_scale", "max_scale", "sar"]}, "seed": {"values": [0, 1, 2]}}


def claim(**change: Any) -> dict[str, Any]:
    base = {"name": "c", "metric": "val/ce_in_coarse", "arm": "sar", "baseline": "max_scale", "direction": "lower", "delta_relative": 0.015}
    return {k: v for k, v in {**base, **change}.items() if v is not None}


# -- decisions on synthetic numbers --------------------------------------------------------------


def test_paired_t_interval_by_hand():
    stats = paired_t([1.0, 2.0, 3.0])  # mean 2, sd 1
    assert (stats.n, stats.mean, stats.sd) == (3, 2.0, 1.0)
    assert stats.half_width == pytest.approx(T2 / math.sqrt(3))
    assert (stats.low, stats.high) == pytest.approx((2 - 2.4843, 2 + 2.4843), abs=1e-4)
    one = paired_t([0.7, float("nan")])
    assert one.n == 1 and not one.has_interval and math.isnan(one.half_width)


@pytest.mark.parametrize(
    ("diffs", "sign", "delta", "label", "note"),
    [
        ([0.5, 0.6, 0.7], +1, 0.1, SUPPORTED, ""),  # CI [0.35, 0.85] excludes 0 upwards
        ([-0.5, -0.6, -0.7], -1, 0.1, SUPPORTED, ""),  # lower is better: the same, mirrored
        ([0.05, 0.06, 0.07], +1, 0.5, SUPPORTED, "below δ"),  # real, but every value in the CI < δ
        ([0.01, -0.01, 0.0, 0.02, -0.02], +1, 0.1, REFUTED, ""),  # CI ±0.0196: effects ≥ 0.1 excluded
        ([-1.0, -1.1, -0.9], +1, 0.1, REFUTED, "opposite"),  # the arm is worse
        ([1.0, 0.9, 1.1], -1, 0.1, REFUTED, "opposite"),  # lower is better, yet the arm is higher
        ([1.0, -1.0, 2.0, -2.0], +1, 0.5, INCONCLUSIVE, ""),  # CI [-2.5, 2.5]: neither
        ([0.3, 0.1, 0.2], +1, 0.1, INCONCLUSIVE, ""),  # CI [-0.048, 0.448]: includes 0 and δ
        ([0.4], +1, 0.1, INCONCLUSIVE_N1, ""),
    ],
)
def test_decision_rules(diffs, sign, delta, label, note):
    decision = decide(paired_t(diffs), sign, delta)
    assert decision.label == label
    assert (note in decision.note) if note else decision.note == ""


def test_refuted_boundary_is_strict():
    # mean 0, sd 0.1, n = 5: half-width 2.776 * 0.1 / sqrt(5) = 0.12415; δ just above / at hi
    diffs = [0.1, -0.1, 0.1, -0.1, 0.0]
    stats = paired_t(diffs)
    assert stats.half_width == pytest.approx(T4 * stats.sd / math.sqrt(5))
    assert decide(stats, +1, stats.high + 1e-9).label == REFUTED
    assert decide(stats, +1, stats.high).label == INCONCLUSIVE  # an effect of exactly δ is not excluded


def test_minimum_detectable_effect_and_seeds_needed():
    assert t_power(1) == 1.376 and t_power(9) == 0.883 and t_power(10**6) == 0.842
    assert minimum_detectable_effect(1.0, 3) == pytest.approx((T2 + 1.061) / math.sqrt(3))
    # (t975 + t80)(n-1) / sqrt(n) <= 1: n = 9 gives (2.306 + 0.889)/3 = 1.065, n = 10 gives 0.9946
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(2.0, -2.0) == 10  # sign of the effect is irrelevant
    assert seeds_needed(0.0, 0.01) == 2  # no variance: the smallest paired design
    assert seeds_needed(1.0, 1e-4) is None and seeds_needed(math.nan, 1.0) is None
    assert math.isnan(minimum_detectable_effect(1.0, 1))


def test_paired_bootstrap_is_reproducible_and_correct():
    rng = np.random.default_rng(7)
    per_seed = [rng.normal(0.3, 1.0, 400).tolist(), rng.normal(0.5, 1.0, 400).tolist()]
    a = paired_bootstrap(per_seed, n_boot=2000, seed=3)
    assert a == paired_bootstrap(per_seed, n_boot=2000, seed=3)  # same seed, same interval
    assert a != paired_bootstrap(per_seed, n_boot=2000, seed=4)
    assert (a.n_samples, a.n_seeds) == (800, 2)
    assert a.mean == pytest.approx(np.mean([np.mean(g) for g in per_seed]))
    # the mean of two seed means of 400 N(., 1) values: standard error 1/sqrt(800)
    expected_half = 1.96 * float(np.mean([np.std(g) for g in per_seed])) / math.sqrt(800)
    assert a.low < a.mean < a.high and (a.high - a.low) / 2 == pytest.approx(expected_half, rel=0.15)
    constant = paired_bootstrap([[0.5] * 5, [0.5, 0.5]], n_boot=100)
    assert (constant.low, constant.high) == pytest.approx((0.5, 0.5))
    assert paired_bootstrap([[], [float("nan")]]) is None


# -- claims files --------------------------------------------------------------------------------


TYPOS = {
    "unknown_key": (claim(metrik="val/ce_in"), ["claims[0] (c).metrik: unknown key", "did you mean 'metric'", "valid keys"]),
    "unknown_metric": (claim(metric="val/ce_in_corse"), ["claims[0] (c).metric: unknown metric 'val/ce_in_corse'", "val/ce_{in,out}[_coarse|_fine]"]),
    "unknown_arm": (claim(arm="sarr"), ["claims[0] (c).arm: 'sarr' is not a value of conditioning.name", "['full_scale', 'max_scale', 'sar']"]),
    "unknown_baseline": (claim(baseline="max"), ["(c).baseline: 'max'", "valid: ['full_scale', 'max_scale', 'sar']"]),
    "same_arms": (claim(baseline="sar"), ["(c).baseline: the same as arm"]),
    "direction": (claim(direction="up"), ["(c).direction: 'up' is not one of ['higher', 'lower']"]),
    "missing": (claim(direction=None), ["(c).direction: missing"]),
    "no_delta": (claim(delta_relative=None), ["(c).delta: give exactly one of"]),
    "two_deltas": (claim(delta=0.1), ["(c).delta: give exactly one of"]),
    "negative_delta": (claim(delta_relative=-0.1), ["(c).delta_relative: must be a positive number"]),
    "arm_key": (claim(arm_key="conditioning.nam"), ["(c).arm_key: 'conditioning.nam' is not a parameter", "did you mean 'conditioning.name'"]),
    "where_key": (claim(where={"sed": 0}), ["(c).where.sed: not a discrete sweep parameter", "valid: ['seed']"]),
    "where_value": (claim(where={"seed": 7}), ["(c).where.seed: 7 is not one of its values [0, 1, 2]"]),
}


@pytest.mark.parametrize("case", sorted(TYPOS))
def test_claim_typo_names_the_key_and_the_choices(case, tmp_path):
    entry, expected = TYPOS[case]
    path = tmp_path / "x.claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [entry]}))
    with pytest.raises(ClaimsError) as err:
        load_claims(path, PARAMS)
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_claims_file_level_problems(tmp_path):
    path = tmp_path / "x.claims.yaml"
    path.write_text(yaml.safe_dump({"claim": [claim()], "claims": [claim(), claim()]}))
    with pytest.raises(ClaimsError) as err:
        load_claims(path, PARAMS)
    assert "claim: unknown top-level key; valid: ['claims']" in str(err.value)
    assert "the name 'c' is used more than once" in str(err.value)


def test_claims_cannot_live_in_the_sweep_file_itself():
    """W&B's schema (sweeps 0.2.0) rejects an extra top-level key: that is why claims are a sidecar."""
    raw = {"method": "grid", "parameters": PARAMS, "claims": [claim()],
           "command": ["${env}", "${interpreter}", "-m", "varedit_lab.cli", "train", "experiments/synthetic/base.yaml", "${args_no_hyphens}"]}
    with pytest.raises(SweepError, match="'claims' was unexpected"):
        parse_sweep(raw, "inline.yaml")


def write_sweep(directory: Path, parameters: dict[str, Any], claims: list[dict[str, Any]] | None, name: str = "abl") -> Path:
    experiment = directory / "experiment.yaml"
    experiment.write_text(
        "model:\n  scales: [1, 2, 4]\noptim:\n  lr: 1.0e-3\ntrainer:\n  max_steps: 6\n  log_every_n_steps: 2\nlogger:\n  mode: disabled\n"
    )
    raw = {
        "name": name,
        "method": "grid",
        "metric": {"name": "val/balance", "goal": "maximize"},
        "parameters": parameters,
        "command": ["${interpreter}", str(FAKE), "train", str(experiment), "${args_no_hyphens}"],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if claims is not None:
        claims_path(path).write_text(yaml.safe_dump({"claims": claims}, sort_keys=False))
    return path


def test_a_claims_typo_fails_before_anything_runs(tmp_path, capsys):
    file = write_sweep(tmp_path, PARAMS, [claim(metric="val/ce_in_corse")])
    sweep_dir = tmp_path / "out"
    code = main(["sweep", str(file), "--dir", str(sweep_dir), "--allow-custom-command", "--no-wandb"])
    err = capsys.readouterr().err
    assert code == 2 and "abl.claims.yaml" in err and "metric: unknown metric 'val/ce_in_corse'" in err
    assert not sweep_dir.exists()  # no run started, no directory made


@pytest.mark.parametrize("name", ["conditioning_ablation", "conditioning_ablation_quick"])
def test_shipped_claims_are_the_declared_ones(name):
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    by_name = {c.name: c for c in spec.claims}
    full = next(v for v in spec.parameters["conditioning.name"]["values"] if str(v).startswith("full_scale"))  # a preset
    required = {  # the decisive comparisons
        ("sar", "max_scale", "val/ce_in_coarse", "lower"),
        ("sar", "max_scale", "val/preservation", "higher"),
        ("max_scale", full, "perf/seq_len", "lower"),
        ("max_scale", full, "val/balance", "higher"),
    }
    assert required <= {(c.arm, c.baseline, c.metric, c.direction) for c in spec.claims}
    assert all(c.paper_effect and (c.delta or c.delta_relative) for c in by_name.values())
    assert by_name["sar_beats_max_preservation"].delta_relative == 0.040  # PIE over-edit 7.501 -> 7.804
    declared = yaml.safe_load(claims_path(SWEEPS / "conditioning_ablation.yaml").read_text())
    assert yaml.safe_load(claims_path(SWEEPS / f"{name}.yaml").read_text()) == declared  # quick tests the same claims
    assert set(c for entry in declared["claims"] for c in entry) <= set(CLAIM_KEYS)


# -- the report ----------------------------------------------------------------------------------


REPORT_CLAIMS = [
    claim(name="sar_ce", metric="val/ce_in_coarse"),  # sar - max: -0.04, -0.02, 0.00 -> inconclusive
    claim(name="sar_pres", metric="val/preservation", direction="higher", delta_relative=0.04, paper_effect=0.089),
    claim(name="sar_big", metric="val/balance", direction="higher", delta_relative=None, delta=0.1),  # +0.03 < δ
    claim(name="max_seq", metric="perf/seq_len", arm="max_scale", baseline="full_scale", delta_relative=0.2),
    claim(name="full_bal", metric="val/balance", arm="full_scale", baseline="max_scale", direction="higher"),  # worse
]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("claims")
    spec = load_sweep(write_sweep(directory, PARAMS, REPORT_CLAIMS), allow_custom_command=True)
    sweep_dir = directory / "out"
    assert run_sweep(spec, SweepOptions(sweep_dir=sweep_dir, parallel=3, report=False)).exit_code == 0
    (sweep_dir / "cost.json").write_text(json.dumps({
        "measured": "test box, alone", "threads": 1, "batch_size": 8, "repeats": 2,
        "strategies": {"max_scale": {"train_step_s": [0.40, 0.42], "edit_s": 0.5, "seq_len": 777},
                       "sar": {"train_step_s": [0.41, 0.41], "edit_s": 0.5, "seq_len": 777},
                       "full_scale": {"train_step_s": [0.60, 0.62], "edit_s": 0.8, "seq_len": 1042}},
    }))
    return sweep_dir


def claim_row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| `{name}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_states_a_decision_for_every_declared_claim(report_dir):
    paths = write_report(report_dir, wandb=False)
    report = paths["report"].read_text()
    assert report.index("## Declared claims") < report.index("## Results per")
    assert f"`{report_dir / 'claims.yaml'}`" in report  # the copy frozen at launch is what is evaluated

    ce = claim_row(report, "sar_ce")  # diffs -0.04, -0.02, 0: mean -0.02, half 4.303*0.02/sqrt(3) = 0.0497
    assert ce[2:4] == ["3", "24"] and ce[4] == "-0.020 [-0.070, +0.030] nats/bit"
    assert ce[6] == f"{0.015 * 0.61:.3g}" and ce[7] == f"**{INCONCLUSIVE}**"  # δ = 1.5 % of max's mean 0.61
    assert ce[8] == f"{(T2 + 1.061) * 0.02 / math.sqrt(3):.3g}"  # MDE
    # per-sample bootstrap: same keys, samples offsets cancel: per-seed means are -0.04, -0.02, 0 exactly
    low, high = (float(x) for x in ce[5].strip("[]").split(","))
    assert -0.0401 < low <= high < 0.0001

    pres = claim_row(report, "sar_pres")  # +0.05 every seed; samples: +0.5 dB every sample
    assert pres[4] == "+0.050 [+0.050, +0.050] dB" and pres[5] == "[+0.500, +0.500]" and pres[7] == f"**{SUPPORTED}**"
    assert pres[9] == f"{0.089 * 0.78:.3g} dB → 2"  # paper effect 8.9 % of max's 0.78; no variance: 2 seeds
    assert claim_row(report, "sar_big")[7] == f"**{SUPPORTED}** (the whole CI is below δ: a real but small effect)"
    seq = claim_row(report, "max_seq")
    assert seq[4] == "-265.000 [-265.000, -265.000] tokens" and seq[5] == "—" and seq[7] == f"**{SUPPORTED}**"
    assert claim_row(report, "full_bal")[7] == f"**{REFUTED}** (the opposite direction is supported)"


def test_report_evidence_sections_and_plots(report_dir):
    paths = write_report(report_dir, wandb=False)
    report = paths["report"].read_text()
    for name in ("claim_differences", "ce_scales", "ce_scale_curves", "edit_kinds", "metrics"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![{name}]({name}.png)" in report
    # per-scale CE inside the mask, sar: 0.56 + 0.01 seed at s0 -> 0.570 ± 0.025; s2 = s0 - 0.1
    sar_in = next(line for line in report.splitlines() if line.startswith("| sar | inside mask |"))
    assert "| 0.570 ± 0.025 | 0.520 ± 0.025 | 0.470 ± 0.025 |" in sar_in
    # per kind, sar recolour (samples 0 and 4): success 8.7 + 0.2 seed -> 8.90 ± 0.50, copy 6.20, margin 2.70
    recolour = next(line for line in report.splitlines() if line.startswith("| sar | recolour |"))
    assert recolour.split("|")[3:7] == [" 6 ", " 8.90 ± 0.50 ", " 6.20 ± 0.00 ", " 2.70 ± 0.50 "]
    assert "Every edit kind beats copying the source on success" in report
    # cost from cost.json (measured alone), with repeats as mean ± CI
    assert f"## Cost per strategy (from `{report_dir / 'cost.json'}` (test box, alone; threads 1; batch 8; repeats 2))" in report
    assert "| full_scale | 0.610 ± 0.127 | 0.800 | 1042 |" in report


def test_difference_curve_follows_the_validations(report_dir):
    from varedit_lab.sweep.report import gather_evidence, group_runs, group_keys, load_results

    state, results = load_results(report_dir)
    evidence = gather_evidence(report_dir, state, results, group_runs(results, group_keys(state)))
    ce = next(r for r in evidence.claims if r.claim.name == "sar_ce")
    steps, stats = ce.curve
    assert steps == [1, 3, 5] and all(s.n == 3 for s in stats)
    assert [s.mean for s in stats] == pytest.approx([-0.02, -0.02, -0.02])  # earlier offsets are shared


def test_edited_claims_after_launch_do_not_change_the_report(report_dir, capsys):
    sidecar = claims_path(report_dir.parent / "abl.yaml")
    original = sidecar.read_text()
    try:
        sidecar.write_text(yaml.safe_dump({"claims": [claim(name="picked_later", metric="val/success", direction="higher")]}))
        report = write_report(report_dir, wandb=False)["report"].read_text()
        assert "picked_later" not in report and "`sar_ce`" in report
        spec = load_sweep(report_dir.parent / "abl.yaml", allow_custom_command=True)
        run_sweep(spec, SweepOptions(sweep_dir=report_dir, report=False))  # nothing left to run
        assert "changed since this sweep started" in capsys.readouterr().out
    finally:
        sidecar.write_text(original)


def test_one_seed_report_has_no_intervals_and_says_n1(tmp_path):
    params = {"conditioning.name": {"values": ["max_scale", "sar"]}, "seed": {"value": 0}}
    spec = load_sweep(write_sweep(tmp_path, params, [claim(name="one")], name="one"), allow_custom_command=True)
    sweep_dir = tmp_path / "out"
    assert run_sweep(spec, SweepOptions(sweep_dir=sweep_dir, report=False)).exit_code == 0
    paths = write_report(sweep_dir, wandb=False)
    report = paths["report"].read_text()
    row = claim_row(report, "one")
    assert row[2] == "1" and row[4] == "-0.040 nats/bit (no CI)" and row[5] == "—" and row[7] == f"**{INCONCLUSIVE_N1}**"
    assert "## Paired differences" not in report and " ± " not in row[4]
    assert "No cost.json: times are the runs' own `perf/train_step_s`" in report
    assert paths["claim_differences"].is_file() and paths["edit_kinds"].is_file()


def test_report_with_claims_logs_an_offline_wandb_run(report_dir, capsys):
    assert main(["sweep", "report", str(report_dir)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "wandb: " in out  # the claims table went with the run
    run = next((report_dir / "wandb").glob("offline-run-*"))
    assert list(run.glob("files/media/table/sweep/claims_*.table.json"))


def test_pairing_by_every_other_swept_key_with_a_named_arm_key_and_where():
    """Arms may be any swept parameter; pairs agree on all the others (seed, layout); ``where`` filters."""
    from types import SimpleNamespace

    from varedit_lab.sweep.claims import Claim
    from varedit_lab.sweep.evidence import SampleCache, evaluate_claim, pair_runs

    def run(layout: str, strategy: str, seed: int, value: float) -> SimpleNamespace:
        params = {"model.rope_layout": layout, "conditioning.name": strategy, "seed": seed}
        return SimpleNamespace(name=f"{layout}-{strategy}-{seed}", status="completed", params=params,
                               metrics={"val/balance": value}, curves={}, run_dir=None)

    runs = [run(layout, strategy, seed, 10 + seed + (1.0 if layout == "release" else 0.0) + (0.5 if strategy == "sar" else 0.0))
            for layout in ("paper", "release") for strategy in ("max_scale", "sar") for seed in (0, 1, 2)]
    keys = ["model.rope_layout", "conditioning.name", "seed"]
    by_strategy = Claim("s", "val/balance", "sar", "max_scale", "higher", delta=0.1)
    pairs = pair_runs(runs, by_strategy, keys)
    assert len(pairs) == 6 and all(a.params["seed"] == b.params["seed"] and a.params["model.rope_layout"] == b.params["model.rope_layout"] for a, b in pairs)
    result = evaluate_claim(by_strategy, runs, keys, SampleCache())
    assert result.stats.n == 6 and result.stats.mean == pytest.approx(0.5) and result.decision.label == SUPPORTED
    by_layout = Claim("l", "val/balance", "release", "paper", "higher", delta=0.1, arm_key="model.rope_layout", where={"conditioning.name": "sar"})
    pairs = pair_runs(runs, by_layout, keys)
    assert [(a.name, b.name) for a, b in pairs] == [(f"release-sar-{s}", f"paper-sar-{s}") for s in (0, 1, 2)]
    failed = [SimpleNamespace(**{**vars(r), "status": "failed"}) if r.name == "release-sar-1" else r for r in runs]
    assert len(pair_runs(failed, by_layout, keys)) == 2  # a failed run leaves its partner unpaired


def test_cost_json_written_by_eval_cost_is_what_the_report_reads(tmp_path):
    from varedit_lab.eval.cost import write_cost
    from varedit_lab.sweep.evidence import cost_section, read_cost_file

    measured = {"measured": "alone", "threads": 2, "batch_size": 8, "repeats": 3,
                "strategies": {"max_scale": {"train_step_s": 0.41, "edit_s": 0.52, "seq_len": 777},
                               "full_scale_all": {"train_step_s": 0.63, "edit_s": 0.81, "seq_len": 1042}}}
    cost = read_cost_file(write_cost(tmp_path / "cost.json", measured))
    assert cost.per_group["full_scale_all"]["seq_len"].mean == 1042 and cost.machine == "alone; threads 2; batch 8; repeats 3"
    assert "| max_scale | 0.410 | 0.520 | 777 |" in cost_section(cost)
    (tmp_path / "bad.json").write_text(json.dumps({"strategies": {"sar": {"edit_s": "fast"}}}))
    with pytest.raises(SweepError, match="strategies.sar.edit_s must be a number"):
        read_cost_file(tmp_path / "bad.json")


def test_report_shows_each_strategys_validation_edits(report_dir):
    """The same validation samples edited by each strategy's lowest-seed run, its newest grid."""
    from PIL import Image

    for run in sorted((report_dir / "runs").iterdir()):
        for step in (2, 4):
            (run / "val_edits").mkdir(exist_ok=True)
            Image.new("RGB", (4, 4)).save(run / "val_edits" / f"step{step:06d}.png")
    report = write_report(report_dir, wandb=False)["report"].read_text()
    section = report.split("## Validation edits per strategy", 1)[1]
    for label in ("max_scale", "sar", "full_scale"):
        assert f"**{label}** (`{label}-s0`, step000004)" in section, label
        assert f"](runs/{label}-s0/val_edits/step000004.png)" in section
