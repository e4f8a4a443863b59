"""The Fig. 3 analysis (probes/alignment.py) on attention with known answers, the structural labels of
the strategy comparison, and the readability of the probe plots (issue 18)."""

from __future__ import annotations

import math

import pytest
import torch

import tests.test_probes as tp
from tests.test_probes import batch, tiny_model, zero_query_key
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.probes import AttentionProbe, MapRequest, probe_model
from varedit_lab.probes import alignment, plots
from varedit_lab.probes.compare import layer_profile, summary_markdown
from varedit_lab.probes.eager import visible_key_blocks

ALL = {"visibility": "all"}
COARSER = {"visibility": "coarser"}


# ---------------------------------------------------------------------------------------------------
# uniform attention (q = k = 0): every number follows from token counts


def test_uniform_attention_all_visibility_hand_computed():
    """Sources 1, 4, 16 tokens (21). Layer 0 keys per target scale: SOS 21 + 1 = 22; tgt1 21 + 1 + 4 = 26;
    tgt2 21 + 21 = 42 (it has no finer source: its share is fixed by the mask)."""
    model = tiny_model()
    zero_query_key(model)
    result = probe_model(model, *batch("full_scale", ALL))
    al = alignment.layer_alignment(result, 0)
    assert al.scale_labels == ["sos", "tgt1@2x2", "tgt2@4x4"]
    expected = {"corresponding": [1 / 22, 4 / 26, 16 / 42], "coarser": [0, 1 / 26, 5 / 42], "finer": [20 / 22, 16 / 26, 0]}
    for cls, values in expected.items():
        assert al.mass[cls].tolist() == pytest.approx(values, abs=1e-5)
        assert al.uniform_mass[cls].tolist() == pytest.approx(values, abs=1e-12)
    assert al.aligned_share.tolist() == pytest.approx([1 / 21, 5 / 21, 1.0], abs=1e-5)
    assert al.structural.tolist() == [False, False, True]
    assert al.informative == [0, 1]
    assert al.lift[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    for layer in (0, 1):  # uniform attention is neither local nor diagonal
        deep = alignment.layer_alignment(result, layer)
        assert deep.local_scales() == [1, 2]
        assert deep.locality_lift[1:].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
        assert deep.diagonality[1:].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    layer1, deeper = alignment.verdicts(result)
    assert layer1.outcome == "not supported" and "0/2 informative scales" in layer1.evidence
    assert deeper.outcome == "not supported" and "0/1 layers" in deeper.evidence


@pytest.mark.parametrize("name,options", [("full_scale", COARSER), ("max_scale", {}), ("sar", {})])
def test_mask_fixed_shares_are_not_testable(name, options):
    """Full-scale ``coarser`` (target s sees source <= s), max-scale (only the finest source) and SAR's
    layer 0 (only its own reference): the corresponding+coarser share is fixed by the mask."""
    model = tiny_model()
    zero_query_key(model)
    result = probe_model(model, *batch(name, options))
    al = alignment.layer_alignment(result, 0)
    assert al.structural.all() and al.informative == []
    if name == "full_scale":  # SOS: src@1x1 + sos; tgt1: 1 + 4 + sos + 4; tgt2: 21 + 21
        assert al.mass["corresponding"].tolist() == pytest.approx([1 / 2, 4 / 10, 16 / 42], abs=1e-5)
        assert al.mass["coarser"].tolist() == pytest.approx([0, 1 / 10, 5 / 42], abs=1e-5)
    verdict = alignment.layer1_verdict(result)
    assert verdict.outcome == "not testable" and "fixed by the mask" in verdict.evidence
    text = alignment.alignment_markdown(result)
    assert "not testable" in text and "structural (mask)" in text and "is not, so shares the mask fixes" in text


def test_not_testable_without_layer_zero_or_deeper_layers():
    model = tiny_model()
    plan, teacher, text = batch("full_scale", ALL)
    only_last = probe_model(model, plan, teacher, text, layers=[-1])
    assert alignment.layer1_verdict(only_last).outcome == "not testable"
    only_first = probe_model(model, plan, teacher, text, layers=[0])
    assert alignment.deeper_verdict(only_first).outcome == "not testable"


# ---------------------------------------------------------------------------------------------------
# constructed attention with known verdicts


def _record(probe: AttentionProbe, layer: int, layout, block: int, weights: dict[int, torch.Tensor]) -> None:
    """Feed the weights of every query row of ``block`` (key block -> (n, size) tensor) to the recorder."""
    vis = layout.visibility(layer)
    keys = visible_key_blocks(vis, block)
    sizes = layout.key_block_sizes(vis)
    n = layout.block_sizes[block]
    rows = torch.cat([weights.get(kb, torch.zeros(n, sizes[kb])) for kb in keys], dim=1)
    torch.testing.assert_close(rows.sum(1), torch.ones(n))
    probe.record(layer, layout, 2, block, 0, rows.expand(1, 2, n, rows.shape[1]).clone(), keys)


def _uniform(layout, layer: int, block: int) -> dict[int, torch.Tensor]:
    vis = layout.visibility(layer)
    keys = visible_key_blocks(vis, block)
    sizes = layout.key_block_sizes(vis)
    total = sum(sizes[kb] for kb in keys)
    return {kb: torch.full((layout.block_sizes[block], sizes[kb]), 1 / total) for kb in keys}


def _constructed(layer1_tgt1_aligned: bool, deep_local: bool):
    """Full-scale, all visibility, blocks [src@1x1, src@2x2, src@4x4 | sos, tgt1@2x2, tgt2@4x4].

    Layer 0: SOS puts all its mass on src@1x1 (share 1, uniform 1/21: lift 21); tgt1 puts 0.25 on
    src@1x1, 0.5 on src@2x2, 0.25 on src@4x4 (share 0.75, uniform 5/21: lift 3.15), or attends
    uniformly (lift 1). Layer 1: every target query attends uniformly to its aligned tokens of the
    finest source: tgt1 -> its 2x2 cell (locality 1 vs 4/16: lift 4; diagonality 1 / (4/16) = 4);
    tgt2 -> its own token (locality lift 1 / (100/256) = 2.56; diagonality 16); or uniformly (lift 1)."""
    from varedit_lab.probes import geometry

    model = tiny_model()
    layout = batch("full_scale", ALL)[0].layout
    probe = AttentionProbe(model, layers=[0, 1])
    sos, tgt1, tgt2 = 3, 4, 5
    _record(probe, 0, layout, sos, {0: torch.ones(1, 1)})
    if layer1_tgt1_aligned:
        _record(probe, 0, layout, tgt1, {0: torch.full((4, 1), 0.25), 1: torch.full((4, 4), 0.125), 2: torch.full((4, 16), 0.25 / 16)})
    else:
        _record(probe, 0, layout, tgt1, _uniform(layout, 0, tgt1))
    _record(probe, 0, layout, tgt2, _uniform(layout, 0, tgt2))
    for block in range(3):
        _record(probe, 0, layout, block, _uniform(layout, 0, block))
    for block in range(6):
        if deep_local and block in (tgt1, tgt2):
            aligned = geometry.aligned_tokens(geometry.block_grid(layout, block), (4, 4)).double()
            _record(probe, 1, layout, block, {2: (aligned / aligned.sum(1, keepdim=True)).float()})
        else:
            _record(probe, 1, layout, block, _uniform(layout, 1, block))
    return probe.result


@pytest.mark.parametrize("aligned,local,first,deeper", [
    (True, True, "supported", "supported"),
    (False, True, "mixed", "supported"),
    (True, False, "supported", "not supported"),
])
def test_constructed_attention_gives_declared_verdicts(aligned, local, first, deeper):
    result = _constructed(aligned, local)
    al0 = alignment.layer_alignment(result, 0)
    assert al0.informative == [0, 1]
    assert float(al0.lift[0]) == pytest.approx(21.0)
    assert float(al0.lift[1]) == pytest.approx(0.75 / (5 / 21) if aligned else 1.0, abs=1e-6)
    al1 = alignment.layer_alignment(result, 1)
    if local:
        assert al1.locality_lift[1:].tolist() == pytest.approx([4.0, 256 / 100])
        assert al1.diagonality[1:].tolist() == pytest.approx([4.0, 16.0])
    layer1, deep = alignment.verdicts(result)
    assert (layer1.outcome, deep.outcome) == (first, deeper)
    rows = alignment.layer_rows(result)
    assert [r["layer"] for r in rows] == [0, 1] and not rows[0]["structural"]
    assert rows[0]["lift_max"] == pytest.approx(21.0)
    data = alignment.to_dict(result)
    assert [v["outcome"] for v in data["verdicts"]] == [first, deeper] and data["min_lift"] == alignment.MIN_LIFT
    text = alignment.alignment_markdown(result, image=None)
    assert f"**{first}**" in text and f"**{deeper}**" in text and "is not, so" not in text  # the paper's setting
    assert "![" not in text and "| tgt1@2x2 |" in text


def test_source_class_and_mask_fixed_share():
    assert alignment.source_class((2, 2), (2, 2)) == "corresponding"
    assert alignment.source_class((1, 1), (2, 2)) == "coarser"
    assert alignment.source_class((4, 4), (2, 2)) == "finer"
    layout = batch("max_scale", {})[0].layout
    vis = layout.visibility(0)
    # max-scale: one source block (4x4): the 2x2 scale sees only a finer block, the 4x4 only its own
    assert alignment.source_key_classes(layout, vis, 2) == {0: "finer"}
    assert alignment.share_fixed_by_mask(layout, vis, 2, {"corresponding"})
    assert alignment.share_fixed_by_mask(layout, vis, 3, {"corresponding"})


# ---------------------------------------------------------------------------------------------------
# issue 18: structural same-scale share labelled; readable plots


def test_same_scale_share_marked_structural():
    results = {name: probe_model(tiny_model(), *batch(name, opts)) for name, opts in
               (("full_scale", ALL), ("max_scale", {}), ("sar", {}))}
    assert layer_profile(results["max_scale"], 0)["same_scale_structural"].tolist() == [1.0, 1.0]
    assert layer_profile(results["sar"], 0)["same_scale_structural"].tolist() == [1.0, 1.0]
    assert layer_profile(results["full_scale"], 0)["same_scale_structural"].tolist() == [0.0, 0.0]
    table = summary_markdown(results)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "structural" not in rows["full_scale"]
    assert rows["max_scale"].count("(structural)") == 2 and rows["sar"].count("(structural)") == 2
    assert "fixed by the attention mask, not learned" in table
    assert "structural" not in summary_markdown({"full_scale": results["full_scale"]})


def test_thin_labels_keeps_large_blocks_apart():
    # blocks of 1, 4, 16, 64 tokens side by side; labels need 10 units between centres
    sizes = [1, 4, 16, 64]
    starts = [0, 1, 5, 21]
    centres = [s + (n - 1) / 2 for s, n in zip(starts, sizes)]  # 0, 2.5, 12.5, 52.5
    assert plots.thin_labels(centres, sizes, 10.0) == [False, True, True, True]  # the larger of two neighbours wins
    assert plots.thin_labels(centres, sizes, 0.1) == [True] * 4
    assert plots.thin_labels(centres, sizes, 100.0) == [False, False, False, True]


def _overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


@pytest.fixture
def seven_scale_result(monkeypatch):
    """The paper's 256 px geometry (16x16 finest, [1, 2, 4, 6, 8, 12, 16]), full-scale: 1,042 tokens."""
    monkeypatch.setattr(tp, "SCHEDULE", ScaleSchedule.from_scales([1, 2, 4, 6, 8, 12, 16]))
    plan, teacher, text = tp.batch("full_scale", ALL, size=1)
    assert plan.layout.length == 1042
    return probe_model(tiny_model(), plan, teacher, text, maps=[MapRequest(0), MapRequest(1)])


def test_attention_map_block_labels_do_not_overlap(seven_scale_result):
    fig = plots.plot_attention_maps(seven_scale_result)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    for ax in [ax for ax in fig.axes if ax.get_title().startswith("layer")]:
        for axis in (ax.xaxis, ax.yaxis):
            shown = [t for t in axis.get_ticklabels() if t.get_text()]
            assert len(shown) >= 4  # the large blocks keep their labels
            assert _overlaps([t.get_window_extent(renderer) for t in shown]) == []
        assert "src@16x16" in [t.get_text() for t in ax.xaxis.get_ticklabels()]


def test_block_mass_numbers_readable_or_absent(seven_scale_result):
    fig = plots.plot_block_mass(seven_scale_result, layers=[0])
    ax = fig.axes[0]
    texts = ax.texts
    layout = seven_scale_result.layout
    assert len(texts) == int(layout.visibility(0).visible.sum())  # every visible cell, no invisible one
    assert all(t.get_fontsize() >= 7 for t in texts)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    assert _overlaps([t.get_window_extent(renderer) for t in texts]) == []
    tiny = plots.plot_block_mass(seven_scale_result, layers=[0], cell_inches=(0.1, 0.1))
    assert len(tiny.axes[0].texts) == 0  # cells too small to read: no numbers


def test_alignment_plot_at_paper_geometry(seven_scale_result, tmp_path):
    fig = plots.plot_alignment(seven_scale_result, tmp_path / "alignment.png")
    assert (tmp_path / "alignment.png").stat().st_size > 10000
    ax_mass, ax_lift, ax_loc, ax_diag = fig.axes[:4]
    # layer 0: scales 0..5 informative (the 16x16 scale has no finer source): 6 lines + 2 reference lines
    assert len(ax_lift.lines) == 6 + 2 and len(ax_loc.lines) == 6 + 2
    al = alignment.layer_alignment(seven_scale_result, 0)
    assert al.informative == [0, 1, 2, 3, 4, 5]
    for s in al.informative:  # a real model's numbers stay proper fractions
        assert 0 < float(al.aligned_share[s]) < 1 and math.isfinite(float(al.lift[s]))
