"""Released key layout <-> ours, strict loading, presets."""

import pytest
import torch

from varedit_lab.model.compat import CheckpointError, from_released, load_state_dict_strict, to_released
from varedit_lab.model.presets import PRESETS, RELEASED_TOKENIZERS, mlp_hidden
from varedit_lab.model.transformer import TransformerConfig, VAREditTransformer
from varedit_lab.parity import check_reference, fixture_model, format_table, load_fixture


def tiny(depth=2, maxlen=16, chunks=2):
    return VAREditTransformer(TransformerConfig(depth=depth, width=64, num_heads=2, mlp_hidden=256, text_channels=32,
                                                text_maxlen=maxlen, codebook_dim=8, block_chunks=chunks))


@pytest.mark.parametrize("name,billions", [("infinity_2b", 2.205), ("infinity_8b", 8.376)])
def test_released_presets_parameter_counts_on_meta(name, billions):
    p, tok = PRESETS[name], RELEASED_TOKENIZERS[name]
    cfg = TransformerConfig(depth=p["depth"], width=p["width"], num_heads=p["num_heads"], mlp_hidden=mlp_hidden(p["width"], 4.0),
                            text_channels=p["text_channels"], text_maxlen=p["text_maxlen"], codebook_dim=tok["codebook_dim"],
                            patchify=tok["apply_spatial_patchify"], block_chunks=p["block_chunks"])
    with torch.device("meta"):
        model = VAREditTransformer(cfg)
    count = sum(t.numel() for t in model.parameters()) / 1e9
    assert abs(count - billions) / billions < 1e-3
    released = to_released(model.state_dict(), p["block_chunks"])
    assert len(released) == 22 + 21 * p["depth"]  # reference-model.md section 14.2 (694 / 862)


def test_roundtrip_released_layout():
    model = tiny()
    released = to_released(model.state_dict(), block_chunks=2)
    assert "block_chunks.1.module.0.sa.mat_qkv.weight" in released
    assert "block_chunks.0.module.0.ca.zero_k_bias" in released
    assert len(released) == 64
    back = from_released(released)
    assert set(back) == set(model.state_dict())
    other = tiny()
    load_state_dict_strict(other, released)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_strict_load_names_missing_unexpected_and_shapes():
    model = tiny()
    sd = to_released(model.state_dict(), 2)
    sd["block_chunks.0.module.0.sa.extra"] = torch.zeros(1)
    del sd["head.bias"]
    sd["word_embed.weight"] = torch.zeros(64, 9)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(tiny(), sd)
    msg = str(err.value)
    assert "blocks.0.sa.extra" in msg and "head.bias" in msg and "word_embed.weight" in msg


def test_nonzero_zero_buffer_is_rejected():
    sd = to_released(tiny().state_dict(), 2)
    sd["block_chunks.0.module.0.sa.zero_k_bias"] += 1
    with pytest.raises(CheckpointError, match="zero_k_bias"):
        load_state_dict_strict(tiny(), sd)


def test_cfg_uncond_is_padded_or_truncated_like_the_release():
    src = tiny(maxlen=8)
    longer, shorter = tiny(maxlen=16), tiny(maxlen=4)
    load_state_dict_strict(longer, src.state_dict())
    assert torch.equal(longer.cfg_uncond[:8], src.cfg_uncond)
    load_state_dict_strict(shorter, src.state_dict())
    assert torch.equal(shorter.cfg_uncond, src.cfg_uncond[:4])


def test_parity_with_reference_fixtures(fixture_files):
    for path in fixture_files:
        results = check_reference(path)
        table = format_table(results)
        assert all(r.ok for r in results), table
        fields = {r.field for r in results}
        assert {"logits_teacher_forced", "loss", "logits_cached_cfg", "greedy_bits"} <= fields


def test_fixture_state_dict_loads_strictly_into_fresh_model(fixture_files):
    fixture = load_fixture(fixture_files[0])
    model = fixture_model(fixture)
    assert len(to_released(model.state_dict(), fixture["config"]["transformer"]["block_chunks"])) == len(fixture["model_state_dict"])
