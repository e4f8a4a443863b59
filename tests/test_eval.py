"""Evaluation: metric maths, benchmark loaders on fabricated folders, and `varedit-lab eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from varedit_lab.cli import main
from varedit_lab.eval import clip_metrics as cm
from varedit_lab.eval.benchmarks import decode_pie_mask, encode_pie_mask, load_emu_edit, load_pie_bench


# -- tiny random CLIP and DINO, saved as local Hugging Face folders --------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Byte-level vocabulary: the two specials plus every byte character and its end-of-word form.
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab.setdefault(c + suffix, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8))
    path = tmp_path_factory.mktemp("dino")
    model.save_pretrained(path)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _save_image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def emu_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fabricated EMU-Edit test export: metadata.jsonl + images/, two tasks, one validation row."""
    root = tmp_path_factory.mktemp("emu_edit")
    rows = [
        {"idx": 0, "task": "background", "split": "test", "instruction": "make the background a beach",
         "input_caption": "a dog in a park", "output_caption": "a dog on a beach"},
        {"idx": 1, "task": "add", "split": "test", "instruction": "add a hat to the man",
         "input_caption": "a man smiling", "output_caption": "a man wearing a hat smiling"},
        {"idx": 2, "task": "background", "split": "test", "instruction": "turn the sky red",
         "input_caption": "a house under a blue sky", "output_caption": "a house under a red sky"},
        {"idx": 3, "task": "add", "split": "validation", "instruction": "add a cat",
         "input_caption": "an empty sofa", "output_caption": "a cat on a sofa"},
    ]
    for row, size in zip(rows, [(48, 32), (32, 32), (40, 56), (32, 32)]):
        row["image"] = f"images/{row['idx']}.png"
        _save_image(root / row["image"], size, row["idx"])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


PIE_EDIT_REGION = np.zeros((512, 512), dtype=bool)
PIE_EDIT_REGION[100:300, 200:400] = True


