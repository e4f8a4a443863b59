"""Real 2-process CPU runs: every rank reads different training samples, equal batch counts, and the
validation list is split exactly once across ranks, under ``ddp_fork`` (in process) and
``ddp_spawn`` (in a subprocess, where ``wds.split_by_node`` would silently not split).

Never ``strategy="ddp"`` here: Lightning would re-run pytest for rank 1 (ecosystem notes §2.4).
The file also runs as a script (``python tests/test_data_ddp.py --strategy ddp ...``) for the
``ddp``/torchrun path, which must not run inside pytest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from varedit_lab.config import DataConfig
from varedit_lab.data.datamodule import EditDataModule

BATCHES, BATCH_SIZE, STEPS, VAL_SAMPLES = 3, 4, 6, 10


class KeyRecorder(L.LightningModule):
    """Records the sample keys each rank trains and validates on; writes them in on_fit_end."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.out_dir = out_dir
        self.train_keys: list[str] = []
        self.val_keys: list[str] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.train_keys += batch["key"]
        return self.layer(batch["source"].mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        self.val_keys += [k for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_fit_end(self) -> None:
        record = {"train": self.train_keys, "val": self.val_keys, "val_batches": self.val_batches, "world": self.trainer.world_size}
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(record))


def fit(strategy: str, train: str, val: str, out_dir: str, num_workers: int) -> None:
    cfg = DataConfig(
        train_shards=train, val_shards=val, batch_size=BATCH_SIZE, batches_per_epoch=BATCHES, num_workers=num_workers, shuffle_buffer=8, val_samples=VAL_SAMPLES
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(KeyRecorder(out_dir), datamodule=EditDataModule(cfg, seed=0))


def check(out_dir: Path) -> None:
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    train = [r["train"] for r in ranks]
    assert [len(t) for t in train] == [STEPS * BATCH_SIZE] * 2  # equal steps on both ranks
    assert not set(train[0]) & set(train[1]), "ranks read the same training samples"
    # rank r owns shards r, r+2, ... (12 samples per shard)
    for r, keys in enumerate(train):
        assert {int(k.split("-")[1]) // 12 % 2 for k in keys} == {r}
    # validation ran once per epoch (2 epochs) with ceil(ceil(10 / 2) / 4) = 2 batches per rank each
    # time; together the ranks cover the list exactly once per validation run
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"] == 4
    val = ranks[0]["val"] + ranks[1]["val"]
    assert sorted(val) == sorted([f"val-{i:08d}" for i in range(VAL_SAMPLES)] * 2)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_fork_ranks_read_disjoint_samples(synthetic_shards, tmp_path):
    fit("ddp_fork", synthetic_shards["train"], synthetic_shards["val"], str(tmp_path), num_workers=1)
    check(tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_spawn_ranks_read_disjoint_samples(synthetic_shards, tmp_path):
    # Spawned ranks re-import this module and Lightning (most of the ~15 s); DataLoader workers
    # see no process group there, which is where wds.split_by_node would silently not split.
    fit("ddp_spawn", synthetic_shards["train"], synthetic_shards["val"], str(tmp_path), num_workers=1)
    check(tmp_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    fit(args.strategy, args.train, args.val, args.out, args.workers)
