"""Trainer options from config, W&B mode precedence, and SLURM requeue checkpoints (real Trainer, tiny)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import WandbLogger

from varedit_lab.config import ConfigError, experiments_dir, load_config
from varedit_lab.runs import RunFolder
from varedit_lab.training import build_loggers, newest_checkpoint, train, wandb_mode

TINY = Path(__file__).parent / "configs" / "tiny_editor.yaml"


def tiny_overrides(shards, out: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}", f"output_dir={out}", *extra]


# -- W&B mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_mode", "env", "expected"),
    [
        ("offline", {}, "offline"),
        ("online", {}, "online"),
        ("offline", {"WANDB_MODE": "online"}, "online"),
        ("offline", {"WANDB_SWEEP_ID": "abc123"}, "online"),  # started by `wandb agent`
        ("online", {"WANDB_MODE": "offline"}, "offline"),
        ("offline", {"WANDB_SWEEP_ID": "abc123", "WANDB_MODE": "disabled"}, "disabled"),
        ("disabled", {"WANDB_SWEEP_ID": "abc123", "WANDB_MODE": "online"}, "disabled"),
    ],
)
def test_wandb_mode_precedence_and_the_logger_built(config_mode, env, expected, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, [f"logger.mode={config_mode}", "logger.log_model=all"])
    assert wandb_mode(cfg) == expected
    wandb_loggers = [lg for lg in build_loggers(cfg, tmp_path, "run") if isinstance(lg, WandbLogger)]
    if expected == "disabled":
        assert wandb_loggers == []
    else:  # built, not started: no network is touched
        (logger,) = wandb_loggers
        assert logger._offline is (expected == "offline")
        assert logger._log_model == ("all" if expected == "online" else False)  # artifacts need a server


# -- trainer.extra, callbacks, debug preset ------------------------------------------------------


def test_trainer_extra_typo_names_the_closest_trainer_argument():
    with pytest.raises(ConfigError, match=r"trainer\.extra\.limit_val_batchez.*Did you mean 'trainer\.extra\.limit_val_batches'"):
        load_config(None, ["trainer.extra.limit_val_batchez=1"])
    with pytest.raises(ConfigError, match=r"'trainer\.extra\.max_steps': set it with 'trainer\.max_steps'"):
        load_config(None, ["trainer.extra.max_steps=3"])


def test_callbacks_by_class_path_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\]\.class_path.*cannot import"):
        load_config(None, ["trainer.callbacks=[{class_path: lightning.pytorch.callbacks.NoSuchThing}]"])
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\[0\]\.init_args.*durationn"):
        load_config(None, ["trainer.callbacks=[{class_path: lightning.pytorch.callbacks.Timer, init_args: {durationn: 1}}]"])
    with pytest.raises(ConfigError, match=r"not a lightning Callback"):
        load_config(None, ["trainer.callbacks=[{class_path: collections.OrderedDict}]"])
    with pytest.raises(ConfigError, match=r"'logger\.log_model' is 'sometimes'"):
        load_config(None, ["logger.log_model=sometimes"])


@pytest.mark.slow
def test_debug_preset_trains_and_validates_one_batch_with_a_configured_callback(synthetic_shards, tmp_path, monkeypatch):
    assert (experiments_dir() / "trainer" / "debug.yaml").is_file()
    timer = "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.Timer, init_args: {duration: '00:00:10:00'}}]"
    cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path, "trainer=debug", "name=debug", timer, "logger.mode=disabled"))
    seen = {}
    original = Timer.on_train_end

    def spy(self, trainer, pl_module):  # the configured callback really runs inside the real Trainer
        seen.update(steps=trainer.global_step, val_batches=trainer.num_val_batches, limit=trainer.limit_val_batches)
        return original(self, trainer, pl_module)

    monkeypatch.setattr(Timer, "on_train_end", spy)
    run = train(cfg, TINY)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert seen["steps"] == 1 and seen["limit"] == 1 and seen["val_batches"] == [1]
    assert "val/loss" in summary["metrics"]


# -- SLURM requeue -------------------------------------------------------------------------------


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    """A one-task SLURM job, and an `scontrol` that records the requeue and then ends the job (as SLURM would)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/requeued\nkill -9 $PPID\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "varedit", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    return {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigusr1_under_slurm_writes_an_hpc_checkpoint_that_resume_auto_continues(synthetic_shards, tmp_path):
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "varedit_lab.cli", "train", str(TINY),
               *tiny_overrides(synthetic_shards, out, "name=requeue", "trainer.max_steps=400", "trainer.val_every_n_steps=1000",
                               "trainer.checkpoint_every_n_steps=1000", "trainer.progress_bar=false", "resume=auto")]
    env = _slurm_env(tmp_path)
    folder = RunFolder(out / "requeue")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (folder.metrics.is_file() and folder.metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` delivers before the time limit
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    hpc = folder.path / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and not folder.last_checkpoint.exists()
    assert newest_checkpoint(folder) == hpc

    import torch

    saved_step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert saved_step >= 1
    command[command.index("trainer.max_steps=400")] = f"trainer.max_steps={saved_step + 2}"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(folder.summary_path.read_text())
    assert summary["status"] == "completed" and summary["steps"] == saved_step + 2
    assert f"(resuming at step {saved_step})" in resumed.stderr  # the progress line on the console
    assert f"Restored all states from the checkpoint at {hpc}" in folder.console_log.read_text()  # Lightning's, in the log


def test_slurm_template_asks_for_the_requeue_signal_and_resumes():
    text = (experiments_dir() / "launch" / "slurm.sbatch").read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--signal=SIGUSR1@90" in directives and "--requeue" in directives
    # the signal goes to the job steps (no "B:"), i.e. to Lightning in every task
    assert "resume=auto" in text and "--signal=B:" not in text