@pytest.fixture(scope="module")
def pie_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fabricated PIE-Bench copy: mapping_file.json + annotation_images/, RLE masks over 512 x 512."""
    root = tmp_path_factory.mktemp("pie_bench")
    entries = {
        "000000000000": {"image_path": "0_random_140/000000000000.jpg", "editing_type_id": "0",
                         "original_prompt": "a slanted mountain bicycle on the road",
                         "editing_prompt": "a slanted [rusty] mountain bicycle on the road",
                         "editing_instruction": "Make the frame of the bike rusty", "blended_word": "bicycle bicycle"},
        "111000000000": {"image_path": "1_change_object_80/1_artificial/1_animal/111000000000.jpg", "editing_type_id": "1",
                         "original_prompt": "a cat sitting on a wooden chair", "editing_prompt": "a [dog] sitting on a wooden chair",
                         "editing_instruction": "Change the cat to a dog", "blended_word": "cat dog"},
    }
    for seed, entry in enumerate(entries.values()):
        entry["mask"] = encode_pie_mask(PIE_EDIT_REGION)
        image = root / "annotation_images" / entry["image_path"]
        _save_image(image.with_suffix(".png"), (512, 512), 10 + seed)
        Image.open(image.with_suffix(".png")).convert("RGB").save(image, quality=95)
    (root / "mapping_file.json").write_text(json.dumps(entries))
    return root


# -- metric maths ------------------------------------------------------------------------------------------------
def test_clip_metric_maths_on_hand_made_embeddings():
    src_img = torch.tensor([[1.0, 0.0, 0.0]])
    edit_img = torch.tensor([[0.6, 0.8, 0.0]])
    in_txt = torch.tensor([[1.0, 0.0, 0.0]])
    out_txt = torch.tensor([[0.0, 1.0, 0.0]])
    assert cm.clip_i(src_img, edit_img).item() == pytest.approx(0.6)
    assert cm.clip_out(edit_img, out_txt).item() == pytest.approx(0.8)
    # image change (-0.4, 0.8, 0), caption change (-1, 1, 0): cos = 1.2 / (sqrt(0.8) * sqrt(2))
    assert cm.clip_dir(src_img, edit_img, in_txt, out_txt).item() == pytest.approx(1.2 / math.sqrt(1.6))
    # Opposite directions give -1; an unchanged image has no direction (NaN, left out of means).
    assert cm.clip_dir(edit_img, src_img, src_img, edit_img).item() == pytest.approx(-1.0)
    assert math.isnan(cm.clip_dir(src_img, src_img, in_txt, out_txt).item())
    assert cm.clip_score(torch.tensor([0.31, -0.2])).tolist() == pytest.approx([31.0, 0.0])


def test_l1_and_region_metrics_on_pixels():
    black = Image.new("RGB", (8, 4), (0, 0, 0))
    half = Image.new("RGB", (8, 4), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 4, 4))
    assert cm.l1_distance(black, black) == 0.0
    assert cm.l1_distance(black, half) == pytest.approx(0.5)
    right = np.zeros((4, 8), bool)
    right[:, 4:] = True
    psnr, l1 = cm.region_psnr_l1(black, half, right)  # the untouched right half
    assert psnr == pytest.approx(60.0) and l1 == pytest.approx(0.0)
    psnr, l1 = cm.region_psnr_l1(black, half, ~right)
    assert psnr == pytest.approx(0.0) and l1 == pytest.approx(1.0)
    masked = cm.masked_image(half, ~right)
    assert masked.getpixel((1, 1)) == (255, 255, 255) and masked.getpixel((6, 1)) == (0, 0, 0)


def test_pie_mask_decoding():
    # 4 x 5 image, runs (start, length): pixels 6-8 of row 1 and the run 17.. clipped at the end.
    mask = decode_pie_mask([6, 3, 17, 10], shape=(4, 5), mark_border=False)
    expected = np.zeros(20, bool)
    expected[[6, 7, 8, 17, 18, 19]] = True
    assert np.array_equal(mask, expected.reshape(4, 5))
    bordered = decode_pie_mask([], shape=(4, 5))
    assert bordered[0].all() and bordered[-1].all() and bordered[:, 0].all() and bordered[:, -1].all()
    assert not bordered[1:-1, 1:-1].any()
    assert np.array_equal(decode_pie_mask(encode_pie_mask(PIE_EDIT_REGION), mark_border=False), PIE_EDIT_REGION)
    with pytest.raises(ValueError, match="pairs"):
        decode_pie_mask([1, 2, 3])


# -- loaders --------------------------------------------------------------------------------------------------------
def test_emu_edit_loader(emu_folder: Path):
    samples = load_emu_edit(emu_folder)
    assert [s.key for s in samples] == ["0", "1", "2", "3"]
    assert samples[1].kind == "add" and samples[1].output_caption == "a man wearing a hat smiling"
    assert samples[2].load_image().size == (40, 56) and samples[0].mask((48, 32)) is None
    assert [s.key for s in load_emu_edit(emu_folder, split="test", limit=2)] == ["0", "1"]
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_emu_edit(emu_folder / "images")


def test_pie_bench_loader(pie_folder: Path):
    samples = load_pie_bench(pie_folder)
    assert [s.kind for s in samples] == ["random", "change_object"]
    first = samples[0]
    assert first.output_caption == "a slanted rusty mountain bicycle on the road"  # brackets removed
    assert first.instruction == "Make the frame of the bike rusty"
    mask = first.mask((512, 512))
    assert mask[150, 250] and not mask[50, 50] and mask[0, 0]  # edit region, background, marked border
    small = first.mask((64, 64))
    assert small.shape == (64, 64) and small[25, 37] and not small[5, 5]


# -- end to end ----------------------------------------------------------------------------------------------------------
def test_eval_synthetic_writes_metrics_per_kind_and_copy_baseline(tiny_editor_checkpoint: Path, synthetic_shards: dict, tmp_path: Path):
    out = tmp_path / "synthetic"
    assert main(["eval", "--ckpt", str(tiny_editor_checkpoint), "--benchmark", "synthetic", "--data", str(synthetic_shards["dir"]),
                 "--limit", "12", "--batch-size", "6", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"] == "synthetic" and metrics["num_samples"] == 12
    assert metrics["data"]["split"] == "test" and all("/test-" in url for url in metrics["data"]["shards"])
    overall = metrics["metrics"]
    assert overall["edit"]["n"] == 12 and {"success", "preservation", "balance"} <= set(overall["edit"])
    # Copying the source preserves everything outside the mask exactly (PSNR cap).
    assert overall["copy"]["preservation"] == pytest.approx(60.0) and overall["copy"]["preservation_l1"] == 0.0
    assert overall["edit"]["preservation"] < 60.0
    kinds = metrics["per_kind"]
    assert len(kinds) >= 3 and sum(k["edit"]["n"] for k in kinds.values()) == 12
    assert all({"edit", "copy"} == set(k) for k in kinds.values())
    assert (out / "grid.png").is_file() and len(list((out / "grids").glob("*.png"))) == len(kinds)
    table = (out / "metrics.md").read_text()
    assert "## Copy-the-source baseline" in table and "| all | 12 |" in table
    assert list(out.glob("wandb/offline-run-*")), "offline W&B run expected (WANDB_MODE=offline in tests)"


def _eval_public(checkpoint: Path, benchmark: str, data: Path, out: Path, clip: Path, dino: Path) -> dict:
    assert main(["eval", "--ckpt", str(checkpoint), "--benchmark", benchmark, "--data", str(data), "--clip", str(clip),
                 "--dino", str(dino), "--out", str(out), "--batch-size", "2", "--device", "cpu", "--no-wandb"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_eval_emu_edit_with_clip_and_dino(tiny_editor_checkpoint: Path, emu_folder: Path, tiny_clip: Path, tiny_dino: Path, tmp_path: Path):
    metrics = _eval_public(tiny_editor_checkpoint, "emu_edit", emu_folder, tmp_path / "emu", tiny_clip, tiny_dino)
    edit, copy = metrics["metrics"]["edit"], metrics["metrics"]["copy"]
    assert metrics["num_samples"] == 4 and edit["n"] == 4
    assert {"clip_i", "clip_out", "clip_dir", "dino", "l1"} <= set(edit)
    assert all(-1.0 <= edit[k] <= 1.0 for k in ("clip_i", "clip_out", "clip_dir", "dino"))
    assert copy["clip_i"] == pytest.approx(1.0) and copy["dino"] == pytest.approx(1.0) and copy["l1"] == 0.0
    assert "clip_dir" not in copy and edit["l1"] > 0.0  # an unchanged image has no edit direction
    assert set(metrics["per_kind"]) == {"add", "background"} and metrics["per_kind"]["add"]["edit"]["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "emu" / "per_sample.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["0", "1", "2", "3"]
    for key, size in (("0", (48, 32)), ("2", (40, 56))):
        with Image.open(tmp_path / "emu" / "edits" / f"{key}.png") as edited:
            assert edited.size == size
    assert (tmp_path / "emu" / "grid.png").is_file() and "clip_dir" in (tmp_path / "emu" / "metrics.md").read_text()


def test_eval_pie_bench_with_clip_and_dino(tiny_editor_checkpoint: Path, pie_folder: Path, tiny_clip: Path, tiny_dino: Path, tmp_path: Path):
    metrics = _eval_public(tiny_editor_checkpoint, "pie_bench", pie_folder, tmp_path / "pie", tiny_clip, tiny_dino)
    edit, copy = metrics["metrics"]["edit"], metrics["metrics"]["copy"]
    assert {"clip_whole", "clip_edit", "clip_dir", "dino", "bg_psnr", "bg_l1", "l1"} <= set(edit)
    assert 0.0 <= edit["clip_whole"] <= 100.0 and 0.0 <= edit["clip_edit"] <= 100.0
    assert copy["bg_psnr"] == pytest.approx(60.0) and edit["bg_psnr"] < 60.0
    assert set(metrics["per_kind"]) == {"random", "change_object"}


def test_clip_scorer_matches_the_model_directly(tiny_clip: Path):
    """The scorer's embeddings are the model's projected, normalised features (transformers 5 API)."""
    from transformers import AutoTokenizer, CLIPModel

    scorer = cm.ClipScorer.from_pretrained(tiny_clip)
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), AutoTokenizer.from_pretrained(tiny_clip)
    texts = ["a red car", "a much longer caption about a blue house"]
    with torch.no_grad():
        direct = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    assert torch.allclose(scorer.embed_texts(texts), F.normalize(direct, dim=-1), atol=1e-6)
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 40), (10, 10, 200))]
    embedded = scorer.embed_images(images)
    assert embedded.shape == (2, 16) and torch.allclose(embedded.norm(dim=-1), torch.ones(2))
    with pytest.raises(FileNotFoundError, match="never download"):
        cm.ClipScorer.from_pretrained(tiny_clip / "nowhere")
