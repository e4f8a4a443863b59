"""A new user's first hour through the CLI, at tiny size, in a fresh working directory.

The state the quick demo leaves (``data/synthetic64``, its tokenizer in
``runs/demo/quick/tokenizer-synthetic64/``) is made with the same CLI commands at tiny size; then
the README's commands run as written (plus tiny-size overrides). Every command runs as a user runs
it: a subprocess with W&B offline and nothing silenced, its stderr checked for library noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
QUICK_TOKENIZER = "runs/demo/quick/tokenizer-synthetic64/tokenizer.pt"

# What users saw on every run before (issue 18); none of it may reach the console.
NOISE = (
    "GPU available:",
    "TPU available:",
    "Tip: For seamless",
    "anonymous setting has no effect",
    "LeafSpec",
    "Run history:",
    "Run summary:",
    "wandb sync",
    "Experiment logs directory",
    "script_method",
    "was called before the ``update`` method",
    "\r",
)

TINY_TOKENIZER = ["tokenizer.base_ch=8", "tokenizer.encoder_ch_mult=[1,1,2,2]", "tokenizer.decoder_ch_mult=[1,1,2,2]",
                  "tokenizer.norm_num_groups=4", "data.batch_size=4", "data.val_samples=8", "trainer.max_steps=6",
                  "trainer.val_every_n_steps=3", "trainer.num_threads=1"]
# An editor run of 4 steps with validation every 10: only the validation at the end.
TINY_EDITOR = ["model.depth=2", "model.width=32", "model.num_heads=2", "text.tiny_d_model=32", "text.tiny_d_ff=64",
               "text.tiny_num_heads=2", "text.tiny_num_layers=1", "data.batch_size=4", "data.batches_per_epoch=3",
               "data.val_samples=4", "data.shuffle_buffer=8", "sampling.num_val_edits=2", "trainer.max_steps=4",
               "trainer.val_every_n_steps=10", "trainer.checkpoint_every_n_steps=10", "trainer.num_threads=1",
               "trainer.log_every_n_steps=1"]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}  # as a user's shell: W&B not silenced
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "varedit_lab.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    for text in (result.stderr, result.stdout):
        found = [noise for noise in NOISE if noise in text]
        assert not found, f"noise {found} in:\n{text}"


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory after the quick demo: data and the quick demo's tokenizer (tiny)."""
    home = tmp_path_factory.mktemp("first_hour")
    (home / "experiments").symlink_to(REPO / "experiments")  # the README's paths are relative to the clone
    made = cli(home, "data", "synth", "--out", "data/synthetic64", "--train", "48", "--val", "8", "--test", "8", "--per-shard", "12")
    assert made.returncode == 0, made.stderr
    return home


@pytest.fixture(scope="module")
def tokenizer_run(user: Path) -> subprocess.CompletedProcess:
    result = cli(user, "train", "experiments/tokenizer/synthetic64.yaml", *TINY_TOKENIZER, "output_dir=runs/demo/quick")
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_tokenizer_training_shows_progress_and_its_psnr(user: Path, tokenizer_run: subprocess.CompletedProcess) -> None:
    err = tokenizer_run.stderr
    assert "» tokenizer-synthetic64: training 6 steps" in err
    assert "step 3/6 (50 %) · train/psnr " in err and " s/step · ETA " in err
    assert "validation at step 3: val/psnr " in err
    final = [line for line in err.splitlines() if "tokenizer-synthetic64: done, 6 steps in" in line]
    assert len(final) == 1 and " · val/psnr " in final[0] and final[0].split("val/psnr ")[1].split(" dB")[0].replace(".", "").isdigit()
    assert f"tokenizer: {QUICK_TOKENIZER} (editor runs use it with tokenizer.checkpoint={QUICK_TOKENIZER})" in err and (user / QUICK_TOKENIZER).is_file()
    assert_quiet(tokenizer_run)
    # full detail in the run's console.log: the progress lines and what the console no longer shows
    log = (user / "runs/demo/quick/tokenizer-synthetic64/console.log").read_text()
    assert "GPU available:" in log and "done, 6 steps in" in log and "step 3/6" in log


