"""Synthetic edit benchmark: determinism, exact masks per edit kind, rejection of degenerate edits."""

from __future__ import annotations

import json
import tarfile
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from varedit_lab.data.synth import (
    EDIT_KINDS,
    RejectedEdit,
    Scene,
    Shape,
    SyntheticEditGenerator,
    build_edit,
    write_synthetic_shards,
)


def arrays(sample):
    src, tgt = np.asarray(sample.source), np.asarray(sample.target)
    return src, tgt, np.asarray(sample.mask) > 0, np.any(src != tgt, axis=-1)


def test_deterministic_and_order_independent():
    a = SyntheticEditGenerator(64, seed=3)
    b = SyntheticEditGenerator(64, seed=3)
    forward = [a.sample("train", i) for i in range(12)]
    backward = [b.sample("train", i) for i in reversed(range(12))][::-1]
    for x, y in zip(forward, backward):
        assert x.instruction == y.instruction and x.meta == y.meta
        assert np.array_equal(np.asarray(x.source), np.asarray(y.source))
        assert np.array_equal(np.asarray(x.target), np.asarray(y.target))
        assert np.array_equal(np.asarray(x.mask), np.asarray(y.mask))
    other_seed = SyntheticEditGenerator(64, seed=4).sample("train", 0)
    other_split = a.sample("val", 0)
    assert not np.array_equal(np.asarray(other_seed.source), np.asarray(forward[0].source))
    assert not np.array_equal(np.asarray(other_split.source), np.asarray(forward[0].source))


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_mask_exact_for_every_kind(kind):
    gen = SyntheticEditGenerator(64, seed=0, kinds=[kind])
    for index in range(25):
        sample = gen.sample("train", index)
        assert sample.meta["kind"] == kind
        assert sample.source.mode == "RGB" and sample.mask.mode == "L" and sample.source.size == (64, 64)
        assert set(np.unique(np.asarray(sample.mask))) <= {0, 255}
        src, tgt, mask, changed = arrays(sample)
        assert mask.any(), sample.instruction
        assert not (changed & ~mask).any(), f"change outside the mask: {sample.instruction}"
        assert (changed & mask).sum() >= 0.5 * mask.sum()
        if kind in ("recolor", "background"):  # every masked pixel changes colour: mask == diff
            assert np.array_equal(mask, changed), sample.instruction
        if kind == "background":
            bg_src, bg_tgt = src[mask], tgt[mask]
            assert len(np.unique(bg_src, axis=0)) == 1 and len(np.unique(bg_tgt, axis=0)) == 1
            assert sample.meta["target_scene"]["background"] in sample.instruction


def test_instructions_name_the_edit():
    gen = SyntheticEditGenerator(64, seed=1)
    for index in range(60):
        sample = gen.sample("test", index)
        scene = sample.meta["source_scene"]
        kind = sample.meta["kind"]
        if kind in ("recolor", "remove", "move", "resize"):
            obj = scene["objects"][sample.meta["ref"]]
            assert f"{obj['color']} {obj['shape']}" in sample.instruction
        if kind == "add":
            new = sample.meta["target_scene"]["objects"][-1]
            assert f"{new['color']} {new['shape']}" in sample.instruction
            assert " a orange" not in sample.instruction  # "an orange ..."


def test_works_at_256_and_kinds_are_balanced():
    gen = SyntheticEditGenerator(256, seed=0)
    kinds = []
    for index in range(12):
        sample = gen.sample("val", index)
        _, _, mask, changed = arrays(sample)
        assert sample.source.size == (256, 256) and mask.any() and not (changed & ~mask).any()
        kinds.append(sample.meta["kind"])
    assert sorted(kinds) == sorted(EDIT_KINDS * 2)


def test_ambiguous_reference_rejected():
    a = Shape("circle", "red", 0.25, 0.3, 0.12)
    b = Shape("circle", "red", 0.7, 0.7, 0.12)
    scene = Scene("white", (a, b))
    target = Scene("white", (Shape("circle", "blue", 0.25, 0.3, 0.12), b))
    with pytest.raises(RejectedEdit) as err:
        build_edit(scene, target, "recolor", 0, "make the red circle blue", 64)
    assert err.value.reason == "ambiguous"
    # the same edit without the twin is accepted
    ok = build_edit(Scene("white", (a,)), Scene("white", (target.objects[0],)), "recolor", 0, "make the red circle blue", 64)
    assert np.asarray(ok.mask).any()


