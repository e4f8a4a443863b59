"""Tokenizer training: losses, the LightningModule on a tiny in-memory set, the task entry point."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from varedit_lab.config import load_config
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.tokenizer import BSQTokenizer, load_tokenizer
from varedit_lab.tokenizer.losses import bsq_terms_one
from varedit_lab.tokenizer.module import CHECKPOINT_NAME, LossWeights, MaskedPSNR, TokenizerModule, images_of, texture_masks_of, tokenizer_losses

TINY_OVERRIDES = [
    "task=tokenizer",
    "tokenizer.codebook_dim=8",
    "tokenizer.patch_size=8",
    "tokenizer.base_ch=8",
    "tokenizer.encoder_ch_mult=[1,1,2,2]",
    "tokenizer.decoder_ch_mult=[1,1,2,2]",
    "tokenizer.norm_num_groups=4",
    "tokenizer.scales=[1,2,4]",
    "optim.lr=1e-3",
    "tokenizer.commitment_loss_weight=0",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "optim.weight_decay=0",
    "trainer.progress_bar=false",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Tiny convolutions gain nothing from a second thread, and on a loaded machine (the suite runs
    # beside other jobs) OpenMP spin-waiting makes them 10-50x slower. conftest restores the count.
    torch.set_num_threads(1)


def synthetic_images(n: int, size: int = 32) -> torch.Tensor:
    from varedit_lab.data.synth import SyntheticEditGenerator

    gen = SyntheticEditGenerator(image_size=size, seed=0)
    arrays = [np.asarray(getattr(gen.sample("train", i), part)) for i in range(n // 2) for part in ("source", "target")]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_bsq_terms_of_a_confident_spread_code() -> None:
    """Inputs on the corners: no commitment, zero per-sample entropy, maximal codebook entropy."""
    d = 4
    corners = torch.tensor([[1.0, 1, -1, -1], [-1, -1, 1, 1]]).view(2, d, 1, 1) / d**0.5
    commit, sample_h, codebook_h = bsq_terms_one(corners, inv_temperature=100.0)
    assert commit.item() == pytest.approx(0.0, abs=1e-10)
    assert sample_h.item() == pytest.approx(0.0, abs=1e-6)
    assert codebook_h.item() == pytest.approx(d * np.log(2), rel=1e-5)
    # All positions on one corner: the codebook entropy collapses.
    _, _, collapsed = bsq_terms_one(corners[:1].expand(2, d, 1, 1), 100.0)
    assert collapsed.item() == pytest.approx(0.0, abs=1e-6)


def test_losses_reach_the_encoder_through_the_quantizer() -> None:
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY_OVERRIDES)
    module = TokenizerModule(cfg)
    x = synthetic_images(4)
    out = tokenizer_losses(module.vae, x, module.schedule, LossWeights())
    out.loss.backward()
    assert module.vae.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    assert module.vae.decoder.conv_out.conv.weight.grad.abs().sum() > 0
    assert out.recon.shape == x.shape


def test_cycle_term_pulls_the_reencoded_reconstruction_to_the_latent() -> None:
    torch.manual_seed(0)
    module = TokenizerModule(load_config(overrides=TINY_OVERRIDES))
    x = synthetic_images(4)
    plain = tokenizer_losses(module.vae, x, module.schedule, LossWeights())
    assert plain.cycle.item() == 0.0
    out = tokenizer_losses(module.vae, x, module.schedule, LossWeights(cycle=1.0))
    expected = (module.vae.encode_latent(out.recon) - module.vae.encode_latent(x)).pow(2).sum(1).mean()
    assert out.cycle.item() == pytest.approx(expected.item(), rel=1e-4) and out.cycle.item() > 0
    assert out.loss.item() == pytest.approx(plain.loss.item() + out.cycle.item(), rel=1e-4)
    with pytest.raises(ValueError, match="straight_through"):
        LossWeights(straight_through="nope")


def test_images_of_takes_source_and_target() -> None:
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    assert torch.equal(images_of({"source": a, "target": b, "instruction": ["x", "y"]}), torch.cat([a, b]))
    assert images_of([a]) is a
    with pytest.raises(KeyError):
        images_of({"instruction": ["x"]})


def test_tiny_training_lowers_the_loss_and_writes_a_loadable_tokenizer(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY_OVERRIDES + ["trainer.max_steps=40"])
    module = TokenizerModule(cfg)
    images = synthetic_images(8)
    with torch.no_grad():
        before = tokenizer_losses(module.vae, images, module.schedule, module.weights)
    loader = DataLoader(TensorDataset(images), batch_size=8)
    trainer = pl.Trainer(
        max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), val_check_interval=40, check_val_every_n_epoch=None,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(TensorDataset(images[:4]), batch_size=4))
    with torch.no_grad():
        after = tokenizer_losses(module.vae, images, module.schedule, module.weights)
    assert after.l1 < 0.7 * before.l1, (before.l1.item(), after.l1.item())
    assert after.l2 < 0.7 * before.l2
    metrics = trainer.callback_metrics
    assert {"val/psnr", "val/roundtrip_bit_acc", "time/train_minutes"} <= set(metrics)
    # The artefact the editor points at: carries its config, loads without one, same function.
    loaded = load_tokenizer(tmp_path / CHECKPOINT_NAME)
    assert loaded.codebook_dim == 8 and loaded.encoder.conv_in.conv.out_channels == 8
    raw = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert raw["config"]["scales"] == [1, 2, 4]
    module.vae.eval()
    schedule = ScaleSchedule.from_scales([1, 2, 4])
    tokens = module.vae.encode_target(images[:2], schedule)
    again = loaded.encode_target(images[:2], schedule)
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, again.bits))


def test_round_trip_of_bits_through_decode_and_encode() -> None:
    """bits -> decode -> encode gives bits of the same layout, and they depend on the decoder: a
    broken (constant) decoder makes every sample's round trip identical. How much of a trained
    tokenizer's code comes back is measured in validation (``val/roundtrip_bit_acc[_scaleK]``)."""
    torch.manual_seed(0)
    vae = BSQTokenizer.from_config(load_config(overrides=TINY_OVERRIDES).tokenizer).eval()
    schedule = ScaleSchedule.from_scales([1, 2, 4])
    x = synthetic_images(4)
    bits = vae.encode_target(x, schedule).bits
    again = vae.encode_target(vae.decode(bits, schedule), schedule).bits
    assert [a.shape for a in again] == [b.shape for b in bits]
    torch.nn.init.zeros_(vae.decoder.conv_out.conv.weight)
    torch.nn.init.zeros_(vae.decoder.conv_out.conv.bias)
    flat = vae.decode(bits, schedule)
    assert flat.abs().max() == 0  # a constant image: the round trip then cannot depend on the bits
    assert all(torch.equal(a[0], a[1]) for a in vae.encode_target(flat[:2], schedule).bits)


