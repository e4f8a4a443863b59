"""Synthetic edit benchmark: determinism, exact masks per edit kind, rejection of degenerate edits."""

from __future__ import annotations

import json
import tarfile
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from varedit_lab.data.scenes import COLORS, PATTERNS, Texture
from varedit_lab.data.synth import (
    EDIT_KINDS,
    RejectedEdit,
    Scene,
    Shape,
    SyntheticEditGenerator,
    build_edit,
    instruction_vocabulary,
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


# ---------------------------------------------------------------------------------------------
# The textured suite (128 px, the paper's 16x16-token geometry with the stride-8 tokenizer)


def textured_samples(kind: str, n: int, size: int = 128, seed: int = 0) -> list:
    gen = SyntheticEditGenerator(size, seed=seed, kinds=[kind], suite="textured")
    return [gen.sample("train", index) for index in range(n)]


def scene_textures(scene: dict) -> list:
    return [o["texture"] for o in scene["objects"] if "texture" in o] + ([scene["background_texture"]] if "background_texture" in scene else [])


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_textured_masks_exact_for_every_kind(kind):
    textured_refs = 0
    for sample in textured_samples(kind, 16):
        assert sample.meta["kind"] == kind and sample.meta["suite"] == "textured"
        assert sample.source.size == (128, 128) and sample.mask.mode == "L"
        src, tgt, mask, changed = arrays(sample)
        assert mask.any(), sample.instruction
        # outside the mask source and target are identical, pixel for pixel
        assert np.array_equal(src[~mask], tgt[~mask]), f"change outside the mask: {sample.instruction}"
        assert (changed & mask).sum() >= 0.5 * mask.sum()
        if kind in ("recolor", "background"):  # the texture is kept and every masked pixel changes colour
            assert np.array_equal(mask, changed), sample.instruction
        meta = sample.meta
        if kind in ("recolor", "move", "resize"):
            before = meta["source_scene"]["objects"][meta["ref"]]
            after = meta["target_scene"]["objects"][meta["ref"]]
            assert before.get("texture") == after.get("texture")  # the texture travels with its object
            textured_refs += "texture" in before
        if kind == "background":
            assert meta["source_scene"].get("background_texture") == meta["target_scene"].get("background_texture")
            assert meta["target_scene"]["background"] in sample.instruction
        if kind == "add":
            assert "texture" not in meta["target_scene"]["objects"][-1]  # the instruction cannot name a texture
        # texture masks: binary, and exactly the pixels drawn with a texture
        for texture, image in ((sample.source_texture, src), (sample.target_texture, tgt)):
            drawn = np.asarray(texture)
            assert texture.mode == "L" and set(np.unique(drawn)) <= {0, 255}
            inside = drawn > 0
            if inside.any():
                assert len(np.unique(image[inside], axis=0)) > 1  # not a flat colour
    if kind in ("recolor", "move", "resize"):
        assert textured_refs >= 4  # most edited objects carry a texture


def test_textured_recolor_keeps_the_texture_pattern():
    """Inside a recoloured textured object, target = new colour x the same shading as the source."""
    checked = 0
    for sample in textured_samples("recolor", 24):
        obj = sample.meta["source_scene"]["objects"][sample.meta["ref"]]
        if "texture" not in obj:
            continue
        src, tgt, mask, _ = arrays(sample)
        new = sample.meta["target_scene"]["objects"][sample.meta["ref"]]["color"]
        old_rgb, new_rgb = np.array(COLORS[obj["color"]], float), np.array(COLORS[new], float)
        channel = int(np.argmax(np.minimum(old_rgb, new_rgb)))  # a channel both colours light up
        shade_src = src[mask][:, channel] / old_rgb[channel]
        shade_tgt = tgt[mask][:, channel] / new_rgb[channel]
        rounding = 0.5 / old_rgb[channel] + 0.5 / new_rgb[channel]  # both images are rounded to uint8
        assert np.abs(shade_src - shade_tgt).max() <= rounding + 1e-9
        assert shade_src.min() < 0.9  # the texture darkens part of the object
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("angle", [0, 90])
def test_texture_periods_are_two_to_four_tokens(pattern, angle):
    """The dominant spatial frequency of each pattern sits at its period, 16-32 px at 128 px."""
    for period in (2 / 16, 3 / 16, 4 / 16):
        field = Texture(pattern, period, angle, phase=0.37, contrast=0.5).field(128)
        profile = field[0] if angle == 0 else field[:, 0]
        spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
        peak = int(np.argmax(spectrum))  # cycles per 128 px
        assert abs(128 / peak - period * 128) <= 0.15 * period * 128, (pattern, period, peak)
        assert field.min() >= 0 and field.max() <= 1 and field.max() - field.min() > 0.8


def test_textured_scenes_draw_textures_with_the_stated_periods_and_contrast():
    gen = SyntheticEditGenerator(seed=2, suite="textured")
    textures, patterns = [], set()
    for index in range(30):
        sample = gen.sample("val", index)
        for texture in scene_textures(sample.meta["source_scene"]):
            assert 2 / 16 - 1e-4 <= texture["period"] <= 4 / 16 + 1e-4  # 16-32 px at 128 px: 2-4 tokens of stride 8
            assert 0.3 - 1e-4 <= texture["contrast"] <= 0.6 + 1e-4 and 0 <= texture["phase"] < 1
            patterns.add(texture["pattern"])
            textures.append(texture)
        src_tex = np.asarray(sample.source_texture) > 0
        assert src_tex.any() == bool(scene_textures(sample.meta["source_scene"]))
    assert patterns == set(PATTERNS) and len(textures) > 30
    phases = {t["phase"] for t in textures}
    assert len(phases) == len(textures)  # random phase


def test_textured_suite_is_deterministic_by_seed():
    a = [SyntheticEditGenerator(seed=7, suite="textured").sample("train", i) for i in range(6)]
    b = SyntheticEditGenerator(seed=7, suite="textured")
    b_samples = [b.sample("train", i) for i in reversed(range(6))][::-1]
    for x, y in zip(a, b_samples):
        assert x.instruction == y.instruction and x.meta == y.meta
        for part in ("source", "target", "mask", "source_texture", "target_texture"):
            assert np.array_equal(np.asarray(getattr(x, part)), np.asarray(getattr(y, part)))
    other = SyntheticEditGenerator(seed=8, suite="textured").sample("train", 0)
    assert not np.array_equal(np.asarray(other.source), np.asarray(a[0].source))


def test_the_flat_suite_draws_no_textures():
    sample = SyntheticEditGenerator(64, seed=0).sample("train", 0)
    assert sample.source_texture is None and "suite" not in sample.meta
    assert "texture" not in json.dumps(sample.meta)


@pytest.mark.parametrize("suite", ["flat", "textured"])
def test_vocabulary_covers_every_instruction(suite):
    vocab = instruction_vocabulary(suite)
    assert vocab == sorted(set(vocab)) and all(w.isalpha() and w.islower() for w in vocab)
    gen = SyntheticEditGenerator(seed=0, suite=suite)
    used = set()
    for index in range(240):
        instruction = gen.sample("train", index).instruction
        assert instruction == " ".join(instruction.split()) and instruction.replace(" ", "").isalpha() and instruction.islower()
        words = instruction.split()
        assert set(words) <= set(vocab), sorted(set(words) - set(vocab))
        used |= set(words)
    assert len(used) >= 0.9 * len(vocab)  # the vocabulary is the suite's, not a padded list
    assert ("black" in vocab) == (suite == "flat")


def test_textured_shards_carry_texture_masks_kind_and_vocab(tmp_path):
    from varedit_lab.data.samples import DecodeEditSample, collate_edits
    from varedit_lab.data.shards import read_fixed_list

    shards = write_synthetic_shards(tmp_path, {"train": 6, "val": 6}, seed=1, samples_per_shard=4, suite="textured")
    manifest = json.loads((tmp_path / "synth.json").read_text())
    assert manifest["suite"] == "textured" and manifest["image_size"] == 128 and manifest["texture_masks"] is True
    assert (tmp_path / "vocab.txt").read_text().split("\n")[:-1] == instruction_vocabulary("textured")
    items, bad = read_fixed_list(shards["val"], 0, 128, where="test")
    assert not bad and len(items) == 6
    gen = SyntheticEditGenerator(seed=1, suite="textured")
    for index, item in enumerate(items):
        expected = gen.sample("val", index)
        assert item["kind"] == expected.meta["kind"] == EDIT_KINDS[index]
        assert np.array_equal(item["mask"][0].numpy() * 255, np.asarray(expected.mask))
        assert np.array_equal(item["source_texture"][0].numpy() * 255, np.asarray(expected.source_texture))
        assert np.array_equal(item["target_texture"][0].numpy() * 255, np.asarray(expected.target_texture))
    batch = collate_edits(items[:4])
    assert batch["source_texture"].shape == (4, 1, 128, 128) and batch["has_texture"].all()
    assert batch["kind"] == list(EDIT_KINDS[:4])
    # A flat sample in the same batch gets zeros and has_texture False; flat-only batches have no such key.
    flat = DecodeEditSample(128)(
        {"__key__": "f", "src.png": _png(expected.source), "tgt.png": _png(expected.target), "txt": b"make it so"}
    )
    mixed = collate_edits([items[0], flat])
    assert mixed["has_texture"].tolist() == [True, False] and mixed["target_texture"][1].abs().sum() == 0
    assert "has_texture" not in collate_edits([flat])


def test_half_a_texture_pair_is_a_bad_sample():
    from varedit_lab.data.samples import BadSampleError, DecodeEditSample

    sample = SyntheticEditGenerator(64, seed=0, suite="textured").sample("train", 0)
    raw = {"__key__": "k", "src.png": _png(sample.source), "tgt.png": _png(sample.target), "txt": b"x", "src_texture.png": _png(sample.source_texture)}
    with pytest.raises(BadSampleError, match="tgt_texture"):
        DecodeEditSample(64)(raw)


def _png(image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_cli_synth_textured(tmp_path, capsys):
    from varedit_lab.cli import main

    code = main(["data", "synth", "--suite", "textured", "--image-size", "128", "--out", str(tmp_path), "--train", "6", "--val", "6", "--test", "0", "--per-shard", "6"])
    assert code == 0
    out = capsys.readouterr().out
    assert "suite textured, 128 px" in out and "vocab.txt" in out
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        names = tar.getnames()
    assert {"val-00000000.src_texture.png", "val-00000000.tgt_texture.png", "val-00000000.mask.png"} <= set(names)
    assert main(["data", "inspect", str(tmp_path / "val-000000.tar"), "--size", "128"]) == 0
    assert "6 good samples (6 with masks, 6 with texture masks)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, message",
    [
        (["--suite", "stripy"], "unknown suite 'stripy'; known: ['flat', 'textured']"),
        (["--image-size", "16"], "image_size must be >= 32"),
        (["--train", "-1"], "sample counts must be >= 0"),
        (["--per-shard", "0"], "--per-shard"),
        (["--kinds", ","], "no edit kinds given"),
    ],
)
def test_cli_synth_rejects_bad_options_before_writing(tmp_path, capsys, options, message):
    from varedit_lab.cli import main

    out = tmp_path / "out"
    suite = [] if "--suite" in options else ["--suite", "textured"]
    assert main(["data", "synth", "--out", str(out), *suite, *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # validated before anything is written


def test_cli_synth_rejects_a_non_integer_size(tmp_path, capsys):
    from varedit_lab.cli import main

    with pytest.raises(SystemExit) as err:
        main(["data", "synth", "--out", str(tmp_path), "--image-size", "big"])
    assert err.value.code == 2 and "--image-size" in capsys.readouterr().err
