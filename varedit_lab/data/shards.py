"""Shard lists and webdataset pipelines (no Lightning import: the CLI and tests use them directly).

The training stream of one DataLoader worker is::

    SimpleShardList(all shards, fixed order)
      -> RankSplitter(rank, world_size)   explicit rank: under ddp_spawn wds.split_by_node cannot see it
      -> wds.split_by_worker              every (rank, worker) owns disjoint shards
      -> ResampleShards                   with replacement, forever: no rank runs dry
      -> wds.tarfile_to_samples           handler = BadSampleTracker.handle
      -> SeededShuffle                    sample-level shuffle buffer
      -> wds.map(DecodeEditSample)        handler = BadSampleTracker.handle
      -> wds.batched(collate_edits)       full batches only
      -> AttachBadCounts                  worker-side counts ride along to the main process

Validation and test read a fixed list once (:func:`read_fixed_list`) and slice it per rank
(:func:`rank_slice`); :class:`FixedBatches` iterates it.
"""

from __future__ import annotations

import glob
import math
import random
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls

from varedit_lab.data.samples import BadSampleTracker, DecodeEditSample, collate_edits, warn_summary

BAD_KEY = "_bad_samples"  # batch entry carrying worker-side bad-sample counts to the main process


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # one letter: a Windows drive


def expand_shards(spec: Any, check_exists: bool = True) -> list[str]:
    """Shard spec -> list of URLs, in a fixed order.

    ``spec`` is a brace pattern (``dir/train-{000000..000009}.tar``), several joined by ``::``, a
    local glob (``dir/train-*.tar``, sorted), a directory (every ``*.tar`` in it, sorted: note that
    ``data synth`` puts all splits in one directory), a URL (``pipe:curl -s ...``, ``http://...``),
    or a list of any of these. Local files must exist (checked here: a clear error instead of a stall).
    """
    if spec is None:
        return []
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if _is_local(text) and Path(text).is_dir():
            urls = sorted(str(p) for p in Path(text).glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"no *.tar shards in directory {text}")
            return urls
        if _is_local(text) and any(c in text for c in "*?["):  # a glob, e.g. out/val-*.tar
            urls = sorted(glob.glob(text))
            if not urls:
                raise FileNotFoundError(f"no shards match {text}")
            return urls
        urls = list(expand_urls(text))
    else:
        urls = [u for item in spec for u in expand_shards(item, check_exists=False)]
    if check_exists:
        missing = [u for u in urls if _is_local(u) and not Path(u.removeprefix("file:")).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]} (spec: {spec})")
    return urls


class RankSplitter:
    """Node splitter with an explicit rank (``wds.split_by_node`` reads it from the environment)."""

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        yield from islice(src, self.rank, None, self.world_size)


def clear_splits(out_dir: Path, splits: Iterable[str], overwrite: bool) -> None:
    """Make room for new ``{split}-*.tar`` shards in ``out_dir``: refuse (before deleting anything)
    when any split already has shards, unless ``overwrite``."""
    stale = {split: sorted(Path(out_dir).glob(f"{split}-*.tar")) for split in splits}
    for split, paths in stale.items():
        if paths and not overwrite:
            raise FileExistsError(f"{out_dir} already holds {len(paths)} '{split}' shards; pass overwrite=True (--overwrite)")
    for paths in stale.values():
        for path in paths:
            path.unlink()


def _worker() -> tuple[int, int, Optional[int]]:
    info = torch.utils.data.get_worker_info()
    return (0, 1, None) if info is None else (info.id, info.num_workers, info.seed)


class EpochSeed:
    """The epoch the training stream is drawing, shared by its seeded stages.

    Set in the main process before each epoch's iterator is created (workers are not persistent, so
    each epoch pickles the current value into them). Seeding by epoch rather than by iterator
    count or torch's global RNG makes the stream a function of (seed, rank, worker, epoch): a run
    resumed from a checkpoint draws exactly the data of the uninterrupted run.
    """

    def __init__(self) -> None:
        self.epoch = 0


class ResampleShards:
    """Draw shards with replacement, forever, from the shards that reach this worker.

    The RNG is seeded from (seed, stream, rank, worker, epoch): reproducible, resumable, and
    different on every rank, worker and epoch.
    """

    def __init__(self, seed: int, rank: int, stream: int = 0, epoch: EpochSeed | None = None) -> None:
        self.seed, self.rank, self.stream = seed, rank, stream
        self.epoch = epoch or EpochSeed()

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shards = list(src)
        worker, num_workers, _ = _worker()
        if not shards:
            raise ValueError(f"rank {self.rank} worker {worker}/{num_workers} received no shards; need at least one shard per rank x worker")
        rng = random.Random(f"{self.seed}/{self.stream}/{self.rank}/{worker}/{self.epoch.epoch}")
        while True:
            yield dict(shards[rng.randrange(len(shards))])


