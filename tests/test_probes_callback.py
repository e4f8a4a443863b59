"""ProbeCallback in a real (tiny) Lightning fit of the editor on synthetic shards."""

from __future__ import annotations

import csv
import json

import pytest

from varedit_lab.config import experiments_dir, load_config
from varedit_lab.probes.callback import ProbeCallback
from varedit_lab.training import build_loggers, build_task, build_trainer


@pytest.mark.slow
def test_probe_callback_logs_scalars_and_images(tmp_path, synthetic_shards):
    cfg = load_config(
        experiments_dir() / "synthetic" / "base.yaml",
        [
            "tokenizer.checkpoint=null",
            "model.depth=2",
            "model.width=64",
            "model.num_heads=2",
            f"data.train_shards={synthetic_shards['train']}",
            f"data.val_shards={synthetic_shards['val']}",
            "data.batch_size=4",
            "data.val_samples=4",
            "trainer.max_steps=4",
            "trainer.val_every_n_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "sampling.num_val_edits=1",
            f"output_dir={tmp_path}",
        ],
    )
    module, datamodule = build_task(cfg)
    callback = ProbeCallback(every_n_val=2, layers=[0, -1], num_samples=2)
    run = tmp_path / "run"
    trainer = build_trainer(cfg, run, [callback], build_loggers(cfg, run, "probe-test"))
    trainer.fit(module, datamodule=datamodule)

    # two validations (steps 2 and 4); every second one probes: once, at step 4
    assert callback.val_epochs == 2 and callback.last_dir == run / "probes" / "step000004"
    assert sorted(p.name for p in callback.last_dir.iterdir()) == ["attention_maps.png", "block_mass.png", "locality.png", "probe.json"]
    data = json.loads((callback.last_dir / "probe.json").read_text())
    assert data["strategy"]["name"] == "sar" and data["config"]["global_step"] == 4
    assert sorted(data["layers"]) == ["0", "1"] and data["config"]["num_heads"] == 2
    assert all(m.probe is None for m in module.model.modules() if hasattr(m, "probe"))
    assert module.model.training  # probe_model restored the mode it found

    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if key.startswith("probe/") and value}
    assert "probe/layer1/locality/tgt4@8x8" in logged and "probe/layer0/source_mass/sos" in logged
    media = list((run / "wandb").glob("offline-run-*/files/media/images/probe/*.png"))
    assert {p.name.split("_")[0] for p in media} >= {"block", "locality", "attention"}
