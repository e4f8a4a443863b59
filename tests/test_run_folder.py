"""Nothing lost: run folders across reruns, resumes and bad checkpoints (real Trainer, tiny runs)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from varedit_lab.checkpoint_io import CheckpointError
from varedit_lab.config import ConfigError, load_config
from varedit_lab.module import EditorModule
from varedit_lab.runs import RunFolder
from varedit_lab.training import train
from tests.test_data_loading import write_bad_shards

TINY = Path(__file__).parent / "configs" / "tiny_editor.yaml"


def tiny(shards: dict, out: Path, *extra: str):
    return load_config(TINY, [f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}", f"output_dir={out}",
                              "name=run", "sampling.num_val_edits=1", *extra])


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def csv_steps(path: Path, column: str = "train/loss") -> list[int]:
    with open(path) as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get(column)]


def test_rerun_without_resume_moves_the_earlier_attempt_aside(synthetic_shards, tmp_path):
    first = train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1"))
    folder = RunFolder(first)
    old_metrics = folder.metrics.read_bytes()
    second = train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1"))
    assert second == first
    # One current run: last.ckpt is the new run's model, no last-v1.ckpt next to it ...
    assert sorted(p.name for p in folder.checkpoints.glob("last*")) == ["last.ckpt"]
    assert torch.load(folder.last_checkpoint, weights_only=True)["global_step"] == 4
    # ... and nothing of the first attempt is lost.
    attempt = folder.previous / "attempt-1"
    assert (attempt / "metrics.csv").read_bytes() == old_metrics
    assert torch.load(attempt / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads((attempt / "summary.json").read_text())["steps"] == 2


def test_resume_keeps_history_and_allows_safe_changes(synthetic_shards, tmp_path):
    run = train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"))
    folder = RunFolder(run)
    assert csv_steps(folder.metrics) == [0, 1, 2, 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=7", "optim.lr=1e-3", "resume=auto"))
    assert not [w for w in caught if "not resumable" in str(w.message)], "Lightning knows the loader resumes exactly"
    assert csv_steps(folder.metrics) == list(range(7))  # before and after the resume, each once
    summary = folder.read_summary()
    assert summary["status"] == "completed" and summary["steps"] == 7
    # A finished run resumed again trains nothing and changes nothing.
    before = snapshot(run)
    train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=7", "optim.lr=1e-3", "resume=auto"))
    assert snapshot(run) == before


@pytest.mark.parametrize("change", ["conditioning.name=max_scale", "model.scales=[1,2]", "model.width=48"])
def test_a_resume_that_changes_the_model_is_refused_and_touches_nothing(synthetic_shards, tmp_path, change):
    run = train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=2"))
    before = snapshot(run)
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: "):
        train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=4", change, "resume=auto"))
    assert snapshot(run) == before


def test_nonfinite_weights_are_refused_on_resume_and_edit(synthetic_shards, tmp_path):
    run = RunFolder(train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=2")))
    checkpoint = torch.load(run.last_checkpoint, weights_only=True)
    checkpoint["state_dict"]["model.head.bias"][0] = float("nan")
    torch.save(checkpoint, run.last_checkpoint)
    before = snapshot(run.path)
    with pytest.raises(CheckpointError, match=r"model\.head\.bias"):
        train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=4", "resume=auto"))
    assert snapshot(run.path) == before
    with pytest.raises(CheckpointError, match=r"model\.head\.bias"):
        EditorModule.from_checkpoint(run.last_checkpoint)


def test_a_run_shorter_than_its_validation_interval_still_validates(synthetic_shards, tmp_path):
    run = RunFolder(train(tiny(synthetic_shards, tmp_path, "trainer.max_steps=2", "trainer.val_every_n_steps=100")))
    metrics = run.read_summary()["metrics"]
    assert "val/loss" in metrics and "val/balance" in metrics
    assert run.best_checkpoint.is_file() and list(run.val_edits.glob("*.png"))


def test_bad_samples_are_recorded_in_the_summary(synthetic_shards, tmp_path):
    (tmp_path / "bad").mkdir()
    shards = {"train": write_bad_shards(tmp_path / "bad"), "val": synthetic_shards["val"]}
    shards["train"] = "::".join(shards["train"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = RunFolder(train(tiny(shards, tmp_path, "trainer.max_steps=2", "data.batch_size=2")))
    data = run.read_summary()["data"]
    assert data["bad_samples"] > 0 and set(data["bad_samples_by_reason"]) <= {"unreadable_image", "missing_key", "wrong_size"}


def test_a_kill_between_checkpoint_and_csv_row_loses_no_step(tmp_path):
    """Lightning saves ``last.ckpt`` in on_train_batch_end and writes that step's CSV row just after: the
    checkpoint carries the row, and the resumed history puts it back when the kill came in between."""
    from varedit_lab.training import HistoryCSVLogger

    with open(tmp_path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "step", "train/loss"])
        writer.writeheader()
        writer.writerows([{"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1)} for s in range(4)])
    pending = {"step": 4, "epoch": 1, "train/loss": 0.2}
    logger = HistoryCSVLogger(tmp_path, keep_until_step=4, pending_row=pending)
    logger.log_metrics({"train/loss": 1 / 6}, step=5)
    logger.save()
    assert csv_steps(tmp_path / "metrics.csv") == [0, 1, 2, 3, 4, 5]
    # when the row did reach the disk it is not written twice
    logger = HistoryCSVLogger(tmp_path, keep_until_step=5, pending_row={"step": 5, "epoch": 1, "train/loss": 1 / 6})
    logger.log_metrics({"train/loss": 1 / 7}, step=6)
    logger.save()
    assert csv_steps(tmp_path / "metrics.csv") == [0, 1, 2, 3, 4, 5, 6]