class SeededShuffle:
    """``wds.shuffle`` with a buffer RNG derived like :class:`ResampleShards` (reproducible)."""

    def __init__(self, bufsize: int, seed: int, rank: int, stream: int = 0, epoch: EpochSeed | None = None) -> None:
        self.bufsize, self.seed, self.rank, self.stream = bufsize, seed, rank, stream
        self.epoch = epoch or EpochSeed()

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        worker, _, _ = _worker()
        seed = f"shuffle/{self.seed}/{self.stream}/{self.rank}/{worker}/{self.epoch.epoch}"
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=random.Random(seed))(src)


class AttachBadCounts:
    """Last worker-side stage: put the tracker's counts since the previous batch into the batch."""

    def __init__(self, tracker: BadSampleTracker) -> None:
        self.tracker = tracker

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in src:
            batch[BAD_KEY] = self.tracker.drain()
            yield batch


class ReportBadSamples:
    """Main-process stage: pop the counts from each batch, warn once per epoch, keep totals."""

    def __init__(self, totals: Counter[str], epoch_batches: int, where: str) -> None:
        self.totals, self.epoch_batches, self.where = totals, epoch_batches, where

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        counts: Counter[str] = Counter()
        first: dict[str, str] = {}
        reported = False
        n = 0
        try:
            for batch in src:
                bad = batch.pop(BAD_KEY, None) or {}
                counts.update(bad.get("counts", {}))
                for reason, message in bad.get("first", {}).items():
                    first.setdefault(reason, message)
                n += 1
                if n == self.epoch_batches:
                    # with_epoch stops pulling after this batch, so report before handing it out
                    self.totals.update(counts)
                    warn_summary(counts, first, self.where)
                    reported = True
                yield batch
        except Exception:
            # A failing worker (e.g. strict mode) would otherwise be joined only when the loader
            # is garbage-collected, which torch bounds by a 5 s timeout: stop the workers now.
            shutdown = getattr(src, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            raise
        finally:
            if not reported:
                self.totals.update(counts)
                warn_summary(counts, first, self.where)


def train_pipeline(
    urls: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    stream: int = 0,
    shuffle_buffer: int = 256,
    min_side: int = 8,
    strict: bool = False,
    epoch: EpochSeed | None = None,
) -> wds.DataPipeline:
    """The per-worker training stream: split -> resample -> read -> shuffle -> decode -> batch.

    ``stream`` distinguishes loaders built with the same seed (e.g. one per epoch when Lightning
    reloads dataloaders) so that they draw different shards.
    """
    if isinstance(urls, (str, Path)):
        urls = expand_shards(urls)
    tracker = BadSampleTracker(strict=strict)
    decode = DecodeEditSample(image_size, min_side=min_side, tracker=tracker)
    stages: list[Any] = [
        wds.SimpleShardList(list(urls)),
        RankSplitter(rank, world_size),
        wds.split_by_worker,
        ResampleShards(seed, rank, stream, epoch),
        wds.tarfile_to_samples(handler=tracker.handle),
    ]
    if shuffle_buffer > 1:
        stages.append(SeededShuffle(shuffle_buffer, seed, rank, stream, epoch))
    stages += [
        wds.map(decode, handler=tracker.handle),
        wds.batched(batch_size, collation_fn=collate_edits, partial=False),
        AttachBadCounts(tracker),
    ]
    return wds.DataPipeline(*stages)


def read_fixed_list(
    urls: Sequence[str], limit: int, image_size: int, min_side: int = 8, strict: bool = False, where: str = "validation"
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The first ``limit`` good samples (0 = all) of ``urls`` (a list, or any spec) in shard order, decoded."""
    if isinstance(urls, (str, Path)):
        urls = expand_shards(urls)
    tracker = BadSampleTracker(strict=strict)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(handler=tracker.handle),
        wds.map(DecodeEditSample(image_size, min_side=min_side, tracker=tracker), handler=tracker.handle),
    )
    items = list(islice(pipeline, limit) if limit > 0 else pipeline)
    counts = Counter(tracker.counts)
    warn_summary(counts, tracker.first, where)
    return items, counts


def rank_slice(items: Sequence[dict[str, Any]], rank: int, world_size: int) -> list[dict[str, Any]]:
    """``items[rank::world_size]`` padded to ``ceil(len / world_size)`` with invalid copies."""
    if not items:
        return []
    mine = list(items[rank::world_size])
    per_rank = math.ceil(len(items) / world_size)
    pad = dict(items[0], valid=False)
    return mine + [pad] * (per_rank - len(mine))


class FixedBatches:
    """A finite, deterministic loader over pre-decoded examples (no sampler for Lightning to swap)."""

    def __init__(self, items: Sequence[dict[str, Any]], batch_size: int) -> None:
        self.items, self.batch_size = list(items), batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.items), self.batch_size):
            yield collate_edits(self.items[start : start + self.batch_size])


__all__ = [
    "AttachBadCounts",
    "BAD_KEY",
    "FixedBatches",
    "RankSplitter",
    "ReportBadSamples",
    "EpochSeed",
    "ResampleShards",
    "SeededShuffle",
    "expand_shards",
    "rank_slice",
    "read_fixed_list",
    "train_pipeline",
]