def test_add_that_duplicates_a_name_rejected():
    a = Shape("square", "green", 0.3, 0.3, 0.12)
    new = Shape("square", "green", 0.75, 0.75, 0.12)
    with pytest.raises(RejectedEdit) as err:
        build_edit(Scene("gray", (a,)), Scene("gray", (a, new)), "add", 1, "add a green square at the bottom right", 64)
    assert err.value.reason == "ambiguous"


def test_hidden_object_rejected():
    small = Shape("circle", "red", 0.5, 0.5, 0.08)
    cover = Shape("square", "blue", 0.5, 0.5, 0.2)  # drawn later, hides the circle
    scene = Scene("white", (small, cover))
    target = Scene("white", (Shape("circle", "green", 0.5, 0.5, 0.08), cover))
    with pytest.raises(RejectedEdit) as err:
        build_edit(scene, target, "recolor", 0, "make the red circle green", 64)
    assert err.value.reason in ("occluded", "too_small")


def test_out_of_bounds_move_rejected():
    obj = Shape("triangle", "yellow", 0.8, 0.5, 0.15)
    moved = Shape("triangle", "yellow", 1.1, 0.5, 0.15)
    with pytest.raises(RejectedEdit) as err:
        build_edit(Scene("black", (obj,)), Scene("black", (moved,)), "move", 0, "move the yellow triangle to the right", 64)
    assert err.value.reason == "out_of_bounds"


def test_generator_counts_rejections():
    gen = SyntheticEditGenerator(64, seed=0)
    for index in range(60):
        gen.sample("train", index)
    assert sum(gen.rejections.values()) > 0 and set(gen.rejections) <= {"ambiguous", "occluded", "too_small", "out_of_bounds", "empty_mask", "small_change"}


def test_shards_roundtrip_exact(tmp_path):
    shards = write_synthetic_shards(tmp_path, {"train": 10, "val": 3}, image_size=64, seed=5, samples_per_shard=4)
    assert [len(v) for v in shards.values()] == [3, 1]
    manifest = json.loads((tmp_path / "synth.json").read_text())
    assert manifest["shards"]["train"].endswith("train-{000000..000002}.tar")
    gen = SyntheticEditGenerator(64, seed=5)
    with tarfile.open(shards["train"][1]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = "train-00000004"
    assert {f"{key}.{ext}" for ext in ("src.png", "tgt.png", "mask.png", "txt", "json")} <= set(members)
    expected = gen.sample("train", 4)
    for ext, image in (("src.png", expected.source), ("tgt.png", expected.target), ("mask.png", expected.mask)):
        assert np.array_equal(np.asarray(Image.open(BytesIO(members[f"{key}.{ext}"]))), np.asarray(image))
    assert members[f"{key}.txt"].decode() == expected.instruction
    meta = json.loads(members[f"{key}.json"])
    assert meta["kind"] == expected.meta["kind"] and (meta["split"], meta["index"], meta["seed"]) == ("train", 4, 5)
    with pytest.raises(FileExistsError):
        write_synthetic_shards(tmp_path, {"train": 2})
    assert len(write_synthetic_shards(tmp_path, {"train": 2}, overwrite=True)["train"]) == 1
    assert len(list(tmp_path.glob("train-*.tar"))) == 1


def test_cli_synth(tmp_path, capsys):
    from varedit_lab.cli import main

    code = main(["data", "synth", "--out", str(tmp_path), "--train", "8", "--val", "4", "--test", "0", "--per-shard", "4", "--size", "64", "--seed", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "train-{000000..000001}.tar" in out and "samples/s" in out
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]


def test_data_subcommands_can_be_added(monkeypatch):
    from varedit_lab.cli import build_parser, data_cmd

    monkeypatch.setattr(data_cmd, "_EXTRA", [])

    def register(data_sub):
        data_sub.add_parser("count-pixels").set_defaults(func=lambda args: 7)

    data_cmd.add_data_command(register)
    args = build_parser().parse_args(["data", "count-pixels"])
    assert args.func(args) == 7


def test_cli_reports_user_errors(tmp_path, capsys):
    from varedit_lab.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--kinds", "recolor,teleport"]) == 2
    assert "unknown edit kinds ['teleport']" in capsys.readouterr().err
