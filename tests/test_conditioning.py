"""Who sees whom, for every strategy; sequence lengths; registry behaviour."""

import dataclasses

import pytest
import torch

from conditioning import available, build, register, resolve
from conditioning.base import ConditioningStrategy
from conditioning.max_scale import MaxScale
from varedit_lab.model.layout import ScaleSchedule, reference_rope_positions

SCHED_256 = ScaleSchedule.from_scales("0.06M")
SCHED_512 = ScaleSchedule.from_scales("0.25M")


def blocks_of(layout):
    """Block id of every sequence token, and (kind, scale) per block."""
    ids = torch.repeat_interleave(torch.arange(layout.num_blocks), torch.tensor(layout.block_sizes))
    kinds = [("src", s) for s in range(layout.num_source_blocks)] + [("tgt", s) for s in range(layout.schedule.num_scales)]
    return ids, kinds


@pytest.mark.parametrize("name,length", [("max_scale", 777), ("sar", 777), ("full_scale", 1042)])
def test_sequence_lengths_256(name, length):
    assert build(name).layout(SCHED_256, "paper").length == length


@pytest.mark.parametrize("name,length", [("max_scale", 3545), ("sar", 3545), ("full_scale", 5042)])
def test_sequence_lengths_512(name, length):
    assert build(name).layout(SCHED_512, "paper").length == length


@pytest.mark.parametrize("name", ["max_scale", "sar", "full_scale"])
@pytest.mark.parametrize("layer", [0, 1])
def test_source_never_sees_target_and_no_future_scales(name, layer):
    layout = build(name).layout(SCHED_256, "paper")
    mask = layout.token_mask(layer)[:, : layout.length]  # sequence keys only
    ids, kinds = blocks_of(layout)
    q_kind = [kinds[i] for i in ids.tolist()]
    for qb in range(layout.num_blocks):
        rows = mask[ids == qb]
        kind, scale = kinds[qb]
        for kb in range(layout.num_blocks):
            seen = rows[:, ids == kb]
            kkind, kscale = kinds[kb]
            if kind == "src" and kkind == "tgt":
                assert not seen.any(), "a source token sees a target token"
            if kind == "tgt" and kkind == "tgt" and kscale > scale:
                assert not seen.any(), "target scale sees a finer target scale"
            if kind == "tgt" and kkind == "tgt" and kscale <= scale:
                assert seen.all(), "target scale must see target scales <= its own"
    assert len(q_kind) == layout.length


def test_max_scale_targets_see_whole_source_in_every_layer():
    layout = build("max_scale").layout(SCHED_256, "paper")
    for layer in (0, 3):
        mask = layout.token_mask(layer)
        assert mask[256:, :256].all() and mask[:256, :256].all()


def test_sar_layer0_sees_only_pooled_reference_of_its_own_scale():
    layout = build("sar").layout(SCHED_256, "paper")
    mask0 = layout.token_mask(0)
    s = SCHED_256
    assert mask0.shape == (777, 777 + s.total)
    assert not mask0[256:, :256].any(), "SAR layer 0 targets must not see the full-res source"
    assert mask0[:256, :256].all() and not mask0[:256, 777:].any()
    for k, (start, n) in enumerate(zip(s.offsets, s.sizes)):
        rows = mask0[256 + start : 256 + start + n, 777:]
        expected = torch.zeros(s.total, dtype=torch.bool)
        expected[start : start + n] = True
        assert (rows == expected).all(), f"scale {k} must see exactly its pooled reference"
    # Layers >= 1 are max-scale layers.
    assert torch.equal(layout.token_mask(1), build("max_scale").layout(SCHED_256, "paper").token_mask(1))


def test_sar_identity_pooling_on_finest_scale_equals_max_scale():
    """At the finest scale pool_K is the identity: SAR's layer 0 sees exactly max-scale's keys there."""
    layout = build("sar").layout(SCHED_256, "paper")
    ext = layout.visibility(0).extension
    b, h, d = 2, 2, 8
    keys = [torch.randn(b, h, n, d) for n in layout.block_sizes]
    values = [torch.randn(b, h, n, d) for n in layout.block_sizes]
    k_last, v_last = ext.compute(SCHED_256.num_scales - 1, keys, values)
    assert torch.equal(k_last, keys[0]) and torch.equal(v_last, values[0])
    # and pooling to 1x1 is the global mean
    k0, _ = ext.compute(0, keys, values)
    torch.testing.assert_close(k0, keys[0].mean(dim=2, keepdim=True))


