"""Shard-based DataModule for instruction-guided edits (webdataset).

Training
    Every rank and every DataLoader worker reads its **own** shards: the full shard list is split
    by global rank (explicitly, see below) and then by worker, and each worker resamples its shards
    with replacement forever. So ranks never read the same sample, no rank runs dry (no uneven
    batch counts, no gloo hang), and an epoch is a fixed ``data.batches_per_epoch`` batches per
    rank (``with_epoch`` on the WebLoader). Train by ``trainer.max_steps``. Setup fails with a clear
    message when there are fewer shards than ``world_size x max(1, num_workers)``.

    The rank comes from ``self.trainer`` in :meth:`EditDataModule.setup`, not from
    ``torch.distributed`` inside the pipeline: under Lightning ``ddp_spawn`` the DataLoader workers
    see no process group and no ``RANK``, so ``wds.split_by_node`` silently does not split there.

Validation / test
    A fixed list: the first ``data.val_samples`` good samples of ``data.val_shards`` in shard order
    (0 = all), loaded and decoded once in ``setup`` (uint8, ``N x 2 x 3 x S^2`` bytes), so it is the
    same on every rank. Each rank evaluates its strided slice ``list[rank::world_size]``, padded to
    ``ceil(N / world_size)`` with copies of the first sample marked ``valid=False``; every rank
    therefore runs the same number of batches. Mask ``valid`` out of metrics; torchmetrics then
    syncs exact per-sample statistics.

Bad samples
    Counted by reason and skipped, with one :class:`BadSampleWarning` per epoch (training: when
    the epoch's last batch is handed out; validation: after loading the list), or raised with the
    sample key when ``data.strict=true``. Counts from worker processes travel inside the batches.
    ``EditDataModule.bad_samples`` holds the running totals of this process.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Optional

import lightning as L
import torch
import webdataset as wds

from varedit_lab.data.shards import EpochSeed, FixedBatches, ReportBadSamples, expand_shards, rank_slice, read_fixed_list, train_pipeline


def _get(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, default) if cfg is not None else default
    return default if value is None and default is not None else value


class EditDataModule(L.LightningDataModule):
    """Edit shards -> batches (see :mod:`varedit_lab.data.samples` for the batch contract).

    ``cfg`` is the ``data`` section of the run config (:class:`varedit_lab.config.DataConfig`, a
    DictConfig of it, or anything with those attributes). ``rank``/``world_size`` override what
    the trainer says (tests use this to simulate ranks without processes).
    """

    def __init__(self, cfg: Any = None, *, seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        super().__init__()
        self.train_spec = _get(cfg, "train_shards", None)
        self.val_spec = _get(cfg, "val_shards", None)
        self.test_spec = _get(cfg, "test_shards", None)
        self.image_size = int(_get(cfg, "image_size", 64))
        self.batch_size = int(_get(cfg, "batch_size", 16))
        self.num_workers = int(_get(cfg, "num_workers", 0))
        self.batches_per_epoch = int(_get(cfg, "batches_per_epoch", 100))
        self.shuffle_buffer = int(_get(cfg, "shuffle_buffer", 256))
        self.val_samples = int(_get(cfg, "val_samples", 16))
        self.test_samples = int(_get(cfg, "test_samples", 0))
        self.min_side = int(_get(cfg, "min_side", 8))
        self.strict = bool(_get(cfg, "strict", False))
        self.seed = seed
        self._rank, self._world_size = rank, world_size
        self.rank, self.world_size = 0, 1
        self.train_urls: list[str] = []
        self.val_items: list[dict[str, Any]] = []
        self.test_items: list[dict[str, Any]] = []
        self.bad_samples: Counter[str] = Counter()
        self._train_loaders = 0  # loaders built so far: each one draws a different stream

    @classmethod
    def from_config(cls, run_cfg: Any, **kwargs: Any) -> "EditDataModule":
        """From a full run config: its ``data`` section and its ``seed``."""
        return cls(run_cfg.data, seed=int(getattr(run_cfg, "seed", 0)), **kwargs)

    # -- rank and setup -------------------------------------------------------------------------

    def resolve_rank(self) -> tuple[int, int]:
        """Explicit override, else the attached trainer, else torch.distributed, else (0, 1)."""
        if self._rank is not None or self._world_size is not None:
            return int(self._rank or 0), int(self._world_size or 1)
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: Optional[str] = None) -> None:
        self.rank, self.world_size = self.resolve_rank()
        if stage in (None, "fit"):
            self._setup_train()
        if stage in (None, "fit", "validate") and self.val_spec is not None:
            self.val_items = self._load_list(self.val_spec, self.val_samples, "validation")
        if stage in (None, "test") and self.test_spec is not None:
            self.test_items = self._load_list(self.test_spec, self.test_samples, "test")

    def _setup_train(self) -> None:
        if self.train_spec is None:
            raise ValueError("data.train_shards is not set (a brace pattern, list or directory of .tar shards)")
        self.train_urls = expand_shards(self.train_spec)
        readers = self.world_size * max(1, self.num_workers)
        if len(self.train_urls) < readers:
            raise ValueError(
                f"data.train_shards has {len(self.train_urls)} shard(s) but {self.world_size} rank(s) x "
                f"{max(1, self.num_workers)} worker(s) = {readers} readers; every reader needs its own shard. "
                "Write more, smaller shards (e.g. `varedit-lab data synth --per-shard`) or lower data.num_workers."
            )

    def _load_list(self, spec: Any, limit: int, where: str) -> list[dict[str, Any]]:
        items, counts = read_fixed_list(expand_shards(spec), limit, self.image_size, self.min_side, self.strict, f"{where} shards")
        self.bad_samples.update(counts)
        if not items:
            raise ValueError(f"no usable {where} samples in {spec}")
        return rank_slice(items, self.rank, self.world_size)

    # -- loaders --------------------------------------------------------------------------------

    def train_dataloader(self) -> "ResumableEpochs":
        if not self.train_urls:
            self.setup("fit")
        epoch_seed = EpochSeed()
        pipeline = train_pipeline(
            self.train_urls,
            image_size=self.image_size,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            stream=self._train_loaders,
            shuffle_buffer=self.shuffle_buffer,
            min_side=self.min_side,
            strict=self.strict,
            epoch=epoch_seed,
        )
        self._train_loaders += 1
        # Workers are re-created every epoch so that they receive that epoch's seed.
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
        report = ReportBadSamples(self.bad_samples, self.batches_per_epoch, f"train rank {self.rank}")
        return ResumableEpochs(loader.compose(report), epoch_seed, self.batches_per_epoch, self._train_position)

    def _train_position(self) -> tuple[int, int] | None:
        """(epoch, batches of it already trained) from the trainer; restored when a run resumes."""
        trainer = self.trainer
        if trainer is None:
            return None
        return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def val_dataloader(self) -> Any:
        return FixedBatches(self.val_items, self.batch_size) if self.val_items else []

    def test_dataloader(self) -> Any:
        return FixedBatches(self.test_items, self.batch_size) if self.test_items else []

    def report(self) -> dict[str, Any]:
        """Bad samples met by this process so far, by reason (recorded in the run's summary.json)."""
        return {"bad_samples": sum(self.bad_samples.values()), "bad_samples_by_reason": dict(self.bad_samples)}

    def describe(self) -> str:
        return (
            f"EditDataModule(rank {self.rank}/{self.world_size}, {len(self.train_urls)} train shards, "
            f"{len(self.val_items)} val items/rank, {len(self.test_items)} test items/rank, "
            f"batch {self.batch_size}, {self.batches_per_epoch} batches/epoch, {self.image_size}px)"
        )


class ResumableEpochs:
    """The training loader seen by Lightning: ``length`` batches per epoch (per rank).

    Epoch e's stream is seeded by e (:class:`~varedit_lab.data.shards.EpochSeed`); when a run resumes
    mid-epoch, the batches the interrupted run already trained on are drawn and skipped, so the
    resumed run sees exactly the data of the uninterrupted one.
    """

    def __init__(self, loader: Any, epoch_seed: EpochSeed, length: int, position: Any) -> None:
        self.loader, self.epoch_seed, self.length, self.position = loader, epoch_seed, length, position
        self._epochs = 0  # used without a trainer (plain iteration)

    def __len__(self) -> int:
        return self.length

    # Lightning's resumable-loader interface: it tells Lightning that a mid-epoch resume is exact (no
    # "dataloader is not resumable" warning). The position itself is re-derived from the restored
    # trainer progress when iteration starts, which also accounts for Lightning's prefetched batch.
    def state_dict(self) -> dict[str, int]:
        position = self.position()
        epoch, done = position if position is not None else (max(0, self._epochs - 1), 0)
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epochs = int(state.get("epoch", 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = self.position()
        epoch, done = position if position is not None else (self._epochs, 0)
        self._epochs = epoch + 1
        self.epoch_seed.epoch = epoch
        for index, batch in enumerate(self.loader):
            if index >= self.length:
                break
            if index >= done:
                yield batch


__all__ = ["EditDataModule", "ResumableEpochs"]
