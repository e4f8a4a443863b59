"""Shared fixtures: restore global state after every test, keep W&B offline in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "reference"
FIXTURE_FILES = sorted(FIXTURES.glob("*.pt")) if FIXTURES.is_dir() else []

_RESTORED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "OMP_NUM_THREADS", "PL_GLOBAL_SEED")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_global_state(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Undo what Lightning/DDP/W&B leak: env vars, torch threads, default dtype, process groups."""
    saved_env = {k: os.environ.get(k) for k in _RESTORED_ENV}
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    wandb_dir = tmp_path_factory.mktemp("wandb")
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    _finish_wandb_run()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _finish_wandb_run() -> None:
    """A test that fits with a WandbLogger leaves its run open; the next wandb.init would reuse it."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture
def fixture_files() -> list[Path]:
    if not FIXTURE_FILES:
        pytest.skip(f"reference fixtures not found under {FIXTURES} (../shared is absent)")
    return FIXTURE_FILES


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real synthetic edit shards (64 px): 96 train samples in 8 shards, 24 val and 24 test in 2 each.

    Returns {"dir": Path, "train"/"val"/"test": brace pattern, "<split>_files": list of paths,
    "counts": {...}}. Generated once per session (about 0.3 s).
    """
    from varedit_lab.data.synth import shard_pattern, write_synthetic_shards

    out = tmp_path_factory.mktemp("synthetic_shards")
    counts = {"train": 96, "val": 24, "test": 24}
    shards = write_synthetic_shards(out, counts, image_size=64, seed=0, samples_per_shard=12)
    info: dict = {"dir": out, "counts": counts}
    for split, files in shards.items():
        info[split] = shard_pattern(out, split, len(files))
        info[f"{split}_files"] = files
    return info


@pytest.fixture(scope="session")
def tiny_editor_checkpoint(tmp_path_factory: pytest.TempPathFactory, synthetic_shards: dict) -> Path:
    """A tiny editor (2 blocks, width 32, random 32 px tokenizer, 1-layer T5) trained for 3 steps on
    the synthetic shards; its ``last.ckpt``. Shared by the edit and eval tests (a few seconds)."""
    import warnings

    from varedit_lab.config import experiments_dir, load_config
    from varedit_lab.training import train

    out = tmp_path_factory.mktemp("tiny_editor")
    cfg = load_config(
        experiments_dir() / "synthetic" / "base.yaml",
        [
            "tokenizer.checkpoint=null",
            "tokenizer.codebook_dim=8",
            "tokenizer.base_ch=8",
            "tokenizer.encoder_ch_mult=[1,1,1,1]",
            "tokenizer.decoder_ch_mult=[1,1,1,1]",
            "tokenizer.norm_num_groups=4",
            "text.tiny_d_model=32",
            "text.tiny_d_ff=64",
            "text.tiny_num_heads=2",
            "text.tiny_num_layers=1",
            "model.depth=2",
            "model.width=32",
            "model.num_heads=2",
            "model.scales=[1,2,4]",
            f"data.train_shards={synthetic_shards['train']}",
            "data.val_shards=null",
            "data.image_size=32",
            "data.batch_size=4",
            "trainer.max_steps=3",
            "trainer.checkpoint_every_n_steps=3",
            "trainer.num_threads=1",
            "trainer.checkpoint_monitor=null",
            "trainer.progress_bar=false",
            "logger.mode=disabled",
            "name=tiny",
            f"output_dir={out}",
        ],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")  # no val shards, on purpose
        directory = train(cfg)
    checkpoint = directory / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (directory / "checkpoints").iterdir())
    return checkpoint
