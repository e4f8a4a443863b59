"""One real training run for tests/test_distributed.py, launched in a subprocess (never in pytest).

It runs :func:`varedit_lab.training.train` itself, with two test-only additions patched in:

- ``--data fixed``: a map-style dataset of the first N training samples in shard order instead of the
  webdataset stream. A ``DistributedSampler`` without shuffling gives rank r the samples
  r, r + W, ...: W ranks with per-rank batch B see exactly the global batches of one process with
  batch W x B, which is what the DDP-vs-one-process comparison needs.
- a :class:`Recorder` callback that writes, per rank, the sample keys trained on, the optimizer's
  parameter types and restored state, and (rank 0) full copies of the trunk weights at given steps.

``python tests/dist_worker.py [--data fixed|shards] [--snapshots 4,6] OUT CONFIG [key=value ...]`` (options first).
Lightning's ``ddp``/``fsdp2`` launcher re-runs this same command line for the other ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from varedit_lab import training
from varedit_lab.config import load_config
from varedit_lab.data.samples import collate_edits
from varedit_lab.data.shards import expand_shards, read_fixed_list


class ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class FixedEditData(pl.LightningDataModule):
    """Training: the first ``num_samples`` training samples, in order, as a plain DataLoader.
    Validation: the real :class:`EditDataModule`'s fixed, rank-split list."""

    def __init__(self, cfg: Any, num_samples: int, validation: pl.LightningDataModule) -> None:
        super().__init__()
        self.cfg, self.num_samples, self.validation = cfg, num_samples, validation
        self.items: list[dict[str, Any]] = []

    def setup(self, stage: str | None = None) -> None:
        data = self.cfg.data
        self.items, _ = read_fixed_list(expand_shards(data.train_shards), self.num_samples, data.image_size)
        if len(self.items) != self.num_samples:
            raise ValueError(f"wanted {self.num_samples} samples, found {len(self.items)}")
        if data.val_shards is not None:
            self.validation.trainer = self.trainer
            self.validation.setup("validate")

    def train_dataloader(self) -> DataLoader:
        # An explicit sampler: Lightning would otherwise inject a shuffling DistributedSampler.
        dataset = ListDataset(self.items)
        sampler = DistributedSampler(dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.cfg.data.batch_size, sampler=sampler, collate_fn=collate_edits, drop_last=True)

    def val_dataloader(self) -> Any:
        return self.validation.val_dataloader()


def full_trunk_state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The trunk's unsharded weights on CPU (a collective when they are DTensors: call on every rank)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}


class Recorder(pl.Callback):
    def __init__(self, out: Path, snapshots: list[int]) -> None:
        self.out, self.snapshots = out, snapshots
        self.keys: list[str] = []
        self.validations = 0
        self.record: dict[str, Any] = {}

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule, name: str) -> None:
        state = full_trunk_state(module)
        if trainer.is_global_zero:
            torch.save(state, self.out / f"{name}.pt")

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
        self.record.update(
            start_step=int(trainer.global_step),
            optimizer_param_types=sorted({type(p).__name__ for p in params}),
            optimizer_params=len(params),
            trunk_params=len(list(module.model.parameters())),
            restored_adam_steps=sorted(steps),
            strategy=type(trainer.strategy).__name__,
            world_size=int(trainer.world_size),
            compiled_blocks=sum(getattr(b, "_compiled_call_impl", None) is not None for b in module.model.blocks),
            trunk_checkpointing=bool(module.model.cfg.activation_checkpointing),
            precision=str(trainer.precision),
        )
        self._save(trainer, module, "start")

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.keys += list(batch["key"])

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.snapshots:
            self._save(trainer, module, f"step{trainer.global_step}")

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.validations += 1

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.record.update(keys=self.keys, end_step=int(trainer.global_step), validations=self.validations)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
        self._save(trainer, module, "final")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("config")
    parser.add_argument("--data", choices=("fixed", "shards"), default="shards")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--snapshots", default="")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    recorder = Recorder(args.out, [int(s) for s in args.snapshots.split(",") if s])

    build_callbacks, build_task = training.build_callbacks, training.build_task

    def callbacks_with_recorder(*a: Any, **k: Any):
        callbacks, timer, summary = build_callbacks(*a, **k)
        return callbacks + [recorder], timer, summary

    def task_with_fixed_data(run_cfg: Any):
        module, datamodule = build_task(run_cfg)
        return module, (FixedEditData(run_cfg, args.num_samples, datamodule) if args.data == "fixed" else datamodule)

    training.build_callbacks = callbacks_with_recorder
    training.build_task = task_with_fixed_data
    training.train(cfg, args.config)


if __name__ == "__main__":
    main(sys.argv[1:])
