"""End-to-end editor training with real shards, the real Trainer and W&B offline runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from varedit_lab.config import load_config
from varedit_lab.module import EditorModule
from varedit_lab.training import train

TINY = Path(__file__).parent / "configs" / "tiny_editor.yaml"


def tiny_overrides(shards, tmp_path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}", f"output_dir={tmp_path}", *extra]


def read_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full_scale", "max_scale", "sar"])
def test_each_strategy_trains_validates_and_checkpoints(synthetic_shards, tmp_path, strategy):
    cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path, f"conditioning.name={strategy}", "logger.mode=offline"))
    run = train(cfg, TINY)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    metrics = summary["metrics"]
    for key in ("val/loss", "val/bit_acc", "val/scale2_bit_acc", "val/success", "val/preservation", "val/balance",
                "val/copy_success", "val/copy_bit_acc", "perf/seq_len"):
        assert key in metrics, key
    assert metrics["perf/seq_len"] == {"full_scale": 42, "max_scale": 37, "sar": 37}[strategy]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "val_edits").glob("*.png"))
    assert list((run / "wandb").glob("offline-run-*")), "a real offline W&B run directory is written"
    # the checkpoint rebuilds the editor without the frozen parts stored in it
    module = EditorModule.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.strategy.name == strategy


def test_nan_loss_stops_with_a_clear_message(synthetic_shards, tmp_path):
    cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path, "optim.lr=1e12", "optim.grad_clip=0", "trainer.max_steps=20",
                                           "optim.warmup_steps=0", "trainer.val_every_n_steps=100"))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        train(cfg, TINY)
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and "non-finite training loss" in summary["error"]


def _train_cmd(shards, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "varedit_lab.cli", "train", str(TINY), *tiny_overrides(shards, out, "name=resume", "trainer.val_every_n_steps=100",
                                                                                         "trainer.deterministic=true", *extra)]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(synthetic_shards, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_train_cmd(synthetic_shards, tmp_path / "ref", "trainer.max_steps=12"), env=env, timeout=300,
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref_losses = read_losses(tmp_path / "ref" / "resume")

    # Same run, killed (SIGKILL: no cleanup) once a mid-epoch checkpoint exists (step 5 of epochs of 3).
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(synthetic_shards, killed_dir, "trainer.max_steps=12"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "resume" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert last.exists(), "the run never wrote a checkpoint"
    resumed = subprocess.run(_train_cmd(synthetic_shards, killed_dir, "trainer.max_steps=12", "resume=auto"), env=env, timeout=300,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_losses = read_losses(killed_dir / "resume")
    steps = sorted(resumed_losses)
    # The whole history survives the kill and the resume: every step once (CSV steps are 0-based).
    assert steps == list(range(12)), steps
    with open(killed_dir / "resume" / "metrics.csv") as handle:
        logged = [row["step"] for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(logged) == len(set(logged)), f"duplicate rows: {logged}"
    for step in steps:
        assert resumed_losses[step] == pytest.approx(ref_losses[step], abs=1e-6), (step, resumed_losses, ref_losses)


def test_latent_cache_returns_the_tokenizer_latents(synthetic_shards, tmp_path):
    from varedit_lab.data.datamodule import EditDataModule

    cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path))
    module = EditorModule(cfg).train()
    data = EditDataModule(cfg.data, seed=0, rank=0, world_size=1)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    first, second = next(loader), next(loader)
    for batch in (first, second, first):  # the third call is served from the cache
        source, target = module.latents(batch)
        torch.testing.assert_close(source, module.tokenizer.encode_latent(batch["source"]), rtol=0, atol=1e-6)
        torch.testing.assert_close(target, module.tokenizer.encode_latent(batch["target"]), rtol=0, atol=1e-6)
    assert len(module._latent_cache) == len(set(first["key"]) | set(second["key"]))
