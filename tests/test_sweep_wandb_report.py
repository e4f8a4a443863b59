"""``sweep report --wandb``: the report from a W&B server's runs equals the local one.

The server is replaced by a recorded API response (tests/fixtures/wandb_sweep_api.json: the fields
the public ``wandb.Api`` Sweep/Run objects expose: sweep ``config``; run ``name``, ``state``,
``config`` (flat sweep parameters + the nested config ``train`` logs), ``summary`` (with W&B's
``_runtime``/``_step``/``_wandb``), ``created_at`` and ``scan_history()`` rows with ``_step`` and
``trainer/global_step``). The same sweep is run locally with tests/sweep_fake_train.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import wandb

from tests.test_sweep import write_sweep
from varedit_lab.cli import main
from varedit_lab.sweep import SweepError, SweepOptions, load_sweep, run_sweep, write_report
from varedit_lab.sweep.wandb_source import load_wandb_results

FIXTURE = Path(__file__).parent / "fixtures" / "wandb_sweep_api.json"
PARAMS = {"conditioning.name": {"values": ["max_scale", "sar"]}, "seed": {"values": [0, 1, 2]}}


class FakeRun(SimpleNamespace):
    def scan_history(self, keys: list[str] | None = None, page_size: int = 1000) -> list[dict[str, Any]]:
        return list(self.history)


class FakeApi:
    """``wandb.Api`` answering ``sweep(path)`` from the recorded response; no network."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data, self.asked = data, []

    def sweep(self, path: str) -> SimpleNamespace:
        self.asked.append(path)
        if path != f"{self.data['entity']}/{self.data['project']}/{self.data['id']}":
            raise ValueError(f"Could not find sweep {path}")
        runs = [FakeRun(**run) for run in self.data["runs"]]
        return SimpleNamespace(id=self.data["id"], name=self.data["config"]["name"], config=self.data["config"], runs=runs)


def _table(path: Path, drop: tuple[str, ...] = ("exit_code", "duration_s")) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def _comparable(report: Path) -> list[str]:
    lines = [line for line in report.read_text().splitlines() if not line.startswith(("- method:", "- generated"))]
    runs = lines.index("## Runs")
    return lines[:runs] + ["|".join(line.split("|")[:5]) for line in lines[runs:]]


@pytest.fixture()
def local_and_api(tmp_path, monkeypatch):
    # The recorded W&B runs hold the metrics W&B stores; per-sample files (samples.jsonl) stay in the
    # local run folders, so the local sweep is made without them to compare like with like.
    monkeypatch.setenv("FAKE_TRAIN_CONTRACT", "0")
    spec = load_sweep(write_sweep(tmp_path, PARAMS, name="ablation"), allow_custom_command=True)
    assert run_sweep(spec, SweepOptions(sweep_dir=tmp_path / "local", report=False)).exit_code == 0
    write_report(tmp_path / "local", wandb=False)
    return tmp_path, FakeApi(json.loads(FIXTURE.read_text()))


def test_report_from_the_wandb_api_equals_the_local_report(local_and_api):
    tmp_path, api = local_and_api
    state, results = load_wandb_results("lab/varedit-lab/abc123xy", api=api)
    assert state.name == "ablation" and state.sweep_file == "wandb:lab/varedit-lab/abc123xy"
    assert [r.name for r in results] == ["max_scale-s0", "max_scale-s1", "max_scale-s2", "sar-s0", "sar-s1", "sar-s2"]
    assert results[0].params == {"conditioning.name": "max_scale", "seed": 0} and results[0].duration_s == 3.25
    assert "_runtime" not in results[0].metrics and "trainer/global_step" not in results[0].curves
    paths = write_report(tmp_path / "remote", wandb=False, source=(state, results))
    assert _table(paths["summary"]) == _table(tmp_path / "local" / "summary.csv")
    # Everything but where the sweep came from, when the report was made, and each run's log/duration.
    assert _comparable(paths["report"]) == _comparable(tmp_path / "local" / "report.md")
    assert {p.name for p in (tmp_path / "remote").glob("*.png")} == {p.name for p in (tmp_path / "local").glob("*.png")}


def test_cli_report_wandb_uses_wandb_api(local_and_api, monkeypatch, capsys):
    tmp_path, api = local_and_api
    monkeypatch.setattr(wandb, "Api", lambda: api)
    assert main(["sweep", "report", "--wandb", "lab/varedit-lab/abc123xy", "--dir", str(tmp_path / "cli"), "--no-wandb"]) == 0
    assert api.asked == ["lab/varedit-lab/abc123xy"]
    assert _table(tmp_path / "cli" / "summary.csv") == _table(tmp_path / "local" / "summary.csv")
    assert f"report: {tmp_path / 'cli' / 'report.md'}" in capsys.readouterr().out


def test_bad_wandb_sweep_paths_fail_clearly():
    api = FakeApi(json.loads(FIXTURE.read_text()))
    with pytest.raises(SweepError, match="expected ENTITY/PROJECT/SWEEP_ID"):
        load_wandb_results("abc123xy", api=api)
    with pytest.raises(SweepError, match="cannot read the sweep from W&B: Could not find sweep lab/varedit-lab/nope"):
        load_wandb_results("lab/varedit-lab/nope", api=api)
