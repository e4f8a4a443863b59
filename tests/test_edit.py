"""Editing: the Editor API and `varedit-lab edit` on a tiny trained checkpoint, fixtures and a released-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from varedit_lab.cli import main
from varedit_lab.editing import (
    Editor,
    pad_to_square,
    postprocess,
    preprocess,
    resolve_released,
)


def _image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB image file (content matters only in that it is not constant)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def editor(tiny_editor_checkpoint: Path) -> Editor:
    return Editor.from_checkpoint(tiny_editor_checkpoint, device="cpu")


# -- pre/post-processing ------------------------------------------------------------------------------
def test_preprocess_pads_white_top_left_and_postprocess_restores_size():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    square = pad_to_square(red)
    assert square.size == (40, 40)
    assert square.getpixel((39, 19)) == (255, 0, 0) and square.getpixel((0, 20)) == (255, 255, 255)
    x = preprocess(red, 16)
    assert x.shape == (3, 16, 16) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # The image fills the top half, white padding the bottom half (rows next to the edge ring: LANCZOS).
    assert torch.allclose(x[:, :6, :], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), atol=0.02)
    assert torch.allclose(x[:, 10:, :], torch.ones(3, 6, 16), atol=0.02)
    back = postprocess(x, (40, 20))
    assert back.size == (40, 20)
    assert np.abs(np.asarray(back, dtype=float) - np.asarray(red, dtype=float)).mean() < 8  # padding cropped away


# -- tiny trained checkpoint ----------------------------------------------------------------------------
def test_edit_cli_from_checkpoint_keeps_input_size(tiny_editor_checkpoint: Path, tmp_path: Path):
    for size in ((32, 32), (45, 30)):
        src = _image(tmp_path / f"in_{size[0]}.png", size)
        out = tmp_path / f"out_{size[0]}.png"
        code = main(["edit", "--ckpt", str(tiny_editor_checkpoint), "--image", str(src), "--instruction", "make the red circle blue",
                     "--out", str(out), "--seed", "3", "--device", "cpu"])
        assert code == 0
        with Image.open(out) as edited:
            assert edited.size == size and edited.mode == "RGB"


def test_edit_cli_batch_jsonl(tiny_editor_checkpoint: Path, tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    records = [
        {"image": "imgs/a.png", "instruction": "remove the green square"},
        {"image": str(_image(tmp_path / "imgs" / "b.png", (20, 36), 1)), "instruction": "add a blue star", "out": "custom.png"},
        {"image": "imgs/c.png", "instruction": "make the background black"},
    ]
    _image(tmp_path / "imgs" / "a.png", (32, 32), 0)
    _image(tmp_path / "imgs" / "c.png", (50, 40), 2)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out_dir = tmp_path / "edits"
    assert main(["edit", "--ckpt", str(tiny_editor_checkpoint), "--batch", str(batch), "--out-dir", str(out_dir),
                 "--batch-size", "2", "--cfg", "2.5", "--device", "cpu"]) == 0
    manifest = [json.loads(line) for line in (out_dir / "edits.jsonl").read_text().splitlines()]
    assert [Path(m["out"]).name for m in manifest] == ["00000_a.png", "custom.png", "00002_c.png"]
    for m, size in zip(manifest, [(32, 32), (20, 36), (50, 40)]):
        with Image.open(m["out"]) as edited:
            assert edited.size == size
        assert m["size"] == list(size) and m["seconds"] > 0


def test_edit_cli_reports_bad_jsonl_line(tiny_editor_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    batch = tmp_path / "bad.jsonl"
    batch.write_text('{"image": "missing.png", "instruction": "x"}\n')
    assert main(["edit", "--ckpt", str(tiny_editor_checkpoint), "--batch", str(batch), "--out-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: image" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_api_batch_with_cfg_is_deterministic_and_uses_text(editor: Editor):
    sources = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (30, 120, 220)]
    instructions = ["make the red circle blue", "remove the star", "add a yellow square at the top"]
    first = editor.edit(sources, instructions, cfg=3.0, seed=7)
    again = editor.edit(sources, instructions, cfg=3.0, seed=7)
    assert len(first) == 3 and all(im.size == (32, 32) for im in first)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    # Guidance is on the text: with greedy decoding, cfg changes the result only through the text branch.
    x = torch.stack([preprocess(s, editor.image_size) for s in sources])
    text = editor.encode_text(instructions)
    greedy = editor.sampling.replace(greedy=True)
    guided = editor.edit_tensors(x, text, greedy.replace(cfg=3.0))
    unguided = editor.edit_tensors(x, text, greedy.replace(cfg=1.0))
    assert not torch.equal(guided, unguided)
    # A batch of 3 with CFG (6 rows inside) gives each row what it gives alone.
    for i in range(3):
        alone = editor.edit_tensors(x[i : i + 1], editor.encode_text(instructions[i : i + 1]), greedy.replace(cfg=3.0))
        assert (alone[0] - guided[i]).abs().mean() < 1e-3


def test_api_convenience_function(tiny_editor_checkpoint: Path, tmp_path: Path):
    import varedit_lab

    src = _image(tmp_path / "in.png", (24, 40))
    one = varedit_lab.edit(src, "make it purple", ckpt=tiny_editor_checkpoint, device="cpu", seed=1)
    assert isinstance(one, Image.Image) and one.size == (24, 40)
    two = varedit_lab.edit([src, src], "make it purple", ckpt=tiny_editor_checkpoint, device="cpu", seed=1)
    assert isinstance(two, list) and [im.size for im in two] == [(24, 40)] * 2


def test_bf16_autocast_path_runs(tiny_editor_checkpoint: Path):
    editor = Editor.from_checkpoint(tiny_editor_checkpoint, device="cpu", precision="bf16")
    (out,) = editor.edit(Image.new("RGB", (30, 20), (10, 200, 30)), "make it red", greedy=True)
    assert out.size == (30, 20)


# -- reference fixtures -------------------------------------------------------------------------------------
def test_fixture_editor_reproduces_reference_greedy_image(fixture_files: list[Path]):
    from varedit_lab.images import to_uint8
    from varedit_lab.parity import load_fixture

    for path in fixture_files:
        fixture = load_fixture(path)
        editor = Editor.from_fixture(path, device="cpu")
        assert editor.image_size == fixture["config"]["image_size"]
        edited = editor.edit_tensors(fixture["inputs"]["src_image"][:1], editor.fixed_text, editor.sampling.replace(greedy=True))
        diff = (to_uint8(edited).int() - fixture["expected"]["greedy_image"][:1].int()).abs()
        assert int(diff.max()) <= 1, path.name  # the release's truncating uint8 cast


def test_edit_cli_from_fixture(fixture_files: list[Path], tmp_path: Path):
    src = _image(tmp_path / "in.png", (256, 256))
    for path in fixture_files:
        out = tmp_path / f"{path.stem}.png"
        assert main(["edit", "--fixture", str(path), "--image", str(src), "--out", str(out), "--fixture-text", "1",
                     "--device", "cpu"]) == 0
        with Image.open(out) as edited:
            assert edited.size == (256, 256)


# -- released folder ------------------------------------------------------------------------------------------
def test_released_layout_errors_list_what_is_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_released(tmp_path)
    message = str(err.value)
    assert "no transformer" in message and "VAE" in message and "flan-t5-xl" in message and "expected layout" in message
    (tmp_path / "2B-512.pth").write_bytes(b"")
    (tmp_path / "8B-1024.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="several transformers.*--model"):
        resolve_released(tmp_path)
    with pytest.raises(FileNotFoundError, match="infinity_vae_d56_f8_14_patchify.pth"):
        resolve_released(tmp_path, model="8B-1024")
    (tmp_path / "infinity_vae_d56_f8_14_patchify.pth").write_bytes(b"")
    (tmp_path / "flan-t5-xl").mkdir()
    (tmp_path / "flan-t5-xl" / "config.json").write_text("{}")
    files = resolve_released(tmp_path, model="8B-1024")
    assert (files.size, files.resolution, files.vae.name) == ("8b", 1024, "infinity_vae_d56_f8_14_patchify.pth")


def _released_dir_from_fixture(fixture: dict, root: Path) -> Path:
    """A folder in the released layout holding the fixture's weights and a tiny T5 of its text width."""
    from varedit_lab.text.encoder import tiny_t5

    root.mkdir()
    torch.save(fixture["model_state_dict"], root / "2B-256.pth")  # released key layout (block_chunks...)
    torch.save({"vae": fixture["vae_state_dict"]}, root / "infinity_vae_d32reg.pth")
    width = fixture["config"]["transformer"]["text_channels"]
    t5, tokenizer = tiny_t5(d_model=width, num_layers=1, num_heads=4, d_ff=2 * width, seed=0)
    t5.save_pretrained(root / "flan-t5-xl")
    tokenizer.save_pretrained(root / "flan-t5-xl")
    return root


