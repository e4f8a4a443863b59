"""EditDataModule on real shards: batch contract, rank/worker splitting, fixed validation lists,
shard-count failure, bad samples (skip vs strict), and the converters."""

from __future__ import annotations

import json
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from varedit_lab.config import DataConfig
from varedit_lab.data.convert import convert_to_shards
from varedit_lab.data.datamodule import EditDataModule
from varedit_lab.data.samples import BadSampleError, BadSampleWarning
from varedit_lab.data.shards import expand_shards, rank_slice, read_fixed_list
from varedit_lab.data.synth import SyntheticEditGenerator


def data_cfg(shards: dict, **kw) -> DataConfig:
    base = dict(train_shards=shards["train"], val_shards=shards["val"], image_size=64, batch_size=4, batches_per_epoch=3, shuffle_buffer=8, val_samples=10)
    base.update(kw)
    return DataConfig(**base)


def epoch_keys(dm: EditDataModule, epochs: int = 1) -> list[str]:
    keys = []
    for _ in range(epochs):
        for batch in dm.train_dataloader():
            keys += batch["key"]
    return keys


def png(image: Image.Image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# batches


def test_batch_contract_and_exact_masks(synthetic_shards):
    dm = EditDataModule(data_cfg(synthetic_shards))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 == len(dm.train_dataloader())  # with_epoch: fixed batches per epoch
    batch = batches[0]
    assert batch["source"].shape == batch["target"].shape == (4, 3, 64, 64) and batch["source"].dtype == torch.float32
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1
    assert batch["mask"].shape == (4, 1, 64, 64) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].all() and batch["valid"].all()
    assert len(batch["instruction"]) == len(batch["kind"]) == len(batch["key"]) == 4
    assert all(k for k in batch["kind"]) and all(isinstance(t, str) and t for t in batch["instruction"])
    # the decoded batch reproduces the generator exactly (lossless PNG, no resize at 64 px)
    gen = SyntheticEditGenerator(64, seed=0)
    for i, key in enumerate(batch["key"]):
        split, index = key.split("-")
        sample = gen.sample(split, int(index))
        src = torch.from_numpy(np.asarray(sample.source).copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(batch["source"][i], src)
        assert torch.equal(batch["mask"][i, 0], torch.from_numpy(np.asarray(sample.mask) > 0).float())
        assert batch["instruction"][i] == sample.instruction and batch["kind"][i] == sample.meta["kind"]
        changed = (batch["source"][i] != batch["target"][i]).any(0)
        assert not (changed & (batch["mask"][i, 0] == 0)).any()


def test_same_seed_same_stream(synthetic_shards):
    runs = []
    for _ in range(2):
        dm = EditDataModule(data_cfg(synthetic_shards), seed=7)
        dm.setup("fit")
        runs.append(epoch_keys(dm, epochs=2))
    assert runs[0] == runs[1]
    assert runs[0][:12] != runs[0][12:]  # the next epoch draws differently


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_samples(synthetic_shards, num_workers):
    seen = []
    for rank in range(2):
        dm = EditDataModule(data_cfg(synthetic_shards, num_workers=num_workers, batches_per_epoch=6), rank=rank, world_size=2)
        dm.setup("fit")
        keys = epoch_keys(dm)
        assert len(keys) == 24  # 6 batches x 4, equal on both ranks
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    # rank r owns shards r, r+2, ...: its keys come from those shards only
    owned = [{i for i in range(96) if (i // 12) % 2 == r} for r in range(2)]
    for r in range(2):
        assert {int(k.split("-")[1]) for k in seen[r]} <= owned[r]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_workers_read_disjoint_shards(synthetic_shards):
    # 1 rank x 4 workers over 8 shards: each worker owns 2 shards. Keys of one batch come from one
    # worker, so each batch's shard set must lie within one worker's shards.
    dm = EditDataModule(data_cfg(synthetic_shards, num_workers=4, batches_per_epoch=8, shuffle_buffer=0))
    dm.setup("fit")
    worker_shards = [{w, w + 4} for w in range(4)]
    for batch in dm.train_dataloader():
        shards = {int(k.split("-")[1]) // 12 for k in batch["key"]}
        assert any(shards <= owned for owned in worker_shards), shards


def test_too_few_shards_fails_at_setup(synthetic_shards):
    dm = EditDataModule(data_cfg(synthetic_shards, num_workers=3), rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"8 shard\(s\) but 4 rank\(s\) x 3 worker\(s\) = 12"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError):
        EditDataModule(data_cfg(synthetic_shards, train_shards=str(synthetic_shards["dir"] / "nope-{0..3}.tar"))).setup("fit")
    with pytest.raises(ValueError, match="train_shards is not set"):
        EditDataModule(DataConfig()).setup("fit")


def test_shard_specs(synthetic_shards):
    files = [str(f) for f in synthetic_shards["train_files"]]
    out = synthetic_shards["dir"]
    assert expand_shards(synthetic_shards["train"]) == files
    assert expand_shards(str(out / "train-*.tar")) == files
    assert expand_shards(files[:2]) == files[:2]
    assert len(expand_shards(str(out))) == 12  # a directory: every .tar in it
    assert expand_shards(f"{files[0]}::{files[1]}") == files[:2]
    assert expand_shards("pipe:curl -s http://x/a-{0..2}.tar") == [f"pipe:curl -s http://x/a-{i}.tar" for i in range(3)]
    # remote-style URLs go through webdataset's gopen (pipe: runs a command, as curl would)
    items, _ = read_fixed_list([f"pipe:cat {files[1]}"], 3, 64)
    assert [x["key"] for x in items] == ["train-00000012", "train-00000013", "train-00000014"]


# ---------------------------------------------------------------------------------------------
# validation / test lists


def test_validation_list_fixed_and_split_across_ranks(synthetic_shards):
    full = []
    per_rank = []
    for rank in range(3):
        dm = EditDataModule(data_cfg(synthetic_shards, val_samples=10), rank=rank, world_size=3)
        dm.setup("validate")
        batches = list(dm.val_dataloader())
        assert len(batches) == len(dm.val_dataloader()) == 1  # ceil(10 / 3) = 4 items -> one batch of 4
        keys = [k for b in batches for k, v in zip(b["key"], b["valid"]) if v]
        per_rank.append(len(batches[0]["key"]))
        full += keys
    assert per_rank == [4, 4, 4]
    assert sorted(full) == [f"val-{i:08d}" for i in range(10)]  # the first 10, each exactly once
    again = EditDataModule(data_cfg(synthetic_shards, val_samples=10))
    again.setup("validate")
    assert [k for b in again.val_dataloader() for k in b["key"]] == [f"val-{i:08d}" for i in range(10)]


def test_rank_slice_padding():
    items = [{"key": str(i), "valid": True} for i in range(5)]
    slices = [rank_slice(items, r, 2) for r in range(2)]
    assert [[x["key"] for x in s] for s in slices] == [["0", "2", "4"], ["1", "3", "0"]]
    assert [x["valid"] for x in slices[1]] == [True, True, False]


def test_test_list_all_samples(synthetic_shards):
    dm = EditDataModule(data_cfg(synthetic_shards, test_shards=synthetic_shards["test"], test_samples=0, batch_size=8))
    dm.setup("test")
    keys = [k for b in dm.test_dataloader() for k in b["key"]]
    assert keys == [f"test-{i:08d}" for i in range(24)]


# ---------------------------------------------------------------------------------------------
# bad samples


def write_bad_shards(out: Path) -> list[str]:
    """Two shards of 6 samples each: 3 good, one corrupt image, one without txt, one mis-sized mask."""
    gen = SyntheticEditGenerator(64, seed=9)
    paths = []
    for shard in range(2):
        path = str(out / f"mixed-{shard}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(6):
                s = gen.sample("train", shard * 6 + i)
                record = {"__key__": f"s{shard}_{i}", "src.png": png(s.source), "tgt.jpg": png(s.target), "txt": s.instruction, "mask.png": png(s.mask)}
                if i == 3:
                    record["src.png"] = b"not an image"
                elif i == 4:
                    del record["txt"]
                elif i == 5:
                    record["mask.png"] = png(s.mask.resize((32, 32)))
                sink.write(record)
        paths.append(path)
    return paths


def test_bad_samples_counted_skipped_and_reported(tmp_path):
    urls = write_bad_shards(tmp_path)
    with pytest.warns(BadSampleWarning, match="skipped 3 bad sample"):
        items, counts = read_fixed_list(urls[:1], 0, 64)
    assert [x["key"] for x in items] == ["s0_0", "s0_1", "s0_2"]
    assert counts == {"unreadable_image": 1, "missing_key": 1, "wrong_size": 1}

    cfg = DataConfig(train_shards=urls, image_size=64, batch_size=3, batches_per_epoch=4, shuffle_buffer=0, num_workers=1)
    dm = EditDataModule(cfg)
    dm.setup("fit")
    with pytest.warns(BadSampleWarning, match="train rank 0: skipped"):
        keys = epoch_keys(dm)
    assert len(keys) == 12 and all(k.split("_")[1] in "012" for k in keys)  # only good samples
    assert set(dm.bad_samples) == {"unreadable_image", "missing_key", "wrong_size"}  # counted in the worker


def test_strict_raises_with_key(tmp_path):
    urls = write_bad_shards(tmp_path)
    with pytest.raises(BadSampleError, match="s0_3"):
        read_fixed_list(urls, 0, 64, strict=True)
    dm = EditDataModule(DataConfig(train_shards=urls, image_size=64, batch_size=2, shuffle_buffer=0, strict=True))
    dm.setup("fit")
    with pytest.raises(BadSampleError, match=r"bad sample 's\d_[345]'"):
        epoch_keys(dm)
    dm = EditDataModule(DataConfig(train_shards=urls, image_size=64, batch_size=2, shuffle_buffer=0, strict=True, num_workers=1))
    dm.setup("fit")
    with pytest.raises(BadSampleError, match=r"bad sample 's\d_[345]'"):  # re-raised from the worker
        epoch_keys(dm)
    dm = EditDataModule(DataConfig(train_shards=urls, val_shards=urls, strict=True))
    with pytest.raises(BadSampleError):
        dm.setup("validate")


def test_unreadable_shards_fail_instead_of_spinning(tmp_path, monkeypatch):
    # a resampled stream over nothing but broken shards would loop forever; it must raise
    monkeypatch.setattr("varedit_lab.data.samples.MAX_CONSECUTIVE_BAD", 50)
    for i in range(2):
        (tmp_path / f"broken-{i}.tar").write_bytes(b"this is not a tar file" * 10)
    dm = EditDataModule(DataConfig(train_shards=str(tmp_path / "broken-{0..1}.tar"), batch_size=2))
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        epoch_keys(dm)


def test_non_square_inputs_resized_like_reference(tmp_path):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8))  # 80 wide, 40 high
    tgt = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))  # half size: resized to source
    mask = np.zeros((40, 80), np.uint8)
    mask[:, 40:] = 255  # right half
    path = str(tmp_path / "odd-0.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "odd", "src.webp": png(src), "tgt.jpeg": png(tgt), "txt": "do it", "mask.png": png(Image.fromarray(mask))})
    items, _ = read_fixed_list([path], 0, 32)
    item = items[0]
    assert item["source"].shape == (3, 32, 32) and item["target"].shape == (3, 32, 32) and item["kind"] == ""
    # cover to 64x32, centre-crop columns 16..48: the mask's right half starts at column 16 of the crop
    assert item["mask"][0, :, :16].sum() == 0 and item["mask"][0, :, 16:].all()


# ---------------------------------------------------------------------------------------------
# converters


def fabricate_images(folder: Path, n: int) -> list[str]:
    gen = SyntheticEditGenerator(64, seed=11)
    (folder / "source").mkdir(parents=True)
    (folder / "target").mkdir()
    (folder / "mask").mkdir()
    names, texts = [], {}
    for i in range(n):
        s = gen.sample("train", i)
        name = f"img.{i:03d}"  # a dot in the name: keys must be sanitised
        s.source.save(folder / "source" / f"{name}.png")
        s.target.save(folder / "target" / f"{name}.jpg", quality=95)
        if i % 2 == 0:
            s.mask.save(folder / "mask" / f"{name}.png")
        texts[name] = s.instruction
        names.append(name)
    (folder / "instructions.json").write_text(json.dumps(texts))
    return names


def test_convert_folder_roundtrip(tmp_path):
    names = fabricate_images(tmp_path / "in", 5)
    (tmp_path / "in" / "source" / "broken.png").write_bytes(b"garbage")
    with pytest.warns(BadSampleWarning):
        result = convert_to_shards(tmp_path / "in", tmp_path / "out", samples_per_shard=2)
    assert result.written == 5 and len(result.shards) == 3 and sum(result.skipped.values()) == 1
    items, _ = read_fixed_list(result.shards, 0, 64)
    assert [x["key"] for x in items] == [n.replace(".", "_") for n in names]
    assert [("mask" in x) for x in items] == [True, False, True, False, True]
    texts = json.loads((tmp_path / "in" / "instructions.json").read_text())
    assert items[1]["instruction"] == texts[names[1]]
    original = np.asarray(Image.open(tmp_path / "in" / "source" / f"{names[0]}.png").convert("RGB"))
    assert np.array_equal(items[0]["source"].permute(1, 2, 0).numpy(), original)  # bytes copied, lossless
    with pytest.raises(BadSampleError, match="broken"):
        convert_to_shards(tmp_path / "in", tmp_path / "out2", strict=True)


def test_convert_jsonl_with_resize_and_cli(tmp_path, capsys):
    from varedit_lab.cli import main

    fabricate_images(tmp_path / "in", 3)
    rows = [
        {"id": "a", "source": "in/source/img.000.png", "target": "in/target/img.000.jpg", "instruction": "first", "mask": "in/mask/img.000.png", "kind": "recolor"},
        {"id": "b", "input_image": "in/source/img.001.png", "edited_image": "in/target/img.001.jpg", "edit": "second"},
        {"id": "c", "source": "in/source/missing.png", "target": "in/target/img.002.jpg", "instruction": "third"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(BadSampleWarning, match="missing.png not found"):
        code = main(["data", "convert", "--input", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "out"), "--size", "32", "--split", "val"])
    assert code == 0 and "wrote 2 samples" in capsys.readouterr().out
    items, _ = read_fixed_list(str(tmp_path / "out" / "val-000000.tar"), 0, 32)
    assert [(x["key"], x["instruction"], x["kind"]) for x in items] == [("a", "first", "recolor"), ("b", "second", "")]
    assert items[0]["source"].shape == (3, 32, 32) and set(items[0]["mask"].unique().tolist()) <= {0, 1}
    assert main(["data", "inspect", str(tmp_path / "out")]) == 0
    assert "2 good samples (1 with masks, 0 with texture masks)" in capsys.readouterr().out