@pytest.mark.slow
def test_readme_commands_after_the_quick_demo(user: Path, tokenizer_run: subprocess.CompletedProcess) -> None:
    # As written: the README's configs read runs/tokenizer-synthetic64/tokenizer.pt, which only the full demo makes.
    missing = cli(user, "train", "experiments/synthetic/sar.yaml")
    assert missing.returncode == 2
    assert "tokenizer.checkpoint=runs/tokenizer-synthetic64/tokenizer.pt: no such file" in missing.stderr
    assert "experiments/tokenizer/synthetic64.yaml" in missing.stderr  # the command that makes it
    assert f"tokenizer.checkpoint={QUICK_TOKENIZER}" in missing.stderr  # the one the quick demo made
    assert "Traceback" not in missing.stderr and not list((user / "runs").glob("sar-*"))  # no run folder left behind

    dry = cli(user, "sweep", "experiments/sweeps/conditioning_ablation.yaml", "--dry-run")
    assert dry.returncode == 0
    assert dry.stderr.startswith("warning: every run of this sweep will fail:\ntokenizer.checkpoint=")
    assert not (user / "runs" / "sweeps").exists()

    # With the quick demo's tokenizer, as the error says; 4 steps < the validation interval of 10.
    run = cli(user, "train", "experiments/synthetic/sar.yaml", f"tokenizer.checkpoint={QUICK_TOKENIZER}", *TINY_EDITOR, "name=sar-tiny")
    assert run.returncode == 0, run.stderr
    assert_quiet(run)
    folder = user / "runs" / "sar-tiny"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert {"val/loss", "val/bit_acc"} <= set(summary["metrics"])
    assert (folder / "checkpoints" / "best.ckpt").is_file() and list((folder / "val_edits").glob("step000004.png"))
    assert "sar-tiny: validation at step 4: " in run.stderr and "sar-tiny: done, 4 steps in" in run.stderr
    assert (folder / "wandb").is_dir()  # W&B ran (offline), silently

    image = user / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    edit = cli(user, "edit", "--ckpt", "runs/sar-tiny/checkpoints/last.ckpt", "--image", "in.png",
               "--instruction", "make the red circle blue", "--out", "out.png")
    assert edit.returncode == 0, edit.stderr
    assert Image.open(user / "out.png").size == (64, 64)
    assert_quiet(edit)

    probe = cli(user, "probe", "--ckpt", "runs/sar-tiny/checkpoints/last.ckpt", "--data", "data/synthetic64/val-*.tar",
                "--layers", "0", "1", "-1", "--out", "probes/")
    assert probe.returncode == 0, probe.stderr
    assert (user / "probes" / "probe.json").is_file()
    assert_quiet(probe)


@pytest.mark.slow
def test_a_sweep_shows_each_runs_progress(user: Path, tokenizer_run: subprocess.CompletedProcess) -> None:
    sweep = {
        "name": "first_hour", "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"conditioning.name": {"values": ["max_scale"]}},
        "command": ["${env}", "${interpreter}", "-m", "varedit_lab.cli", "train", "experiments/synthetic/base.yaml", "${args_no_hyphens}"],
    }
    (user / "first_hour.yaml").write_text(yaml.safe_dump(sweep))
    result = cli(user, "sweep", "first_hour.yaml", f"tokenizer.checkpoint={QUICK_TOKENIZER}", *TINY_EDITOR, "--no-report")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "    » max_scale: training 4 steps" in out and "    » max_scale: step 2/4 (50 %)" in out
    assert "    » max_scale: done, 4 steps in" in out and "[1/1] max_scale completed" in out
    log = (user / "runs/sweeps/first_hour/runs/max_scale/train.log").read_text()
    assert_quiet(subprocess.CompletedProcess([], 0, log, ""))  # no noise and no carriage-return frames in the run's log


def test_train_help_is_plain_text() -> None:
    from varedit_lab.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    text = action.choices["train"].format_help()
    assert "``" not in text and ":func:" not in text
    assert "resume=auto" in text and "console.log" in text


def test_edit_grids_are_labelled_columns_with_the_instruction_under_each_row() -> None:
    import torch

    from varedit_lab.images import labelled_grid

    red = -torch.ones(2, 3, 32, 32)  # images in [-1, 1]
    red[:, 0] = 1
    short = labelled_grid([red, red, red], ["make it blue", "remove the square"])
    long = labelled_grid([red, red, red], ["make it blue", "remove the square " * 10])
    assert short.width == long.width and long.height > short.height  # long instructions wrap onto more lines
    assert short.width >= 3 * 128  # 32 px images are enlarged to be readable
    pixels = short.load()
    assert pixels[6 + 64, 6 + 20 + 64] == (255, 0, 0)  # the first source image, below the header line
    with pytest.raises(ValueError, match="captions"):
        labelled_grid([red, red, red], ["one caption for two rows"])
