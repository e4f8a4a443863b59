"""`make demo`'s main job end to end at smoke size: data, tokenizer, a 3-run sweep, report, probes."""

from __future__ import annotations

import io
import json

import pytest

from varedit_lab import demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the demo writes data/ and runs/ under the working directory
    smoke = demo.DemoPlan("sweeps/conditioning_ablation_quick.yaml", tokenizer_steps=4, editor_steps=4, val_every=4,
                          train_samples=96, overrides=("sampling.num_val_edits=4", "data.val_samples=8", "data.batch_size=8"))
    monkeypatch.setitem(demo.MODES, "smoke", smoke)
    log = io.StringIO()
    summary = demo.run_demo("smoke", tmp_path / "runs" / "demo", parallel=2, out=log)

    assert summary["sweep_exit_code"] == 0, log.getvalue()
    text = log.getvalue()
    assert "(data " in text and " tokenizer " in text and " sweep " in text  # minutes per stage
    assert f"add tokenizer.checkpoint={summary['tokenizer']}" in text  # README's commands after this mode
    assert "    » full_scale-s0: done, 4 steps in" in text  # each sweep run's progress
    assert set(summary["stage_minutes"]) == {"data", "tokenizer", "sweep", "probes"}
    report = (tmp_path / summary["report"]).read_text()  # absolute paths stay absolute
    for strategy in ("full_scale", "max_scale", "sar"):
        assert strategy in report
    sweep_dir = tmp_path / "runs" / "demo" / "smoke" / "sweep"
    assert (sweep_dir / "summary.csv").is_file() and list(sweep_dir.glob("*.png"))
    probes = tmp_path / "runs" / "demo" / "smoke" / "probes"
    assert (probes / "probe.json").is_file() and (probes / "probes.md").is_file()
    assert json.loads((tmp_path / "runs" / "demo" / "smoke" / "demo.json").read_text())["mode"] == "smoke"

    again = io.StringIO()
    demo.run_demo("smoke", tmp_path / "runs" / "demo", parallel=2, out=again)
    text = again.getvalue()
    assert "data: reusing" in text and "tokenizer: reusing" in text
    assert "3 runs, 3 done, 0 queued" in text  # the sweep skips completed runs

    # a mode that wants more training pairs than the folder holds regenerates it
    monkeypatch.setitem(demo.MODES, "smoke", demo.DemoPlan(**{**smoke.__dict__, "train_samples": 120}))
    demo.ensure_data(demo.DemoPaths.create(tmp_path / "runs" / "demo", "smoke"), demo.MODES["smoke"], io.StringIO())
    assert json.loads((tmp_path / "data" / "synthetic64" / "synth.json").read_text())["counts"]["train"] == 120
