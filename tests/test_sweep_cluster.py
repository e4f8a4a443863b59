"""The sweep runner on GPUs (faked device count) and on a cluster (submitit's local executor), and
fields of a sweep file the local runner cannot honour. Runs train with tests/sweep_fake_train.py."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from varedit_lab.config import experiments_dir
from varedit_lab.sweep import SweepError, SweepOptions, load_sweep, run_sweep
from varedit_lab.sweep.gpus import GpuPool, plan_slots
from varedit_lab.sweep.launchers import read_submitit_preset

FAKE = Path(__file__).with_name("sweep_fake_train.py")
GPU_RUN = "trainer:\n  accelerator: gpu\n  devices: 1\n"


def write_sweep(directory: Path, trainer_yaml: str = "", **extra) -> Path:
    experiment = directory / "experiment.yaml"
    experiment.write_text("model:\n  scales: [1, 2, 4]\noptim:\n  lr: 1.0e-3\ntrainer:\n  max_steps: 6\n  log_every_n_steps: 2\n"
                          "logger:\n  mode: disabled\n")
    if trainer_yaml:
        experiment.write_text(experiment.read_text().replace("trainer:\n", trainer_yaml, 1))  # GPU settings first
    raw = {
        "name": "grid3",
        "method": "grid",
        "parameters": {"conditioning.name": {"value": "sar"}, "seed": {"values": [0, 1, 2]}},
        "command": ["${interpreter}", str(FAKE), "train", str(experiment), "${args_no_hyphens}"],
        **extra,
    }
    path = directory / "grid3.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def records(sweep_dir: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}


def devices_of_log(sweep_dir: Path, name: str) -> str:
    header = (sweep_dir / "runs" / name / "train.log").read_text().splitlines()[0]
    return header.split("CUDA_VISIBLE_DEVICES=", 1)[1].split(" ", 1)[0]


# -- GPU slots -----------------------------------------------------------------------------------


def test_gpu_pool_and_planned_slots():
    pool = GpuPool(["0", "1", "2", "3"])
    assert pool.take(2) == ["0", "1"] and pool.take(3) is None and pool.take(2) == ["2", "3"]
    pool.release(["0", "1"])
    assert pool.free == ["0", "1"]
    assert plan_slots([1, 1, 1], ["0", "1"], parallel=2) == [["0"], ["1"], ["0"]]
    assert plan_slots([2, 2, 1], ["0", "1", "2", "3"], parallel=2) == [["0", "1"], ["2", "3"], ["0"]]
    assert plan_slots([0, 0], [], parallel=2) == [None, None]  # CPU: no slot, no CUDA_VISIBLE_DEVICES


def test_parallel_two_on_two_fake_gpus_gives_disjoint_devices(tmp_path, capsys):
    spec = load_sweep(write_sweep(tmp_path, GPU_RUN), allow_custom_command=True)
    options = SweepOptions(parallel=2, gpus=["0", "1"], sweep_dir=tmp_path / "sweep", report=False, dry_run=True)
    run_sweep(spec, options)
    shown = capsys.readouterr().out
    assert "CUDA_VISIBLE_DEVICES=0" in shown and "CUDA_VISIBLE_DEVICES=1" in shown
    options.dry_run = False
    result = run_sweep(spec, options)
    assert result.exit_code == 0
    runs = records(tmp_path / "sweep")
    assert all(r["status"] == "completed" for r in runs.values())
    first, second = runs["sar-s0"]["gpus"], runs["sar-s1"]["gpus"]  # started together: disjoint
    assert {tuple(first), tuple(second)} == {("0",), ("1",)}
    for name, record in runs.items():  # what the process got is what was recorded
        assert devices_of_log(tmp_path / "sweep", name) == ",".join(record["gpus"])


def test_run_asking_for_more_gpus_than_the_machine_has_is_refused(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, "trainer:\n  accelerator: gpu\n  devices: 4\n"), allow_custom_command=True)
    with pytest.raises(SweepError, match=r"trainer.devices=4 needs 4 GPUs; this machine shows 2"):
        run_sweep(spec, SweepOptions(parallel=2, gpus=["0", "1"], sweep_dir=tmp_path / "sweep", report=False))


def test_cpu_runs_get_no_gpu_slot(tmp_path):
    spec = load_sweep(write_sweep(tmp_path), allow_custom_command=True)  # accelerator: cpu (the default)
    assert run_sweep(spec, SweepOptions(parallel=2, gpus=["0", "1"], sweep_dir=tmp_path / "sweep", report=False)).exit_code == 0
    assert all(r["gpus"] is None for r in records(tmp_path / "sweep").values())
    assert "CUDA_VISIBLE_DEVICES" not in (tmp_path / "sweep" / "runs" / "sar-s0" / "train.log").read_text()


# -- early_terminate -----------------------------------------------------------------------------


def test_early_terminate_hyperband_kills_the_run_below_the_bracket_cut(tmp_path, monkeypatch, capsys):
    # val/balance (maximised) is 0.62, 0.64, 0.66 for seeds 0, 1, 2, logged at every row while the runs go;
    # brackets at 2, 4, 8, 16 values keep the best half of the runs that reached them: seed 0 goes at 2.
    path = write_sweep(tmp_path, early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2},
                       metric={"name": "val/balance", "goal": "maximize"})
    spec = load_sweep(path, allow_custom_command=True)
    monkeypatch.setenv("FAKE_TRAIN_ROW_SLEEP", "0.15")
    options = SweepOptions(parallel=3, sweep_dir=tmp_path / "sweep", report=False, overrides=["trainer.max_steps=40"], poll_s=0.05)
    result = run_sweep(spec, options)
    runs = records(tmp_path / "sweep")
    assert {n: r["status"] for n, r in runs.items()} == {"sar-s0": "stopped", "sar-s1": "completed", "sar-s2": "completed"}
    assert result.exit_code == 0 and "stopped by early_terminate (hyperband on val/balance)" in capsys.readouterr().out
    stopped_rows = (tmp_path / "sweep" / "runs" / "sar-s0" / "metrics.csv").read_text().count("\n") - 1
    assert 3 <= stopped_rows < 20  # past the first bracket (2), killed well before its 20 rows
    assert run_sweep(spec, options).launched == []  # a stopped run is not run again


def test_early_terminate_needs_a_metric(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, early_terminate={"type": "hyperband", "min_iter": 2}), allow_custom_command=True)
    with pytest.raises(SweepError, match=r"early_terminate: hyperband needs metric.name"):
        run_sweep(spec, SweepOptions(sweep_dir=tmp_path / "sweep", report=False, dry_run=True))


# -- submitit ------------------------------------------------------------------------------------


def test_shipped_submitit_preset_is_valid():
    cluster, parameters = read_submitit_preset(experiments_dir() / "launch" / "submitit.yaml")
    assert cluster is None and parameters["slurm_signal_delay_s"] == 90 and parameters["gpus_per_node"] == 1


@pytest.mark.slow
def test_three_run_grid_through_submitit_local_executor_completes_and_resumes(tmp_path, monkeypatch):
    preset = tmp_path / "local.yaml"
    preset.write_text("cluster: local\ntimeout_min: 5\n")
    spec = load_sweep(write_sweep(tmp_path), allow_custom_command=True)
    sweep_dir = tmp_path / "sweep"
    options = SweepOptions(parallel=3, sweep_dir=sweep_dir, report=False, launcher="submitit", launcher_config=preset, poll_s=0.1)
    monkeypatch.setenv("FAKE_TRAIN_CRASH_NAMES", "sar-s2")
    first = run_sweep(spec, options)
    runs = records(sweep_dir)
    assert first.exit_code == 1 and [runs[n]["status"] for n in ("sar-s0", "sar-s1", "sar-s2")] == ["completed", "completed", "failed"]
    assert all(r["job_id"] and r["pid"] is None for r in runs.values())
    log = (sweep_dir / "runs" / "sar-s0" / "train.log").read_text()
    assert "fake training sar-s0" in log and "done: val/balance" in log  # the job wrote the run's log
    assert list((sweep_dir / "submitit").glob("*_submitted.pkl"))  # submitit's own job files
    monkeypatch.delenv("FAKE_TRAIN_CRASH_NAMES")
    options.retry_failed = True
    second = run_sweep(spec, options)
    assert second.exit_code == 0 and second.launched == ["sar-s2"]  # completed runs are not submitted again
    assert records(sweep_dir)["sar-s2"]["attempts"] == 2
