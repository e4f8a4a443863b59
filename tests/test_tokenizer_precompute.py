"""Precomputed shards: stored codes equal the on-the-fly tokenizer outputs; original keys survive."""

from __future__ import annotations

import json

import pytest
import torch

from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.tokenizer import BSQTokenizer, VAEArch
from varedit_lab.tokenizer.precompute import MANIFEST, decode_precomputed, precompute_shards


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny convolutions; conftest restores the count


def test_precomputed_codes_match_the_tokenizer(synthetic_shards, tmp_path) -> None:
    import webdataset as wds

    from varedit_lab.data.shards import read_fixed_list
    from varedit_lab.text import TextEncoder
    from varedit_lab.config import TextConfig

    torch.manual_seed(0)
    arch = VAEArch(codebook_dim=6, patch_size=8, base_ch=8, encoder_ch_mult=(1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1), norm_num_groups=4, apply_spatial_patchify=True)
    vae = BSQTokenizer(arch).eval()
    schedule = ScaleSchedule.from_scales([1, 2, 4])  # token grids; 8x8 VAE latent at 64 px with patchify
    text = TextEncoder.from_config(TextConfig(tiny_d_model=32, tiny_num_layers=1, tiny_num_heads=2, tiny_d_ff=64, max_length=32))
    written = precompute_shards(synthetic_shards["val"], tmp_path, vae, schedule, 64, text_encoder=text, text_dtype="float32",
                                split="val", batch_size=5, samples_per_shard=10)
    assert len(written) == 3  # 24 samples, 10 per shard
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["samples"] == 24 and manifest["token_channels"] == 24 and manifest["text"]

    originals, _ = read_fixed_list(synthetic_shards["val"], 3, 64)
    stored = list(wds.DataPipeline(wds.SimpleShardList(written), wds.tarfile_to_samples()))
    assert [s["__key__"] for s in stored[:3]] == [o["key"] for o in originals]
    assert {"src.png", "tgt.png", "mask.png", "txt", "json", "src_latent.npy", "tgt_bits.npy", "txt_emb.npy"} <= set(stored[0])
    for raw, item in zip(stored[:3], originals):
        got = decode_precomputed(raw, schedule, arch)
        source = item["source"][None].float() / 127.5 - 1
        target = item["target"][None].float() / 127.5 - 1
        # Float32 convolutions of a batch of 5 and of 1 sample differ in rounding on some CPUs.
        diff = (got["source_tokens"] - vae.encode_source(source, schedule)).abs().max()
        assert diff < 1e-5, diff
        expected = vae.encode_target(target, schedule)
        assert all(torch.equal(a, b) for a, b in zip(got["target_bits"], expected.bits))
        assert torch.allclose(got["teacher_inputs"], expected.teacher_inputs, atol=1e-6)
        features = text.encode([item["instruction"]])
        assert torch.allclose(got["text"], features.features[0, : int(features.lengths[0])], atol=1e-6)


def test_precompute_refuses_to_mix_with_existing_shards(synthetic_shards, tmp_path) -> None:
    vae = BSQTokenizer(VAEArch(codebook_dim=4, base_ch=8, encoder_ch_mult=(1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1), norm_num_groups=4))
    schedule = ScaleSchedule.from_scales([1, 2, 8])
    precompute_shards(synthetic_shards["val"], tmp_path, vae, schedule, 64, split="val")
    with pytest.raises(FileExistsError):
        precompute_shards(synthetic_shards["val"], tmp_path, vae, schedule, 64, split="val")


