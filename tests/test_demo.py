"""`make demo`'s main job end to end at smoke size: data, tokenizer, a 3-run sweep, report, probes."""

from __future__ import annotations

import io
import json

import pytest

from varedit_lab import demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the demo writes data/ and runs/ under the working directory
    smoke = demo.DemoPlan("sweeps/conditioning_ablation_quick.yaml", "flat", 64, "tokenizer/synthetic64.yaml", "synthetic/base.yaml",
                          tokenizer_steps=4, editor_steps=4, val_every=4, train_samples=96, precompute=True, measure_cost=True,
                          shared_tokenizer=False, overrides=("sampling.num_val_edits=4", "data.val_samples=8", "data.batch_size=8",
                                                             "text.kind=words", "model.depth=2", "model.width=64"))
    monkeypatch.setitem(demo.MODES, "smoke", smoke)
    log = io.StringIO()
    summary = demo.run_demo("smoke", tmp_path / "runs" / "demo", parallel=2, out=log)

    assert summary["sweep_exit_code"] == 0, log.getvalue()
    text = log.getvalue()
    assert "(data " in text and " tokenizer " in text and " sweep " in text  # minutes per stage
    assert f"add tokenizer.checkpoint={summary['tokenizer']}" in text  # README's commands after a mode with its own tokenizer
    assert "    » sar-s0: done, 4 steps in" in text  # each sweep run's progress
    assert set(summary["stage_minutes"]) == {"data", "tokenizer", "precompute", "sweep", "cost", "report", "probes"}
    cost = json.loads((tmp_path / "runs" / "demo" / "smoke" / "sweep" / "cost.json").read_text())
    assert set(cost["strategies"]) == {"full_scale_all", "max_scale", "sar", "text_only"}
    assert cost["strategies"]["full_scale_all"]["seq_len"] > cost["strategies"]["sar"]["seq_len"] == cost["strategies"]["max_scale"]["seq_len"]
    assert (tmp_path / "data" / "synthetic64" / "precomputed" / "precompute.json").is_file()
    report = (tmp_path / summary["report"]).read_text()  # absolute paths stay absolute
    for strategy in ("full_scale_all", "max_scale", "sar", "text_only"):
        assert strategy in report
    sweep_dir = tmp_path / "runs" / "demo" / "smoke" / "sweep"
    assert (sweep_dir / "summary.csv").is_file() and list(sweep_dir.glob("*.png"))
    probes = tmp_path / "runs" / "demo" / "smoke" / "probes"
    assert (probes / "probe.json").is_file() and (probes / "probes.md").is_file()
    assert json.loads((tmp_path / "runs" / "demo" / "smoke" / "demo.json").read_text())["mode"] == "smoke"

    again = io.StringIO()
    demo.run_demo("smoke", tmp_path / "runs" / "demo", parallel=2, out=again)
    text = again.getvalue()
    assert "data: reusing" in text and "tokenizer: reusing" in text and "precompute: reusing" in text and "cost: reusing" in text
    assert "4 runs, 4 done, 0 queued" in text  # the sweep skips completed runs

    # a mode that wants more training pairs than the folder holds regenerates it
    monkeypatch.setitem(demo.MODES, "smoke", demo.DemoPlan(**{**smoke.__dict__, "train_samples": 120}))
    demo.ensure_data(demo.DemoPaths.create(tmp_path / "runs" / "demo", "smoke"), demo.MODES["smoke"], io.StringIO())
    assert json.loads((tmp_path / "data" / "synthetic64" / "synth.json").read_text())["counts"]["train"] == 120
