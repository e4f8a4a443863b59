"""Offline probes of checkpoints: ``probe_checkpoint``, ``varedit-lab probe``, the strategy comparison,
the ``probes`` config section wiring the live callback, and the demo's ``probe_best_run``."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from tests.test_probes import batch, tiny_model, zero_query_key
from varedit_lab.cli import main
from varedit_lab.probes import probe_model
from varedit_lab.probes.compare import compare_strategies, layer_profile, summarize, summary_markdown
from varedit_lab.probes.run import probe_checkpoint, runs_by_strategy

REPO = Path(__file__).resolve().parents[1]
# The fixture editor was trained with an untrained tokenizer, which checkpoints do not store.
pytestmark = pytest.mark.filterwarnings("ignore:.*untrained tokenizer:UserWarning")
PNGS = ["attention_maps.png", "block_mass.png", "locality.png"]
ALIGNMENT = ["alignment.md", "alignment.png"]  # the Fig. 3 section of every offline probe


def assert_rows_sum_to_one(data: dict) -> None:
    for layer in data["layers"].values():
        for row in layer["block_mass"]["mean"]:
            assert all(math.isfinite(x) and x >= 0 for x in row)
            assert sum(row) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# CLI and library


def test_cli_writes_probe_json_and_pngs(tmp_path, tiny_editor_checkpoint, synthetic_shards, capsys):
    out = tmp_path / "probe"
    code = main(["probe", "--ckpt", str(tiny_editor_checkpoint), "--data", synthetic_shards["val"], "--layers", "0", "-1",
                 "--samples", "3", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(PNGS + ALIGNMENT + ["probe.json"])
    assert all((out / name).stat().st_size > 1000 for name in PNGS + ALIGNMENT)
    data = json.loads((out / "probe.json").read_text())
    assert data["strategy"]["name"] == "sar"  # the fixture's config
    config = data["config"]
    assert config["checkpoint"] == str(tiny_editor_checkpoint.resolve())
    assert config["num_samples"] == 3 and len(config["sample_keys"]) == 3 and config["batch_size"] == 2
    assert config["strategy_options"]["name"] == "sar" and config["run_config"]["model"]["depth"] == 2
    assert config["layers"] == [0, 1] and config["num_heads"] == 2
    assert sorted(data["layers"]) == ["0", "1"]
    # both batches (2 + 1 samples) counted once per query block
    assert set(data["layers"]["0"]["num_samples"].values()) == {3}
    assert "ref@4x4" in data["layers"]["0"]["key_blocks"] and "ref@4x4" not in data["layers"]["1"]["key_blocks"]
    assert_rows_sum_to_one(data)
    assert {m["layer"] for m in data["maps"]} == {0, 1}
    fig3 = data["fig3"]  # SAR's layer 0 sees only its own reference: the layer-1 claim is not testable there
    assert [v["outcome"] for v in fig3["verdicts"]][0] == "not testable" and fig3["min_lift"] == 2.0
    assert "| paper (Fig. 3) | our numbers | verdict |" in (out / "alignment.md").read_text()
    printed = capsys.readouterr()
    assert "| sar | 0 → 1 |" in printed.out and "probe.json" in printed.err
    assert "NOT TESTABLE" in printed.out and "alignment.md" in printed.err


def test_probe_checkpoint_is_independent_of_batching(tiny_editor_checkpoint, synthetic_shards):
    """Accumulating 4 samples one by one gives the statistics of one batch of 4 (and the same samples)."""
    kwargs = dict(data=synthetic_shards["val"], num_samples=4, maps=[])
    # The fixture's tokenizer is untrained and not saved in the checkpoint (frozen parts are rebuilt
    # from config): seed its random init so that both loads build the same tokenizer.
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="untrained tokenizer"):
        one = probe_checkpoint(tiny_editor_checkpoint, batch_size=4, **kwargs)
    torch.manual_seed(0)
    single = probe_checkpoint(tiny_editor_checkpoint, batch_size=1, **kwargs)
    assert one.layers == single.layers == [0, 1] and not one.maps
    for layer in one.layers:
        torch.testing.assert_close(one.block_mass(layer), single.block_mass(layer), equal_nan=True, atol=1e-5, rtol=0)
        torch.testing.assert_close(one.locality(layer), single.locality(layer), equal_nan=True, atol=1e-5, rtol=0)
        assert set(single.num_samples(layer).values()) == {4}
    every = probe_checkpoint(tiny_editor_checkpoint, data=synthetic_shards["val"], num_samples=2, layers=[-1], maps="all")
    assert every.layers == [1] and [key[:2] for key in every.maps] == [(1, None)]
    with pytest.raises(ValueError, match="maps="):
        probe_checkpoint(tiny_editor_checkpoint, data=synthetic_shards["val"], num_samples=2, maps="first")


def test_cli_maps_flag_without_layers_keeps_no_maps(tmp_path, tiny_editor_checkpoint, synthetic_shards):
    out = tmp_path / "nomaps"
    assert main(["probe", "--ckpt", str(tiny_editor_checkpoint), "--data", synthetic_shards["val"], "--samples", "2",
                 "--heads", "1", "--maps", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["block_mass.png", "locality.png", "probe.json"] + ALIGNMENT)
    data = json.loads((out / "probe.json").read_text())
    assert data["maps"] == [] and data["config"]["heads"] == [1]


def test_cli_errors(tmp_path, tiny_editor_checkpoint, capsys):
    assert main(["probe", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", "--ckpt", str(tiny_editor_checkpoint), "--samples", "0", "--out", str(tmp_path / "o")])
    # the fixture was trained without validation shards: probing needs --data
    assert main(["probe", "--ckpt", str(tiny_editor_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "no data.val_shards" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# comparison


@pytest.mark.parametrize("name", ["full_scale", "max_scale", "sar"])
def test_summary_of_uniform_attention(name):
    """Uniform attention (q = k = 0): every metric has a value computable from token counts."""
    model = tiny_model()
    zero_query_key(model)
    result = probe_model(model, *batch(name, {}))
    profile = layer_profile(result, 1)  # last layer: plain visibility
    # target scales 1 (2x2) and 2 (4x4); visible keys: sources, sos, tgt1 (4), and tgt2 (16) for scale 2
    sources = {"full_scale": ([1, 4], [1, 4, 16]), "max_scale": ([16], [16]), "sar": ([16], [16])}[name]
    expected_mass = [sum(sources[0]) / (sum(sources[0]) + 5), sum(sources[1]) / (sum(sources[1]) + 21)]
    same = [4 / sum(sources[0]) if 4 in sources[0] else 0.0, 16 / sum(sources[1])]
    assert profile["source_mass"].tolist() == pytest.approx(expected_mass, abs=1e-5)
    assert profile["same_scale_share"].tolist() == pytest.approx(same, abs=1e-5)
    assert profile["norm_entropy"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    summary = summarize(result)
    assert summary["first"]["layer"] == 0 and summary["last"]["layer"] == 1
    if name == "sar":  # layer 0: each target scale sees only its own pooled reference of the source
        assert summary["first"]["same_scale_share"] == pytest.approx(1.0)
        assert math.isnan(summary["first"]["locality"])  # the finest source is invisible there
    if name == "full_scale":  # the finest source is visible to the 4x4 scale only ("coarser" masks)
        assert math.isnan(profile["locality"][0]) and math.isnan(profile["uniform_locality"][0])
        assert summary["last"]["locality"] == pytest.approx(100 / 256, abs=1e-6)
    assert summary["last"]["locality"] == pytest.approx(summary["last"]["uniform_locality"], abs=1e-6)


def test_compare_strategies_figure_and_table(tmp_path):
    results = {}
    for name in ("full_scale", "max_scale", "sar"):
        results[name] = probe_model(tiny_model(), *batch(name, {}))
    fig = compare_strategies(results, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 5000
    assert len(fig.axes) == 4 and len(fig.axes[0].lines) == 6  # first and last layer per strategy
    table = summary_markdown(results)
    assert table.count("\n") == 7 and "| sar | 0 → 1 |" in table and "–" in table  # SAR layer-0 locality
    assert "fixed by the attention mask" in table  # max-scale / SAR same-scale shares are structural
    with pytest.raises(ValueError):
        compare_strategies({})


# ---------------------------------------------------------------------------------------------------
# the probes config section wires the live callback


def test_probes_config_wires_the_callback(tmp_path, synthetic_shards):
    from varedit_lab.config import load_config
    from varedit_lab.probes.callback import ProbeCallback
    from varedit_lab.training import build_callbacks, train

    base = [f"data.train_shards={synthetic_shards['train']}", f"data.val_shards={synthetic_shards['val']}", f"output_dir={tmp_path}"]
    config = REPO / "tests" / "configs" / "tiny_editor.yaml"
    off = load_config(config, base)
    assert not any(isinstance(c, ProbeCallback) for c in build_callbacks(off, tmp_path, {})[0])
    tokenizer_task = load_config(config, base + ["task=tokenizer", "probes.every_n_val=1"])
    assert not any(isinstance(c, ProbeCallback) for c in build_callbacks(tokenizer_task, tmp_path, {})[0])

    cfg = load_config(config, base + ["name=probed", "probes.every_n_val=1", "probes.layers=[0,-1]", "probes.heads=[0]",
                                      "probes.num_samples=2", "probes.map_layers=[-1]"])
    callbacks = [c for c in build_callbacks(cfg, tmp_path, {})[0] if isinstance(c, ProbeCallback)]
    assert len(callbacks) == 1 and callbacks[0].layers == [0, -1] and callbacks[0].heads == [0]
    run = train(cfg)  # 6 steps, validation every 3
    steps = sorted(p.name for p in (run / "probes").iterdir())
    assert steps == ["step000003", "step000006"]
    last = run / "probes" / "step000006"
    assert sorted(p.name for p in last.iterdir()) == sorted(PNGS + ["probe.json"])
    data = json.loads((last / "probe.json").read_text())
    assert data["config"]["global_step"] == 6 and data["config"]["heads"] == [0]
    assert [m["layer"] for m in data["maps"]] == [1] and set(data["layers"]["1"]["num_samples"].values()) == {2}
    assert_rows_sum_to_one(data)


# ---------------------------------------------------------------------------------------------------
# demo


def _fake_run(runs: Path, name: str, checkpoint: dict, strategy: str, seed: int, status: str, val_shards: str,
              options: dict | None = None) -> Path:
    """A sweep run made of the fixture checkpoint relabelled to ``strategy``: the strategies add no
    parameters, so the same weights load and run under every strategy."""
    run = runs / name
    (run / "checkpoints").mkdir(parents=True)
    config = json.loads(json.dumps(checkpoint["varedit_config"]))
    config["conditioning"] = {"name": strategy, "options": dict(options or {})}
    config["seed"], config["data"]["val_shards"] = seed, val_shards
    torch.save({**checkpoint, "varedit_config": config}, run / "checkpoints" / "last.ckpt")
    summary = {"status": status, "config": config, "strategy": {"name": strategy, **(options or {})}, "metrics": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_probe_best_run_compares_one_run_per_strategy(tmp_path, tiny_editor_checkpoint, synthetic_shards):
    from varedit_lab.demo import probe_best_run

    checkpoint = torch.load(tiny_editor_checkpoint, map_location="cpu", weights_only=False)
    runs = tmp_path / "sweep" / "runs"
    val = synthetic_shards["val"]
    best = _fake_run(runs, "max_scale-s1", checkpoint, "max_scale", 1, "completed", val)
    _fake_run(runs, "max_scale-s0", checkpoint, "max_scale", 0, "completed", val)  # not picked: the best run is
    _fake_run(runs, "full_scale-s1", checkpoint, "full_scale", 1, "completed", val)
    _fake_run(runs, "full_scale-s0", checkpoint, "full_scale", 0, "failed", val)  # not completed
    _fake_run(runs, "sar-s2", checkpoint, "sar", 2, "completed", val)
    _fake_run(runs, "sar-s0", checkpoint, "sar", 0, "completed", val)
    assert {k: v.name for k, v in runs_by_strategy(runs, prefer=best).items()} == {
        "full_scale": "full_scale-s1", "max_scale": "max_scale-s1", "sar": "sar-s0"}

    log = io.StringIO()
    out = tmp_path / "probes"
    assert probe_best_run(best, out, log) == str(out)
    assert json.loads((out / "probe.json").read_text())["strategy"]["name"] == "max_scale"
    assert sorted(p.name for p in (out / "strategies").iterdir()) == ["full_scale-s1", "sar-s0"]
    for run, strategy in (("full_scale-s1", "full_scale"), ("sar-s0", "sar")):
        data = json.loads((out / "strategies" / run / "probe.json").read_text())
        assert data["strategy"]["name"] == strategy and data["config"]["num_samples"] == 8
        assert data["config"]["data"] == val  # the run config's validation shards
        assert_rows_sum_to_one(data)
    assert (out / "strategy_comparison.png").stat().st_size > 5000
    report = (out / "probes.md").read_text()
    assert all(f"| {name} | 0 → 1 |" in report for name in ("full_scale", "max_scale", "sar"))
    assert "`max_scale-s1`" in report and "`sar-s0`" in report and "strategy_comparison.png" in report
    assert "probes: max_scale-s1 (max_scale)" in log.getvalue()


def test_probe_best_run_alone(tmp_path, tiny_editor_checkpoint, synthetic_shards):
    from varedit_lab.demo import probe_best_run

    checkpoint = torch.load(tiny_editor_checkpoint, map_location="cpu", weights_only=False)
    run = _fake_run(tmp_path / "runs", "sar-s0", checkpoint, "sar", 0, "completed", synthetic_shards["val"])
    out = tmp_path / "probes"
    probe_best_run(run, out, io.StringIO())
    assert sorted(p.name for p in out.iterdir()) == sorted(PNGS + ALIGNMENT + ["probe.json", "probes.md"])
    report = (out / "probes.md").read_text()
    assert "| sar | 0 → 1 |" in report and "## Attention vs the paper's Fig. 3" not in report  # no full-scale run


def test_probe_best_run_reports_fig3_for_the_paper_setting(tmp_path, tiny_editor_checkpoint, synthetic_shards):
    """Full-scale runs that differ in visibility are probed separately; probes.md ends with the Fig. 3
    section of the paper's setting (every source scale visible), its plot path relative to probes.md."""
    from varedit_lab.demo import probe_best_run

    checkpoint = torch.load(tiny_editor_checkpoint, map_location="cpu", weights_only=False)
    runs = tmp_path / "runs"
    val = synthetic_shards["val"]
    best = _fake_run(runs, "sar-s0", checkpoint, "sar", 0, "completed", val)
    _fake_run(runs, "full-all-s0", checkpoint, "full_scale", 0, "completed", val, {"visibility": "all"})
    _fake_run(runs, "full-coarser-s0", checkpoint, "full_scale", 0, "completed", val, {"visibility": "coarser"})
    assert {k: v.name for k, v in runs_by_strategy(runs).items()} == {
        "full_scale[visibility=all]": "full-all-s0", "full_scale[visibility=coarser]": "full-coarser-s0", "sar": "sar-s0"}
    out = tmp_path / "probes"
    probe_best_run(best, out, io.StringIO())
    report = (out / "probes.md").read_text()
    assert "| full_scale[visibility=all] | 0 → 1 |" in report and "| full_scale[visibility=coarser] | 0 → 1 |" in report
    section = report.split("## Attention vs the paper's Fig. 3 statement")
    assert len(section) == 2 and "(visibility: all" in section[1] and "is not, so" not in section[1]
    assert "![attention vs Fig. 3](strategies/full-all-s0/alignment.png)" in section[1]
    assert (out / "strategies" / "full-all-s0" / "alignment.png").is_file()
    data = json.loads((out / "strategies" / "full-all-s0" / "probe.json").read_text())
    assert data["strategy"] == {"name": "full_scale", "visibility": "all", "source_levels": "per_scale"}
    assert data["fig3"]["verdicts"][0]["outcome"] in ("supported", "mixed", "not supported")  # testable
