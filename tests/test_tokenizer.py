"""The BSQ tokenizer: architecture/key layout, strict loading, encode/decode contracts, parity."""

from __future__ import annotations

import pytest
import torch

from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.quant import multiscale_quantize
from varedit_lab.tokenizer import BSQTokenizer, TokenizerLoadError, VAEArch, load_tokenizer, save_tokenizer, to_uint8

TINY = VAEArch(codebook_dim=8, patch_size=4, base_ch=8, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=4)
SCHEDULE = ScaleSchedule.from_scales([1, 2, 4])  # 16 px images at stride 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Small convolutions gain nothing from a second thread and suffer badly from OpenMP spin-waits
    # on a loaded machine; conftest restores the thread count.
    torch.set_num_threads(1)


def tiny(seed: int = 0, arch: VAEArch = TINY) -> BSQTokenizer:
    torch.manual_seed(seed)
    return BSQTokenizer(arch).eval()


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# architecture and key layout
def test_released_key_layout_and_level_rules() -> None:
    """Downsample at encoder levels < log2(p), upsample at decoder levels 1..log2(p), nin only where widths change."""
    arch = VAEArch(codebook_dim=32, patch_size=16, base_ch=32, encoder_ch_mult=(1, 2, 1, 1, 1), decoder_ch_mult=(1, 2, 1, 1, 1), norm_num_groups=32)
    keys = set(BSQTokenizer(arch).state_dict())
    assert {f"encoder.down.{i}.downsample.conv.conv.weight" for i in range(4)} <= keys
    assert "encoder.down.4.downsample.conv.conv.weight" not in keys
    assert {f"decoder.up.{i}.upsample.conv.conv.weight" for i in range(1, 5)} <= keys
    assert "decoder.up.0.upsample.conv.conv.weight" not in keys
    nin = sorted(k for k in keys if "nin_shortcut.conv.weight" in k)
    assert nin == [f"{p}.block.0.nin_shortcut.conv.weight" for p in ("decoder.up.0", "decoder.up.1", "encoder.down.1", "encoder.down.2")]
    assert len([k for k in keys if k.startswith("decoder.up.0.block.")]) == 2 * 8 + 2  # num_res_blocks + 1 blocks
    assert {"quantizer.lfq.mask", "quantize.lfq.mask"} <= keys


@pytest.mark.parametrize("config, tensors, params", [("varedit_2b_256", 270, 110.1), ("varedit_8b_512", 226, 81.6)])
def test_released_tokenizer_sizes(config: str, tensors: int, params: float) -> None:
    """The released configs rebuild the released VAEs: tensor count and parameters (reference-model.md 3.1)."""
    from varedit_lab.config import experiments_dir, load_config

    cfg = load_config(experiments_dir() / "released" / f"{config}.yaml")
    with torch.device("meta"):
        vae = BSQTokenizer.from_config(cfg.tokenizer)
    assert len(vae.state_dict()) == tensors
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == params


def test_shapes_and_token_channels() -> None:
    vae = tiny()
    x = images()
    latent = vae.encode_latent(x)
    assert latent.shape == (2, 8, 4, 4) and latent.dtype == torch.float32
    assert vae.encode_source(x, SCHEDULE).shape == (2, 16, 8)
    assert vae.decode_codes(latent).shape == (2, 3, 16, 16)
    patch = tiny(arch=VAEArch(**{**TINY.__dict__, "apply_spatial_patchify": True}))
    sched = ScaleSchedule.from_scales([1, 2])  # token grids; the VAE grid is twice as large
    src = patch.encode_source(x, sched)
    assert patch.token_channels == 32 and src.shape == (2, 4, 32)
    tokens = patch.encode_target(x, sched)
    assert [b.shape for b in tokens.bits] == [(2, 1, 32), (2, 4, 32)]
    assert patch.decode(tokens.bits, sched).shape == (2, 3, 16, 16)


def test_encode_target_uses_the_shared_quantizer_and_decode_inverts_bits() -> None:
    vae = tiny()
    x = images()
    tokens = vae.encode_target(x, SCHEDULE)
    expected = multiscale_quantize(vae.encode_latent(x), SCHEDULE, patchify=False)
    for got, want in zip(tokens.bits, expected.bits):
        assert torch.equal(got, want)
    assert torch.allclose(vae.codes_from_bits(tokens.bits, SCHEDULE), tokens.summed_codes, atol=1e-6)
    decoded = vae.decode(tokens.bits, SCHEDULE)
    assert torch.allclose(decoded, vae.decode_codes(tokens.summed_codes), atol=1e-5)
    assert decoded.abs().max() <= 1.0


