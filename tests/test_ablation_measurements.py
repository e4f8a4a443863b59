"""What the decisive ablation measures and pairs: the trainable word encoder, mask-split per-scale
cross-entropy, per-sample values, and runs that share everything but the strategy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from varedit_lab.config import load_config
from varedit_lab.data.datamodule import EditDataModule
from varedit_lab.metrics import MaskSplitScaleMetrics, coarse_scales, per_sample_mask_split, scale_mask_weights
from varedit_lab.module import EditorModule
from varedit_lab.text import WordTextEncoder, read_vocabulary
from varedit_lab.training import train
from tests.test_training import TINY, tiny_overrides


@pytest.fixture
def vocabulary(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["make", "the", "red", "blue", "circle", "square", "remove", "add", "a"]) + "\n")
    return path


def test_mask_split_on_a_constructed_case():
    # two scales: 1x1 and 2x2; the mask is the left half of a 4x4 image
    grids = [(1, 1), (2, 2)]
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    inside = scale_mask_weights(mask, grids)
    assert inside.tolist() == [[0.5, 1.0, 0.0, 1.0, 0.0]]
    ce = torch.tensor([[2.0, 1.0, 3.0, 1.0, 3.0]])
    acc = torch.tensor([[0.5, 1.0, 0.0, 1.0, 0.0]])
    metric = MaskSplitScaleMetrics(grids)
    metric.update(ce, acc, inside)
    out = metric.compute()
    assert out["ce_in/s0"] == pytest.approx(2.0) and out["ce_out/s0"] == pytest.approx(2.0)
    assert out["ce_in/s1"] == pytest.approx(1.0) and out["ce_out/s1"] == pytest.approx(3.0)
    assert out["bitacc_in/s1"] == pytest.approx(1.0) and out["bitacc_out/s1"] == pytest.approx(0.0)
    assert out["ce_in"] == pytest.approx(1.5) and out["ce_out"] == pytest.approx(2.5)  # unweighted mean of scales
    per_sample = per_sample_mask_split(ce, inside, grids)
    assert per_sample["ce_in"].item() == pytest.approx(1.5) and per_sample["ce_out"].item() == pytest.approx(2.5)
    # a sample whose mask is empty has no "inside" value: NaN, skipped by the metric
    empty = scale_mask_weights(torch.zeros(1, 1, 4, 4), grids)
    assert math.isnan(per_sample_mask_split(ce, empty, grids)["ce_in"].item())
    assert coarse_scales([(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]) == [0, 1, 2, 3, 4]


def test_word_encoder_reads_the_vocabulary(vocabulary):
    words = read_vocabulary(vocabulary)
    encoder = WordTextEncoder(words, width=16, num_layers=1, num_heads=2, max_length=8)
    ids, lengths = encoder.token_ids(["make the circle red", "add a purple square"])
    assert lengths.tolist() == [4, 4]
    assert ids[1, 2].item() == 1  # "purple" is not in the vocabulary: the unknown id
    features = encoder.encode(["make the circle red", "make the circle blue"])
    assert features.features.shape == (2, 4, 16) and features.features.requires_grad
    assert not torch.allclose(features.features[0, 3], features.features[1, 3])
    with pytest.raises(FileNotFoundError, match="text.vocabulary"):
        read_vocabulary(vocabulary.parent / "missing.txt")


@pytest.mark.slow
def test_word_encoder_trains_with_the_editor_and_is_saved(synthetic_shards, tmp_path, vocabulary):
    overrides = tiny_overrides(synthetic_shards, tmp_path, "text.kind=words", f"text.vocabulary={vocabulary}", "text.words_width=32",
                               "text.words_heads=2", "text.words_layers=1", "name=words")
    cfg = load_config(TINY, overrides)
    initial = EditorModule(cfg).text_encoder.embed.weight.detach().clone()
    run = train(cfg, TINY)
    restored = EditorModule.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert restored.text_trainable and any(k.startswith("text_encoder.") for k in restored.state_dict())
    assert not torch.allclose(restored.text_encoder.embed.weight, initial), "the word encoder was trained"

    summary = json.loads((run / "summary.json").read_text())["metrics"]
    for name in ("val/ce_in/s0", "val/ce_out/s2", "val/bitacc_in/s1", "val/ce_in_coarse", "val/ce_out_fine", "val/ce_in"):
        assert name in summary, name
    lines = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == len({line["key"] for line in lines}) == cfg.data.val_samples
    edited = [line for line in lines if line.get("success") is not None]
    assert len(edited) == cfg.sampling.num_val_edits
    for field in ("key", "kind", "ce_in", "ce_out", "ce_in_coarse", "step"):
        assert all(field in line for line in lines), field
    assert all(line["copy_success"] is not None and line["balance"] is not None for line in edited)


def test_same_seed_same_shared_start_for_every_strategy(synthetic_shards, tmp_path, vocabulary):
    """Runs paired by seed differ only in the strategy: identical initial weights and data order."""
    states, orders = {}, {}
    for name in ("max_scale", "sar", "full_scale"):
        cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path, f"conditioning.name={name}", "seed=3", "text.kind=words",
                                               f"text.vocabulary={vocabulary}", "text.words_width=32", "text.words_heads=2"))
        torch.manual_seed(12345 + len(states))  # whatever the global RNG holds, the start is the seed's
        states[name] = EditorModule(cfg).state_dict()
        data = EditDataModule(cfg.data, seed=cfg.seed)
        data.setup("fit")
        orders[name] = [key for batch, _ in zip(data.train_dataloader(), range(3)) for key in batch["key"]]
    reference = states["max_scale"]
    for name in ("sar", "full_scale"):
        assert states[name].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(states[name][key], value, rtol=0, atol=0, msg=f"{name}: {key}")
        assert orders[name] == orders["max_scale"]


@pytest.mark.slow
@pytest.mark.parametrize("options", [["conditioning.name=full_scale", "model.rope_layout=reference_compat"],
                                     ["conditioning.name=full_scale", "conditioning.options.visibility=all"],
                                     ["conditioning.name=sar", "model.rope_layout=reference_compat"]])
def test_paper_faithful_variants_train(synthetic_shards, tmp_path, options):
    cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path, *options, "trainer.max_steps=2", "trainer.val_every_n_steps=2"))
    run = train(cfg, TINY)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and math.isfinite(summary["metrics"]["val/loss"])


@pytest.mark.slow
def test_text_only_trains_validates_and_generates(synthetic_shards, tmp_path):
    """The lower bound: no source tokens at all; the model still trains, generates edits and is scored."""
    cfg = load_config(TINY, tiny_overrides(synthetic_shards, tmp_path, "conditioning.name=text_only", "trainer.max_steps=3",
                                           "trainer.val_every_n_steps=3"))
    run = train(cfg, TINY)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["metrics"]["perf/seq_len"] == 21  # 1 + 4 + 16 target tokens, no source
    for name in ("val/success", "val/preservation", "val/copy_success", "val/ce_in"):
        assert math.isfinite(summary["metrics"][name]), name
    module = EditorModule.from_checkpoint(run / "checkpoints" / "last.ckpt")
    plan = module.plan(torch.zeros(2, module.tokenizer.codebook_dim, 4, 4))
    assert plan.source_tokens.shape == (2, 0, module.tokenizer.codebook_dim)
    text = module.text_encoder.encode(["make the circle red", "add a square"])
    edits = module.edit(plan, text)
    assert edits.shape == (2, 3, 32, 32) and torch.isfinite(edits).all()
