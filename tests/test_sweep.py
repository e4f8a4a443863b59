"""Sweeps: file validation, the local runner (real subprocesses), resume/retry/interrupt, the report.

Runner tests train with ``tests/sweep_fake_train.py`` (same argv and files as ``varedit-lab train``,
known metrics); one slow test runs a real 3-run sweep with ``varedit-lab train``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from varedit_lab.cli import build_parser, main
from varedit_lab.config import experiments_dir, load_config
from varedit_lab.sweep import (
    RunRecord,
    SweepError,
    SweepOptions,
    agent_command,
    expand_command,
    grid_proposals,
    load_sweep,
    mean_ci,
    parse_sweep,
    propose,
    run_name,
    run_sweep,
    t_critical,
    write_report,
)
from varedit_lab.sweep.claims import is_claims_file
from varedit_lab.sweep.plan import cap_for
from varedit_lab.sweep.report import load_results, mean_curve
from varedit_lab.sweep.runner import preflight, run_settings
from varedit_lab.sweep.state import SweepState, locked, save_state

REPO = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).with_name("sweep_fake_train.py")
SWEEP_FILES = sorted(p for p in (experiments_dir() / "sweeps").glob("*.yaml") if not is_claims_file(p))  # claims: test_claims.py
T2 = 4.303  # t(0.975, 2): three seeds


# -- helpers -------------------------------------------------------------------------------------


def write_experiment(directory: Path) -> Path:
    path = directory / "experiment.yaml"
    path.write_text(
        "model:\n  scales: [1, 2, 4]\noptim:\n  lr: 1.0e-3\ntrainer:\n  max_steps: 6\n  log_every_n_steps: 2\nlogger:\n  mode: disabled\n"
    )
    return path


def fake_command(experiment: Path, macro: str = "${args_no_hyphens}") -> list[str]:
    return ["${interpreter}", str(FAKE), "train", str(experiment), macro]


def write_sweep(directory: Path, parameters: dict[str, Any], method: str = "grid", name: str = "tiny", **extra: Any) -> Path:
    raw = {
        "name": name,
        "method": method,
        "metric": {"name": "val/balance", "goal": "maximize"},
        "parameters": parameters,
        "command": fake_command(write_experiment(directory)),
        **extra,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep_cli(*args: str) -> int:
    return main(["sweep", *args, "--allow-custom-command", "--no-wandb"])


def records(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    state = json.loads((sweep_dir / "sweep.json").read_text())
    return {r["name"]: r for r in state["runs"]}


SEEDS_3 = {"conditioning.name": {"value": "sar"}, "seed": {"values": [0, 1, 2]}}


# -- runner --------------------------------------------------------------------------------------


def test_three_run_sweep_completes_and_rerun_skips(tmp_path, capsys):
    sweep_dir = tmp_path / "out"
    file = write_sweep(tmp_path, SEEDS_3)
    assert sweep_cli(str(file), "--dir", str(sweep_dir)) == 0
    out = capsys.readouterr().out
    assert "[1/3] sar-s0 completed in" in out and "ETA" in out and "[3/3] sar-s2 completed" in out
    runs = records(sweep_dir)
    assert list(runs) == ["sar-s0", "sar-s1", "sar-s2"]
    for name, record in runs.items():
        run_dir = sweep_dir / "runs" / name
        assert record["status"] == "completed" and record["exit_code"] == 0 and record["attempts"] == 1
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert "fake training" in (run_dir / "train.log").read_text()
        # the runner's per-run settings reached the program through argv
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert resolved["name"] == name and resolved["logger"]["group"] == "tiny" and resolved["logger"]["name"] == name
        assert resolved["output_dir"] == str(sweep_dir / "runs")
    with open(sweep_dir / "summary.csv") as handle:
        assert [row["run"] for row in csv.DictReader(handle)] == ["sar-s0", "sar-s1", "sar-s2"]

    assert sweep_cli(str(file), "--dir", str(sweep_dir)) == 0
    out = capsys.readouterr().out
    assert "3 runs, 3 done, 0 queued" in out and "completed in" not in out
    assert all(r["attempts"] == 1 for r in records(sweep_dir).values())
    assert "attempt 2" not in (sweep_dir / "runs" / "sar-s1" / "train.log").read_text()


def test_crashing_run_is_failed_with_its_log_others_complete_and_retry(tmp_path, capsys, monkeypatch):
    sweep_dir = tmp_path / "out"
    file = write_sweep(tmp_path, {"conditioning.name": {"value": "sar"}, "seed": {"values": [0, 13]}})
    assert sweep_cli(str(file), "--dir", str(sweep_dir)) == 1
    out = capsys.readouterr().out
    assert "sar-s13 FAILED (exit code 3" in out and "runs/sar-s13/train.log" in out
    runs = records(sweep_dir)
    assert runs["sar-s0"]["status"] == "completed"
    crashed = runs["sar-s13"]
    assert crashed["status"] == "failed" and crashed["exit_code"] == 3 and "fake crash" in crashed["error"]
    assert "RuntimeError: fake crash" in (sweep_dir / crashed["log"]).read_text()
    report = (sweep_dir / "report.md").read_text()
    assert "sar-s13" in report and "Failed runs" in report

    assert sweep_cli(str(file), "--dir", str(sweep_dir), "--no-report") == 1  # failed runs stay failed unless asked
    assert records(sweep_dir)["sar-s13"]["attempts"] == 1

    monkeypatch.setenv("FAKE_TRAIN_CRASH_SEEDS", "")  # the "bug" is fixed
    assert sweep_cli(str(file), "--dir", str(sweep_dir), "--retry-failed") == 0
    runs = records(sweep_dir)
    assert runs["sar-s13"]["status"] == "completed" and runs["sar-s13"]["attempts"] == 2
    assert runs["sar-s0"]["attempts"] == 1
    log = (sweep_dir / "runs" / "sar-s13" / "train.log").read_text()
    assert "attempt 1" in log and "attempt 2" in log and "fake crash" in log  # the history is kept


def test_ctrl_c_marks_active_run_interrupted_and_rerun_finishes(tmp_path):
    sweep_dir = tmp_path / "out"
    file = write_sweep(tmp_path, {"conditioning.name": {"value": "sar"}, "seed": {"values": [0, 1]}})
    argv = [sys.executable, "-m", "varedit_lab.cli", "sweep", str(file), "--dir", str(sweep_dir), "--allow-custom-command", "--no-wandb"]
    runner = subprocess.Popen(argv, env={**os.environ, "FAKE_TRAIN_SLEEP": "120"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = sweep_dir / "runs" / "sar-s0" / "train.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "fake training" in log.read_text()):  # the run is in its sleep
        assert runner.poll() is None and time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 130, out
    runs = records(sweep_dir)
    assert runs["sar-s0"]["status"] == "interrupted" and runs["sar-s1"]["status"] == "pending", out
    with pytest.raises(ProcessLookupError):  # the run's process did not outlive the runner
        os.kill(runs["sar-s0"]["pid"], 0)

    assert sweep_cli(str(file), "--dir", str(sweep_dir), "--no-report") == 0
    runs = records(sweep_dir)
    assert runs["sar-s0"]["status"] == "completed" and runs["sar-s0"]["attempts"] == 2
    assert runs["sar-s1"]["status"] == "completed" and runs["sar-s1"]["attempts"] == 1


def test_random_sweep_needs_a_cap_proposes_in_bounds_and_resumes(tmp_path, capsys):
    sweep_dir = tmp_path / "out"
    lr = {"distribution": "log_uniform_values", "min": 1.0e-4, "max": 3.0e-3}
    file = write_sweep(tmp_path, {"seed": {"value": 0}, "optim.lr": lr}, method="random", name="lr")
    assert sweep_cli(str(file), "--dir", str(sweep_dir)) == 2
    assert "--max-runs" in capsys.readouterr().err
    assert sweep_cli(str(file), "--dir", str(sweep_dir), "--max-runs", "2", "--parallel", "2", "--no-report") == 0
    first = records(sweep_dir)
    assert len(first) == 2 and all(r["status"] == "completed" for r in first.values())
    for name, record in first.items():
        value = record["params"]["optim.lr"]
        assert isinstance(value, float) and 1e-4 <= value <= 3e-3
        resolved = yaml.safe_load((sweep_dir / "runs" / name / "config.yaml").read_text())
        assert resolved["optim"]["lr"] == value and resolved["trainer"]["num_threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert sweep_cli(str(file), "--dir", str(sweep_dir), "--max-runs", "3", "--no-report") == 0
    second = records(sweep_dir)
    assert len(second) == 3 and all(second[n]["params"] == r["params"] and second[n]["attempts"] == 1 for n, r in first.items())


def test_second_runner_on_the_same_directory_is_refused(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, SEEDS_3), allow_custom_command=True)
    with locked(tmp_path / "out"):
        with pytest.raises(SweepError, match="another sweep runner"):
            run_sweep(spec, SweepOptions(sweep_dir=tmp_path / "out"))


def test_run_left_behind_by_a_killed_runner_blocks_a_new_one(tmp_path):
    """A 'running' record whose process still lives (its runner was SIGKILLed) must not be relaunched."""
    sweep_dir = tmp_path / "out"
    spec = load_sweep(write_sweep(tmp_path, SEEDS_3), allow_custom_command=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(60)", "name=sar-s0"], stdout=subprocess.PIPE)
    try:
        orphan.stdout.readline()  # it is up and running
        state = SweepState(name=spec.name, sweep_file=None, sweep=spec.raw)
        state.runs.append(RunRecord("sar-s0", {"conditioning.name": "sar", "seed": 0}, status="running", pid=orphan.pid))
        save_state(state, sweep_dir)
        with pytest.raises(SweepError, match=rf"still going: sar-s0 \(pid {orphan.pid}\)"):
            run_sweep(spec, SweepOptions(sweep_dir=sweep_dir))
    finally:
        orphan.kill()
        orphan.communicate()


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capsys):
    sweep_dir = tmp_path / "out"
    file = write_sweep(tmp_path, SEEDS_3)
    assert sweep_cli("--dry-run", str(file), "trainer.max_steps=3", "--dir", str(sweep_dir)) == 0
    out = capsys.readouterr().out
    assert not sweep_dir.exists()
    lines = [line.strip() for line in out.splitlines()]
    commands = [line for line in lines if "output_dir=" in line]
    assert len(commands) == 3 and all(c.startswith(f"{sys.executable} {FAKE} train") for c in commands)
    assert "seed=0" in commands[0] and "name=sar-s0" in commands[0] and "trainer.max_steps=3" in commands[0]
    assert f"output_dir={sweep_dir / 'runs'}" in commands[0] and "logger.group=tiny" in commands[0]
    assert "[run: new] sar-s2" in lines
    spec = load_sweep(file, allow_custom_command=True)  # and what a W&B agent would run:
    assert shlex.join(agent_command(spec, {"conditioning.name": "sar", "seed": 0})) in lines
    assert sweep_cli(str(file), "seed=5", "--dry-run") == 2  # a swept key cannot also be overridden


# -- report --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    """max_scale vs sar x seeds 0..2 through the runner (2 in parallel), no report yet."""
    directory = tmp_path_factory.mktemp("ablation")
    file = write_sweep(directory, {"conditioning.name": {"values": ["max_scale", "sar"]}, "seed": {"values": [0, 1, 2]}}, name="abl")
    sweep_dir = directory / "out"
    spec = load_sweep(file, allow_custom_command=True)
    result = run_sweep(spec, SweepOptions(sweep_dir=sweep_dir, parallel=2, report=False))
    assert result.exit_code == 0 and result.launched == [p.name for p in grid_proposals(spec)]
    return sweep_dir


def test_report_means_and_cis_match_hand_computation(ablation):
    paths = write_report(ablation, wandb=False)
    for name in ("summary", "report", "metrics", "scale_bit_acc", "loss_curves"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name
    for name in ("metrics", "scale_bit_acc", "loss_curves"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(paths["summary"]) as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 6 and rows["sar-s1"]["conditioning.name"] == "sar" and rows["sar-s1"]["status"] == "completed"
    assert float(rows["sar-s1"]["val/balance"]) == pytest.approx(0.64)
    assert float(rows["max_scale-s2"]["val/scale2_bit_acc"]) == pytest.approx(0.72)

    # sar balance over seeds 0,1,2 = 0.62, 0.64, 0.66: mean 0.64, s = 0.02, CI = 4.303 * 0.02 / sqrt(3)
    half = T2 * 0.02 / math.sqrt(3)
    assert half == pytest.approx(0.04969, abs=1e-5)
    report = paths["report"].read_text()
    sar_row = next(line for line in report.splitlines() if line.startswith("| sar |"))
    assert "| sar | 3 | 0.610 ± 0.025 | 0.830 ± 0.075 | 0.640 ± 0.050 |" in sar_row  # success, preservation, balance
    assert "777 ± 0" in sar_row  # sequence length; train-step time too:
    assert "0.050 ± 0.000" in sar_row
    max_row = next(line for line in report.splitlines() if line.startswith("| max_scale |"))
    assert "0.610 ± 0.050" in max_row  # balance 0.59, 0.61, 0.63
    assert "| sar − max_scale | 3 | 0.030 ± 0.000 |" in report  # seed-paired: the same +0.03 every seed
    assert "scale 2" in report and "0.710 ± 0.025" in report  # per-scale bit accuracy (0.70, 0.71, 0.72)
    assert "Best group by `val/balance` (maximize): **sar** (0.640 ± 0.050); its 95 % CI overlaps that of max_scale" in report

    _, results = load_results(ablation)
    sar = [r for r in results if r.params["conditioning.name"] == "sar"]
    steps, means, halves = mean_curve([r.curves["train/loss"] for r in sar])
    assert steps == [0, 2, 4] and means[0] == pytest.approx(1.34)  # (0.35 + 1) - 0.01 * seed
    assert halves[0] == pytest.approx(T2 * 0.01 / math.sqrt(3), abs=1e-3)


def test_report_command_logs_an_offline_wandb_run(ablation, capsys):
    assert os.environ["WANDB_MODE"] == "offline"  # set by conftest, with W&B dirs in a temp folder
    assert main(["sweep", "report", str(ablation)]) == 0
    out = capsys.readouterr().out
    assert f"report: {ablation / 'report.md'}" in out
    runs = list((ablation / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("run-*.wandb")), out
    assert f"wandb: {runs[0]}" in out


# -- validation ----------------------------------------------------------------------------------

VALID = {
    "method": "grid",
    "metric": {"name": "val/balance", "goal": "maximize"},
    "parameters": {"conditioning.name": {"values": ["max_scale", "sar"]}, "seed": {"values": [0, 1]}},
    "command": ["${env}", "${interpreter}", "-m", "varedit_lab.cli", "train", "experiments/synthetic/base.yaml", "${args_no_hyphens}"],
}

MALFORMED = {
    "bad_method": ({"method": "nonsense"}, ["method", "'nonsense' is not one of"]),
    "unknown_key": ({"parameters": {"optim.lrr": {"values": [0.1]}}}, ["parameters.optim.lrr", "Did you mean 'optim.lr'"]),
    "missing_values": ({"parameters": {"seed": {}}}, ["parameters.seed"]),
    "misspelt_values": ({"parameters": {"seed": {"valuez": [1, 2]}}}, ["parameters.seed"]),
    "wrong_type": ({"parameters": {"trainer.max_steps": {"values": [10, "many"]}}}, ["parameters.trainer.max_steps", "many", "int"]),
    "unknown_strategy": ({"parameters": {"conditioning.name": {"values": ["sar", "sar2"]}}}, ["parameters.conditioning.name", "sar2"]),
    "strategy_option": ({"parameters": {"conditioning.options.layerz": {"values": [[0]]}}}, ["parameters.conditioning.options.layerz", "layers"]),
    "continuous_in_grid": ({"parameters": {"optim.lr": {"distribution": "uniform", "min": 0.1, "max": 0.2}}}, ["parameters.optim.lr", "grid"]),
    "min_above_max": ({"method": "random", "parameters": {"optim.lr": {"distribution": "uniform", "min": 0.2, "max": 0.1}}}, ["parameters.optim.lr", "min"]),
    "runner_key": ({"parameters": {"output_dir": {"values": ["a", "b"]}}}, ["parameters.output_dir", "runner"]),
    "nested": ({"parameters": {"optim": {"parameters": {"lr": {"values": [0.1]}}}}}, ["parameters.optim", "dotted"]),
    "no_args_macro": ({"command": VALID["command"][:-1]}, ["command", "${args_no_hyphens}"]),
    "json_macro": ({"command": [*VALID["command"], "${args_json}"]}, ["command", "${args_json}"]),
    "not_train": ({"command": ["${interpreter}", "train.py", "${args_no_hyphens}"]}, ["command", "varedit-lab train"]),
    "bayes_without_metric": ({"method": "bayes", "metric": None}, ["metric", "bayes"]),
    "unknown_top_level": ({"paramters": {}}, ["paramters"]),
    "bad_run_cap": ({"run_cap": 0}, ["run_cap"]),
}


def test_valid_sweep_parses():
    spec = parse_sweep(dict(VALID), "valid.yaml")
    assert spec.swept_keys == ["conditioning.name", "seed"] and spec.group_keys == ["conditioning.name"]
    assert spec.experiment == "experiments/synthetic/base.yaml"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sweep_names_the_offending_key(case):
    change, expected = MALFORMED[case]
    raw = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    with pytest.raises(SweepError) as err:
        parse_sweep(raw, "bad.yaml")
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_cli_reports_a_malformed_file_as_one_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**VALID, "method": "nonsense"}))
    assert main(["sweep", str(path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["sweep", "validate", str(path), str(SWEEP_FILES[0])]) == 1
    out = capsys.readouterr().out
    assert "'nonsense' is not one of" in out and f"ok: {SWEEP_FILES[0]}" in out


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_files_validate_and_resolve(path, monkeypatch):
    monkeypatch.chdir(REPO)  # commands name experiment files relative to the repository root
    spec = load_sweep(path)  # strict: must run `varedit-lab train`
    assert spec.experiment and (REPO / spec.experiment).is_file()
    assert "conditioning.name" in spec.parameters and spec.metric
    if spec.method == "grid":
        proposals = grid_proposals(spec)
    else:
        assert cap_for(spec, None) == spec.run_cap
        proposals = [propose(spec, [], 0, lambda r: None)]
    for proposal in proposals:
        preflight(spec, proposal, run_settings(spec, proposal.name, Path("/tmp/sweep"), SweepOptions()))


def test_conditioning_ablation_is_the_paper_grid():
    spec = load_sweep(experiments_dir() / "sweeps" / "conditioning_ablation.yaml")
    names = [p.name for p in grid_proposals(spec)]
    assert names == [f"{s}-s{k}" for s in ("max_scale", "sar", "full_scale_all") for k in (0, 1, 2, 3)]


# -- W&B agent compatibility ---------------------------------------------------------------------


def wandb_agent_argv(raw: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The argv ``wandb agent`` builds for a run, with wandb's own helpers and its macro loop
    (wandb/wandb_agent.py, Agent._command_run, wandb 0.31)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(raw["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=["python"], program=[raw.get("program")], env=["/usr/bin/env"])
    argv: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


@pytest.mark.parametrize("macro", ["${args_no_hyphens}", "${args}"])
def test_agent_command_matches_wandb_and_parses_with_train(macro, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = {
        **VALID,
        "command": [*VALID["command"][:-1], macro],
        "parameters": {
            "conditioning.name": {"values": ["max_scale", "sar"]},
            "optim.lr": {"values": [2.5e-4]},
            "optim.betas": {"values": [[0.9, 0.95]]},
            "trainer.deterministic": {"values": [True, False]},
            "trainer": {"values": ["cpu"]},  # a section=preset group override
        },
    }
    spec = parse_sweep(raw, "agent.yaml")
    params = {"conditioning.name": "max_scale", "optim.lr": 2.5e-4, "optim.betas": [0.9, 0.95], "trainer.deterministic": True, "trainer": "cpu"}
    argv = agent_command(spec, params)
    assert argv == wandb_agent_argv(raw, params)
    args = build_parser().parse_args(argv[argv.index("varedit_lab.cli") + 1 :])  # what `train` receives
    assert args.command == "train" and args.config == "experiments/synthetic/base.yaml"
    cfg = load_config(args.config, args.overrides)
    assert cfg.conditioning.name == "max_scale" and cfg.optim.lr == 2.5e-4
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.trainer.deterministic is True
    # the local runner passes the same parameters, in the same form, plus its per-run settings
    local = expand_command(spec, params, ["name=x"])
    assert local[0] == sys.executable and local[local.index("train") :][:-1] == argv[argv.index("train") :]


# -- proposals, names, statistics ----------------------------------------------------------------


def test_random_and_bayes_proposals_stay_in_bounds_and_are_reproducible():
    params = {
        "conditioning.name": {"values": ["max_scale", "sar"]},
        "optim.lr": {"distribution": "log_uniform_values", "min": 1.0e-4, "max": 3.0e-3},
        "trainer.max_steps": {"distribution": "int_uniform", "min": 2, "max": 5},
    }
    random_spec = parse_sweep({**VALID, "method": "random", "parameters": params}, "r.yaml")
    bayes_spec = parse_sweep({**VALID, "method": "bayes", "parameters": params}, "b.yaml")
    target = lambda r: -abs(math.log10(r.params["optim.lr"] / 1e-3))  # noqa: E731 - best at lr = 1e-3
    for spec in (random_spec, bayes_spec):
        history: list[RunRecord] = []
        for index in range(8):
            proposal = propose(spec, history, index, target)
            lr, steps = proposal.params["optim.lr"], proposal.params["trainer.max_steps"]
            assert type(lr) is float and 1e-4 <= lr <= 3e-3, proposal  # numpy values are cast
            assert type(steps) is int and 2 <= steps <= 5 and proposal.params["conditioning.name"] in ("max_scale", "sar")
            assert proposal.name.startswith(f"r{index:03d}-")
            history.append(RunRecord(proposal.name, proposal.params, status="completed"))
        assert propose(spec, [], 0, target) == propose(spec, [], 0, target)
    with pytest.raises(SweepError, match="--max-runs"):
        cap_for(random_spec, None)


def test_run_names_are_deterministic_and_distinct():
    keys = ["conditioning.name", "seed"]
    assert run_name({"conditioning.name": "sar", "seed": 1}, keys) == "sar-s1"
    assert run_name({"conditioning.name": "pkg.mod:MyStrategy", "seed": 0}, keys) == "MyStrategy-s0"
    a = run_name({"optim.lr": 0.000123456}, ["optim.lr"])
    b = run_name({"optim.lr": 0.000123457}, ["optim.lr"])
    assert a.startswith("lr0.000123-") and a != b  # rounded for reading, hashed for identity
    long = {f"model.k{i}": i for i in range(20)}
    assert len(run_name(long, list(long))) <= 48


def test_t_table_and_mean_ci():
    assert t_critical(2) == T2 and t_critical(30) == 2.042 and t_critical(35) == 2.042 and t_critical(10**6) == 1.96
    stat = mean_ci([1.0, 2.0, 3.0, float("nan"), None])
    assert (stat.mean, stat.n) == (2.0, 3) and stat.half_width == pytest.approx(T2 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0]).half_width) and mean_ci([5.0]).format() == "5.000 (n=1)"
    assert mean_ci([]).n == 0 and mean_ci([]).format() == "—"


# -- the real train command ----------------------------------------------------------------------


@pytest.mark.slow
def test_real_train_sweep_of_three_tiny_runs(tmp_path, synthetic_shards, capsys):
    """full_scale vs max_scale vs sar with `varedit-lab train` (2 steps each) through the runner."""
    experiment = tmp_path / "tiny_train.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "base": str(experiments_dir() / "synthetic" / "base.yaml"),
                "tokenizer": {"checkpoint": None},
                "model": {"depth": 1, "width": 64, "num_heads": 1},
                "data": {"train_shards": synthetic_shards["train"], "val_shards": synthetic_shards["val"], "batch_size": 4, "val_samples": 4},
                "trainer": {"max_steps": 2, "val_every_n_steps": 2, "log_every_n_steps": 1, "progress_bar": False},
                "sampling": {"num_val_edits": 2},
            }
        )
    )
    file = tmp_path / "real.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "name": "real",
                "method": "grid",
                "metric": {"name": "val/balance", "goal": "maximize"},
                "parameters": {"conditioning.name": {"values": ["full_scale", "max_scale", "sar"]}, "seed": {"value": 0}},
                "command": ["${env}", "${interpreter}", "-m", "varedit_lab.cli", "train", str(experiment), "${args_no_hyphens}"],
            }
        )
    )
    sweep_dir = tmp_path / "out"
    code = main(["sweep", str(file), "--dir", str(sweep_dir), "--parallel", "3"])
    out = capsys.readouterr().out
    runs = records(sweep_dir)
    logs = {n: (sweep_dir / r["log"]).read_text()[-3000:] for n, r in runs.items() if r["status"] != "completed"}
    assert code == 0, f"{out}\n{logs}"
    assert set(runs) == {"full_scale", "max_scale", "sar"}
    for name in runs:
        assert "=== attempt 1" in (sweep_dir / "runs" / name / "train.log").read_text()  # not clobbered by the loggers
    with open(sweep_dir / "summary.csv") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert all(math.isfinite(float(rows[n]["val/loss"])) for n in runs)
    # the full-scale prefix holds every source scale: a longer sequence than max-scale/SAR
    assert float(rows["full_scale"]["perf/seq_len"]) > float(rows["sar"]["perf/seq_len"]) == float(rows["max_scale"]["perf/seq_len"])
    assert list((sweep_dir / "wandb").glob("offline-run-*"))  # the report's W&B run
    report = (sweep_dir / "report.md").read_text()
    copy_row = next(line for line in report.splitlines() if line.startswith("| *copy source* | 3 |"))
    assert float(copy_row.split("|")[3]) == pytest.approx(float(rows["sar"]["val/copy_success"]), abs=1e-3)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_wandb_agent_command_of_each_shipped_file_trains_the_intended_config(path, monkeypatch):
    """The exact argv wandb's agent code builds for every proposal of the file, parsed by `train`."""
    monkeypatch.chdir(REPO)
    spec = load_sweep(path)
    proposals = grid_proposals(spec) if spec.method == "grid" else [propose(spec, [], i, lambda r: None) for i in range(3)]
    for proposal in proposals:
        argv = wandb_agent_argv(spec.raw, proposal.params)
        assert argv[:2] == ["/usr/bin/env", "python"]
        args = build_parser().parse_args(argv[argv.index("varedit_lab.cli") + 1 :])
        assert args.command == "train" and args.config == spec.experiment
        cfg = load_config(args.config, args.overrides)
        for key, value in proposal.params.items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == pytest.approx(value) if isinstance(value, float) else node == value, (key, node, value)