def test_encode_source_is_continuous_and_resized_by_area() -> None:
    vae = tiny()
    x = images(size=32)  # an 8x8 latent for a 4x4 finest grid: area-resized, not quantised
    src = vae.encode_source(x, SCHEDULE)
    latent = vae.encode_latent(x)
    pooled = torch.nn.functional.avg_pool2d(latent, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(src, pooled, atol=1e-6)
    assert src.abs().unique().numel() > 10  # not +-1/sqrt(d) codes


def test_encode_target_rejects_a_wrong_image_size() -> None:
    with pytest.raises(ValueError, match="finest VAE grid"):
        tiny().encode_target(images(size=32), SCHEDULE)


def test_to_uint8_truncates_like_the_release() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


# ------------------------------------------------------------------------------------------------
# loading
def _released_state(vae: BSQTokenizer, plain: bool = False) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    if plain:  # released files may use plain names (x.weight) instead of wrapper names (x.conv.weight)
        sd = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias").replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("wrapper", ["vae", "ema", None])
@pytest.mark.parametrize("plain", [False, True])
def test_load_released_layouts(tmp_path, wrapper: str | None, plain: bool) -> None:
    src = tiny(seed=1)
    sd = _released_state(src, plain)
    if plain:
        assert "encoder.conv_in.weight" in sd and "encoder.down.0.block.0.norm1.weight" in sd
    path = tmp_path / "vae.pth"
    torch.save({wrapper: sd} if wrapper else sd, path)
    loaded = load_tokenizer(path, TINY)
    for key, value in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images()
    assert torch.equal(loaded.encode_latent(x), src.encode_latent(x))


def test_load_accepts_missing_mask_buffers(tmp_path) -> None:
    sd = _released_state(tiny())
    del sd["quantizer.lfq.mask"], sd["quantize.lfq.mask"]
    torch.save({"vae": sd}, tmp_path / "v.pth")
    load_tokenizer(tmp_path / "v.pth", TINY)


def test_load_names_an_unexpected_key_and_a_missing_key(tmp_path) -> None:
    sd = _released_state(tiny())
    sd["encoder.conv_in.conv.wieght"] = sd.pop("encoder.conv_in.conv.weight")
    torch.save({"vae": sd}, tmp_path / "v.pth")
    with pytest.raises(TokenizerLoadError) as err:
        load_tokenizer(tmp_path / "v.pth", TINY)
    assert "missing keys (1): ['encoder.conv_in.conv.weight']" in str(err.value)
    assert "unexpected keys (1): ['encoder.conv_in.conv.wieght']" in str(err.value)


def test_load_names_a_shape_mismatch(tmp_path) -> None:
    sd = _released_state(tiny())
    sd["decoder.conv_out.conv.weight"] = torch.zeros(3, 8, 1, 1)
    torch.save(sd, tmp_path / "v.pth")
    with pytest.raises(TokenizerLoadError, match=r"decoder\.conv_out\.conv\.weight: checkpoint \(3, 8, 1, 1\) vs model \(3, 8, 3, 3\)"):
        load_tokenizer(tmp_path / "v.pth", TINY)


def test_load_with_the_wrong_architecture_fails(tmp_path) -> None:
    torch.save({"vae": _released_state(tiny())}, tmp_path / "v.pth")
    other = VAEArch(**{**TINY.__dict__, "codebook_dim": 16})
    with pytest.raises(TokenizerLoadError, match="shape mismatches"):
        load_tokenizer(tmp_path / "v.pth", other)


def test_load_rejects_a_wrong_mask_and_a_missing_config(tmp_path) -> None:
    sd = _released_state(tiny())
    sd["quantize.lfq.mask"] = torch.arange(8)
    torch.save({"vae": sd}, tmp_path / "v.pth")
    with pytest.raises(TokenizerLoadError, match="quantize.lfq.mask"):
        load_tokenizer(tmp_path / "v.pth", TINY)
    with pytest.raises(TokenizerLoadError, match="pass the tokenizer config"):
        load_tokenizer(tmp_path / "v.pth")
    torch.save({"model": 1}, tmp_path / "w.pth")
    with pytest.raises(TokenizerLoadError, match="no VAE state dict"):
        load_tokenizer(tmp_path / "w.pth", TINY)


def test_own_checkpoint_round_trip_carries_its_config(tmp_path) -> None:
    src = tiny(seed=3)
    path = save_tokenizer(src, tmp_path / "tok.pt", {"scales": [1, 2, 4]})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "varedit-lab-tokenizer" and raw["config"]["codebook_dim"] == 8
    assert "encoder.conv_in.conv.weight" in raw["vae"]  # released key names
    loaded = load_tokenizer(path)  # no config needed
    assert loaded.arch == TINY
    x = images()
    assert torch.equal(loaded.encode_latent(x), src.encode_latent(x))


def test_from_config_reads_a_tokenizer_config() -> None:
    from varedit_lab.config import TokenizerConfig

    vae = BSQTokenizer.from_config(TokenizerConfig(codebook_dim=12, patch_size=16, encoder_ch_mult=[1, 1, 2, 2, 2], decoder_ch_mult=[1, 1, 2, 2, 2]))
    assert vae.codebook_dim == 12 and vae.patch_size == 16
    assert vae.encode_latent(torch.zeros(1, 3, 32, 32)).shape == (1, 12, 2, 2)


# ------------------------------------------------------------------------------------------------
# parity with the reference fixtures
def test_reference_fixture_tokenizer_fields(fixture_files) -> None:
    from varedit_lab.parity import load_fixture
    from varedit_lab.tokenizer.parity import check_tokenizer

    for path in fixture_files:
        results = check_tokenizer(load_fixture(path))
        fields = {r.field for r in results}
        assert {"src_features", "gt_bits", "teacher_inputs", "vae_recon_image", "greedy_image"} <= fields
        bad = [(r.field, r.max_abs_diff) for r in results if not r.ok]
        assert not bad, f"{path.name}: {bad}"