def fixture_shape_overrides(fixture: dict) -> list[str]:
    """The fixture is a tiny Infinity-2B: the preset's shape is overridden, everything else is the release's."""
    t, vae = fixture["config"]["transformer"], fixture["config"]["vae"]
    return [f"model.depth={t['depth']}", f"model.width={t['embed_dim']}", f"model.num_heads={t['num_heads']}",
            f"model.text_channels={t['text_channels']}", f"model.text_maxlen={t['text_maxlen']}",
            f"text.max_length={t['text_maxlen']}", f"tokenizer.base_ch={vae['base_ch']}",
            f"tokenizer.encoder_ch_mult={vae['encoder_ch_mult']}", f"tokenizer.decoder_ch_mult={vae['decoder_ch_mult']}",
            f"tokenizer.num_res_blocks={vae['num_res_blocks']}", f"tokenizer.norm_num_groups={vae['norm_num_groups']}"]


def test_released_folder_builds_the_fixture_model(fixture_files: list[Path], tmp_path: Path):
    from varedit_lab.parity import load_fixture

    path = next(p for p in fixture_files if "sar_256_d32" in p.name)
    fixture = load_fixture(path)
    root = _released_dir_from_fixture(fixture, tmp_path / "released")
    overrides = fixture_shape_overrides(fixture)
    released = Editor.from_released(root, overrides=overrides, device="cpu")
    reference = Editor.from_fixture(path, device="cpu")
    assert released.image_size == 256 and released.rope_layout == "reference_compat"
    assert released.strategy.describe() == {"name": "sar", "layers": [0]}
    # Same weights, same numerics: the released path reproduces the fixture editor bit for bit.
    source = fixture["inputs"]["src_image"][:1]
    greedy = released.sampling.replace(greedy=True)
    assert torch.equal(released.edit_tensors(source, reference.fixed_text, greedy), reference.edit_tensors(source, reference.fixed_text, greedy))
    # And the T5 folder is used for instructions, through the CLI.
    src = _image(tmp_path / "in.png", (300, 200))
    out = tmp_path / "out.png"
    args = ["edit", "--released", str(root), "--image", str(src), "--instruction", "make the sky purple", "--out", str(out), "--device", "cpu"]
    for item in overrides:
        args += ["--override", item]
    assert main(args) == 0
    with Image.open(out) as edited:
        assert edited.size == (300, 200)
