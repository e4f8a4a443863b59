"""Useful-FLOP counting (varedit_lab.model.flops) against hand counts."""

from __future__ import annotations

import pytest

import conditioning
from varedit_lab.model.flops import edit_flops, forward_flops, recompute_edit_flops, train_step_flops, visible_pairs
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.transformer import TransformerConfig

TWO_SCALES = ScaleSchedule.from_scales([1, 2])  # T = 1 + 4, finest 2x2: S = 4


def layout(name: str, **options):
    return conditioning.build(name, options).layout(TWO_SCALES, "paper")


@pytest.mark.parametrize(
    "name, options, expected",
    [
        # source 4x4 | SOS: source + itself | scale 1 (4 tokens): source + SOS + itself
        ("max_scale", {}, 16 + 1 * 5 + 4 * 9),
        # full coarser: src0 1x1 | src1 4x(1+4) | tgt0 1x(src0 + tgt0) | tgt1 4x(all 10)
        ("full_scale", {}, 1 + 20 + 2 + 40),
        # full all: sources see both sources (5 keys) | tgt0 5 + 1 | tgt1 5 + 1 + 4
        ("full_scale", {"visibility": "all"}, 5 + 20 + 6 + 40),
    ],
)
def test_visible_pairs_hand_counts(name, options, expected):
    lay = layout(name, **options)
    assert all(visible_pairs(lay, layer) == expected for layer in range(3))


def test_sar_layer0_counts_pooled_keys():
    lay = layout("sar")
    # source 4x4 | SOS: pooled source (1 key) + SOS | scale 1: pooled = identity (4) + SOS + itself
    assert visible_pairs(lay, 0) == 16 + 1 * 2 + 4 * 9
    assert visible_pairs(lay, 1) == 16 + 5 + 36  # later layers are max-scale layers
    # Only queries from index 4 on (the targets): the last layer skips source rows.
    assert visible_pairs(lay, 1, query_from=4) == 5 + 36


def test_released_256px_pairs_match_the_spec():
    """reference-model.md section 2.2: 0.38 M (max/SAR layers >= 1), 0.34 M (SAR layer 0), 0.55 M (full)."""
    sched = ScaleSchedule.from_scales("0.06M")
    sar = conditioning.build("sar").layout(sched, "paper")
    full = conditioning.build("full_scale").layout(sched, "paper")
    assert round(visible_pairs(sar, 1) / 1e6, 2) == 0.38
    assert round(visible_pairs(sar, 0) / 1e6, 2) == 0.34
    assert round(visible_pairs(full, 0) / 1e6, 2) == 0.55


def test_forward_flops_hand_count():
    c, heads, hid, ct5, d, depth, text_len = 8, 2, 32, 4, 2, 2, 3
    cfg = TransformerConfig(depth=depth, width=c, num_heads=heads, mlp_hidden=hid, text_channels=ct5, text_maxlen=8, codebook_dim=d)
    lay = layout("max_scale")
    n, s, t = 9, 4, 5  # sequence, source, target tokens
    pool_heads = cfg.text_pool_heads
    text = text_len * ct5 * 2 * c + pool_heads * text_len * (c // pool_heads) * 2 + c * c + text_len * (ct5 * c + c * c) + 6 * c * c + 2 * c * c
    embed = (n - 1) * d * c
    # layer 0: every token; layer 1 (last): source rows only project keys and values
    attn_proj = n * 4 * c * c + (t * 4 * c * c + s * 2 * c * c)
    pairs = (16 + 5 + 36) + (5 + 36)
    cross = (n + t) * 2 * c * c + depth * text_len * 2 * c * c + 2 * (n + t) * text_len * c
    ffn = (n + t) * 2 * c * hid
    head = t * c * 2 * d
    macs = text + embed + attn_proj + 2 * pairs * c + cross + ffn + head
    got = forward_flops(cfg, lay, text_len)
    assert got.total == pytest.approx(2 * macs)
    assert got.attn_pairs == pytest.approx(2 * 2 * pairs * c)
    assert train_step_flops(cfg, lay, text_len, batch=3) == pytest.approx(3 * 3 * 2 * macs)
    assert edit_flops(cfg, lay, text_len) == pytest.approx(2 * 2 * macs)
    assert edit_flops(cfg, lay, text_len, guided=False) == pytest.approx(2 * macs)


def test_recompute_edit_flops_hand_count():
    """Without a cache, scale s re-runs the prefix [source, scales <= s]: for scales [1, 2] the extra
    work over the cached edit is the forward of [source (4), SOS (1)] (its head row is counted in
    both)."""
    c, heads, hid, ct5, d, depth, text_len = 8, 2, 32, 4, 2, 2, 3
    cfg = TransformerConfig(depth=depth, width=c, num_heads=heads, mlp_hidden=hid, text_channels=ct5, text_maxlen=8, codebook_dim=d)
    lay = layout("max_scale")
    n, t = 5, 1  # prefix tokens, its target tokens (the SOS)
    embed = (n - 1) * d * c
    attn_proj = n * 4 * c * c + (t * 4 * c * c + 4 * 2 * c * c)
    pairs = (16 + 5) + 5
    cross = (n + t) * 2 * c * c + depth * text_len * 2 * c * c + 2 * (n + t) * text_len * c
    ffn = (n + t) * 2 * c * hid
    prefix = 2 * (embed + attn_proj + 2 * pairs * c + cross + ffn)
    extra = recompute_edit_flops(cfg, lay, text_len, guided=False) - edit_flops(cfg, lay, text_len, guided=False)
    assert extra == pytest.approx(prefix)
    assert recompute_edit_flops(cfg, lay, text_len) == pytest.approx(2 * recompute_edit_flops(cfg, lay, text_len, guided=False))