def test_shipped_config_validates() -> None:
    from varedit_lab.config import experiments_dir

    cfg = load_config(experiments_dir() / "tokenizer" / "synthetic64.yaml")
    assert cfg.task == "tokenizer" and list(cfg.tokenizer.scales) == [1, 2, 4, 6, 8]
    assert cfg.tokenizer.patch_size == 8 and cfg.tokenizer.codebook_dim == 16 and cfg.data.image_size == 64


def test_train_command_path_on_real_shards(synthetic_shards, tmp_path) -> None:
    """`varedit-lab train experiments/tokenizer/...yaml` runs train(cfg): shards in, tokenizer.pt out."""
    import json

    from varedit_lab.config import experiments_dir
    from varedit_lab.training import train

    path = experiments_dir() / "tokenizer" / "synthetic64.yaml"
    cfg = load_config(path, [
        "tokenizer.base_ch=8", "tokenizer.encoder_ch_mult=[1,1,2,2]", "tokenizer.decoder_ch_mult=[1,1,2,2]",
        "tokenizer.norm_num_groups=4", "data.batch_size=4", "data.val_samples=8",
        f"data.train_shards={synthetic_shards['train']}", f"data.val_shards={synthetic_shards['val']}",
        "trainer.max_steps=4", "trainer.val_every_n_steps=4", "trainer.num_threads=1", "trainer.progress_bar=false",
        "logger.mode=disabled", f"output_dir={tmp_path}",
    ])
    run = train(cfg, path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert {"val/psnr", "val/loss", "val/roundtrip_bit_acc", "val/roundtrip_bit_acc_scale4", "time/train_minutes"} <= set(summary["metrics"])
    assert not {"val/psnr_textured", "val/psnr_untextured"} & set(summary["metrics"])  # flat shards carry no texture masks
    tok = load_tokenizer(run / CHECKPOINT_NAME)
    assert tok.codebook_dim == 16 and tok.encode_latent(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 8, 8)


def test_masked_psnr_on_a_constructed_case() -> None:
    """Errors 0.1 inside the mask and 0.2 outside: 10 log10(4 / 0.01) and 10 log10(4 / 0.04) dB."""
    target = torch.zeros(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :3] = 1
    preds = target + 0.2 - 0.1 * mask
    inside, outside = MaskedPSNR(), MaskedPSNR()
    for i in range(2):  # pooled over updates, like a validation split
        inside.update(preds[i : i + 1], target[i : i + 1], mask[i : i + 1])
        outside.update(preds[i : i + 1], target[i : i + 1], 1 - mask[i : i + 1])
    assert inside.compute().item() == pytest.approx(10 * np.log10(4 / 0.01), rel=1e-5)
    assert outside.compute().item() == pytest.approx(10 * np.log10(4 / 0.04), rel=1e-5)
    empty = MaskedPSNR()
    empty.update(preds, target, torch.zeros_like(mask))
    assert torch.isnan(empty.compute())  # no selected pixel: not logged


def test_texture_masks_follow_the_image_rows() -> None:
    src_tex, tgt_tex = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    batch = {"source": torch.zeros(2, 3, 4, 4), "target": torch.ones(2, 3, 4, 4), "source_texture": src_tex,
             "target_texture": tgt_tex, "has_texture": torch.tensor([True, False])}
    masks, rows = texture_masks_of(batch)
    assert torch.equal(masks, torch.cat([src_tex, tgt_tex])) and rows.tolist() == [True, False, True, False]
    assert texture_masks_of({"source": batch["source"]}) is None and texture_masks_of(batch["source"]) is None


@pytest.fixture(scope="module")
def textured_shards(tmp_path_factory) -> dict:
    from varedit_lab.data.synth import shard_pattern, write_synthetic_shards

    out = tmp_path_factory.mktemp("textured128")
    shards = write_synthetic_shards(out, {"train": 8, "val": 6}, seed=0, samples_per_shard=4, suite="textured")
    return {split: shard_pattern(out, split, len(files)) for split, files in shards.items()}


def test_synthetic128_recipe_trains_and_reports_psnr_inside_textures(textured_shards, tmp_path) -> None:
    """experiments/tokenizer/synthetic128.yaml at its geometry (128 px, 16x16 tokens, 7 scales) with
    tiny widths: real textured shards in, PSNR inside/outside the texture masks out."""
    import json

    from varedit_lab.config import experiments_dir
    from varedit_lab.training import train

    path = experiments_dir() / "tokenizer" / "synthetic128.yaml"
    cfg = load_config(path, [
        "tokenizer.base_ch=8", "tokenizer.encoder_ch_mult=[1,1,2,2]", "tokenizer.decoder_ch_mult=[1,1,2,2]",
        "tokenizer.norm_num_groups=4", "data.batch_size=2", "data.val_samples=6",
        f"data.train_shards={textured_shards['train']}", f"data.val_shards={textured_shards['val']}",
        "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.num_threads=1", "trainer.progress_bar=false",
        "logger.mode=disabled", f"output_dir={tmp_path}",
    ])
    assert list(cfg.tokenizer.scales) == [1, 2, 4, 6, 8, 12, 16] and cfg.data.image_size == 128 and cfg.tokenizer.patch_size == 8
    run = train(cfg, path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    metrics = summary["metrics"]
    assert {"val/psnr", "val/psnr_textured", "val/psnr_untextured", "val/roundtrip_bit_acc_scale6"} <= set(metrics)
    # Every validation sample has texture masks, so the overall MSE is the pixel-weighted mean of
    # the two regions' MSEs: the overall PSNR lies between them.
    low, high = sorted((metrics["val/psnr_textured"], metrics["val/psnr_untextured"]))
    assert low - 1e-3 <= metrics["val/psnr"] <= high + 1e-3 and high > low
    tok = load_tokenizer(run / CHECKPOINT_NAME)
    assert tok.encode_latent(torch.zeros(1, 3, 128, 128)).shape == (1, 16, 16, 16)