def test_full_scale_coarser_vs_all():
    coarser = build("full_scale").layout(SCHED_256, "paper")
    everything = build("full_scale", {"visibility": "all"}).layout(SCHED_256, "paper")
    s = SCHED_256
    for k, (start, n) in enumerate(zip(s.offsets, s.sizes)):
        q = s.total + start  # first token of target scale k
        src_seen = coarser.token_mask(0)[q, : s.total]
        assert src_seen[: start + n].all() and not src_seen[start + n :].any()
        assert everything.token_mask(0)[q, : s.total].all()
    assert coarser.token_mask(0).sum() == 545067  # reference-model.md section 2.2: 0.55 M pairs
    assert build("max_scale").layout(SCHED_256, "paper").token_mask(0).sum() == 380601  # 0.38 M
    assert build("sar").layout(SCHED_256, "paper").token_mask(0).sum() == 339162  # 0.34 M


def test_levels_and_positions():
    k = SCHED_256.num_scales
    max_layout = build("max_scale").layout(SCHED_256, "paper")
    assert (max_layout.levels[:256] == k - 1).all() and max_layout.levels[256] == 0
    assert (max_layout.positions[:256] >= 64).all()  # source offset by (64, 64)
    full = build("full_scale").layout(SCHED_256, "paper")
    assert torch.equal(full.levels[: SCHED_256.total], SCHED_256.scale_ids())
    finest_levels = build("full_scale", {"source_levels": "finest"}).layout(SCHED_256, "paper").levels
    assert (finest_levels[: SCHED_256.total] == k - 1).all()
    # reference_compat for all three: the release's table read contiguously from row 0, so the finest
    # source block of max-scale / SAR and full-scale's first source rows share positions, and every
    # strategy's targets continue the same table right after their sources.
    table = reference_rope_positions(2 * SCHED_256.total)
    for name in ("max_scale", "sar", "full_scale"):
        layout = build(name).layout(SCHED_256, "reference_compat")
        assert torch.equal(layout.positions, table[: layout.length]), name
    full_compat = build("full_scale").layout(SCHED_256, "reference_compat")
    assert full_compat.length == 2 * SCHED_256.total and full_compat.num_source_tokens == SCHED_256.total


def test_source_tokens_finest_block_equals_max_scale_prefix():
    latent = torch.randn(2, 8, 16, 16)
    full = build("full_scale").source_tokens(latent, SCHED_256, patchify=False)
    maxs = build("max_scale").source_tokens(latent, SCHED_256, patchify=False)
    assert full.shape == (2, SCHED_256.total, 8) and maxs.shape == (2, 256, 8)
    torch.testing.assert_close(full[:, -256:], maxs)


def test_registry_unknown_name_lists_registered():
    with pytest.raises(KeyError) as err:
        resolve("nope")
    for name in ("full_scale", "max_scale", "sar"):
        assert name in str(err.value)


class NoCoarseTargets(MaxScale):
    """An out-of-repo style strategy: targets do not see scale 0 (used to test plug-ins)."""

    name = "test_plugin"

    def build_layout(self, schedule, rope_layout):
        layout = super().build_layout(schedule, rope_layout)
        vis = layout.default_visibility.visible.clone()
        vis[2:, 1] = False
        return dataclasses.replace(layout, default_visibility=dataclasses.replace(layout.default_visibility, visible=vis))


def test_dotted_path_and_register():
    cls = resolve("tests.test_conditioning:NoCoarseTargets")
    assert issubclass(cls, ConditioningStrategy)
    register(NoCoarseTargets)
    assert "test_plugin" in available()
    layout = build("test_plugin").layout(SCHED_256, "paper")
    assert not layout.token_mask(0)[258, 256]


def test_presets_and_text_only_are_registered_strategies():
    """A preset is a strategy with options under its own name (one sweep value); text_only has no source."""
    assert {"full_scale_all", "text_only"} <= set(available())
    preset = build("full_scale_all")
    assert preset.name == "full_scale" and preset.options.visibility == "all"
    assert build("full_scale_all", {"source_levels": "finest"}).options.visibility == "all"  # config options add to the preset's
    assert build("full_scale_all", {"visibility": "coarser"}).options.visibility == "coarser"  # ... and override them
    all_visible = build("full_scale_all").layout(SCHED_256, "paper").default_visibility.visible
    k = SCHED_256.num_scales
    assert all_visible[k:, :k].all()  # every target scale sees every source scale (paper Eq. 4)
    text_only = build("text_only").layout(SCHED_256, "paper")
    assert text_only.num_source_blocks == 0 and text_only.length == SCHED_256.total
    with pytest.raises(KeyError, match="full_scale_all"):
        build("full_scale_al")