def test_precompute_command(synthetic_shards, tmp_path) -> None:
    """`varedit-lab data precompute` end to end through the real CLI parser."""
    from varedit_lab.cli import main
    from varedit_lab.config import experiments_dir
    from varedit_lab.tokenizer import save_tokenizer

    vae = BSQTokenizer(VAEArch(codebook_dim=4, base_ch=8, encoder_ch_mult=(1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1), norm_num_groups=4))
    ckpt = save_tokenizer(vae, tmp_path / "tok.pt")
    out = tmp_path / "pre"
    base = str(experiments_dir() / "synthetic" / "base.yaml")
    argv = ["data", "precompute", base, "--shards", synthetic_shards["val"], "--out", str(out), "--split", "val", "--no-text"]
    assert main([*argv, "tokenizer.checkpoint=null"]) == 2  # refuses a random tokenizer, one line, no traceback
    assert main([*argv, f"tokenizer.checkpoint={ckpt}"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["samples"] == 24 and manifest["schedule"][-1] == [8, 8] and manifest["tokenizer_checkpoint"] == str(ckpt.resolve())


def test_editor_trains_from_precomputed_shards(synthetic_shards, tmp_path, monkeypatch) -> None:
    """Stored latents, bits and text give the editor exactly the inputs the frozen VAE and T5 would,
    and a real training run reads them."""
    import csv
    from pathlib import Path

    from varedit_lab.config import load_config
    from varedit_lab.data.datamodule import EditDataModule
    from varedit_lab.data.synth import shard_pattern
    from varedit_lab.module import EditorModule
    from varedit_lab.tokenizer import save_tokenizer
    from varedit_lab.training import train

    tiny = Path(__file__).parent / "configs" / "tiny_editor.yaml"
    overrides = [f"data.val_shards={synthetic_shards['val']}", f"output_dir={tmp_path}", "data.cache_latents=false"]
    cfg = load_config(tiny, [f"data.train_shards={synthetic_shards['train']}", *overrides])
    module = EditorModule(cfg).train()
    out = tmp_path / "pre"
    written = precompute_shards(synthetic_shards["train"], out, module.tokenizer, module.schedule, 32,
                                text_encoder=module.text_encoder, text_dtype="float32", samples_per_shard=12)
    pre_cfg = load_config(tiny, [f"data.train_shards={shard_pattern(out, 'train', len(written))}", *overrides,
                                 f"tokenizer.checkpoint={save_tokenizer(module.tokenizer, tmp_path / 'tok.pt')}"])
    data = EditDataModule(pre_cfg.data, seed=0, rank=0, world_size=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["source_latent"].shape == (4, 8, 4, 4) and batch["target_bits_packed"].shape == (4, 21, 1)

    expected = module.encode_batch({k: v for k, v in batch.items() if k not in ("source_latent", "target_bits_packed")})
    monkeypatch.setattr(module.text_encoder, "encode", lambda texts: pytest.fail("T5 ran on a precomputed batch"))
    monkeypatch.setattr(module.tokenizer, "encode_latent", lambda x: pytest.fail("the VAE ran on a precomputed batch"))
    got = module.encode_batch(batch)
    torch.testing.assert_close(got.source_latent, expected.source_latent, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got.target_bits, expected.target_bits))
    torch.testing.assert_close(got.teacher_inputs, expected.teacher_inputs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.text.features, expected.text.features, rtol=0, atol=1e-6)
    assert torch.equal(got.text.lengths, expected.text.lengths)
    with pytest.raises(ValueError, match="bsc_scales"):
        module.encode_batch(batch, flip_probs=[0.1])

    run = train(pre_cfg)
    with open(run / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_precomputed_shards_for_another_schedule_are_refused(synthetic_shards, tmp_path) -> None:
    from pathlib import Path

    from varedit_lab.config import load_config
    from varedit_lab.module import EditorModule

    cfg = load_config(Path(__file__).parent / "configs" / "tiny_editor.yaml", [f"output_dir={tmp_path}"])
    module = EditorModule(cfg).train()
    batch = {"source_latent": torch.zeros(2, 8, 4, 4), "target_bits_packed": torch.zeros(2, 30, 1, dtype=torch.uint8), "instruction": ["a", "b"]}
    with pytest.raises(ValueError, match="precompute again"):
        module.encode_batch(batch)
