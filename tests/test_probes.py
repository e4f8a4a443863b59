"""Attention probes: constructed attention, eager == fast parity, hook hygiene, budgets, plots."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import conditioning
from varedit_lab.model.attention import self_attention
from varedit_lab.model.blocks import SelfAttention
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.transformer import TextFeatures, TransformerConfig, VAREditTransformer
from varedit_lab.probes import AttentionProbe, MapRequest, ProbeBudgetError, ProbeResult, eager_self_attention, probe_model
from varedit_lab.probes import geometry

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = ScaleSchedule.from_scales([1, 2, 4])
STRATEGIES = [
    ("max_scale", {}),
    ("sar", {}),
    ("full_scale", {"visibility": "coarser"}),
    ("full_scale", {"visibility": "all"}),
]
STRATEGY_IDS = ["max_scale", "sar", "full_scale-coarser", "full_scale-all"]


def tiny_model(seed: int = 0, attention: str = "blockwise") -> VAREditTransformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(depth=2, width=64, num_heads=2, mlp_hidden=256, text_channels=32, text_maxlen=16, codebook_dim=8, attention=attention)
    return VAREditTransformer(cfg).eval()


def batch(name: str, options: dict, size: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    plan = conditioning.build(name, options).plan(torch.randn(size, 8, 4, 4, generator=gen), SCHEDULE, "paper", patchify=False)
    teacher = torch.randn(size, SCHEDULE.total - 1, 8, generator=gen)
    lengths = torch.tensor([5, 3, 4, 2][:size])
    text = TextFeatures(torch.randn(size, 5, 32, generator=gen), lengths)
    return plan, teacher, text


def zero_query_key(model: VAREditTransformer) -> None:
    """q = k = 0 after projection (weights and q_bias), hence after l2-norm and RoPE: every score is 0
    and each query attends uniformly to its visible keys (pooled SAR keys of zeros included)."""
    width = model.cfg.width
    with torch.no_grad():
        for block in model.blocks:
            block.sa.mat_qkv.weight[: 2 * width] = 0
            block.sa.q_bias.zero_()


def attention_modules(model) -> list[SelfAttention]:
    return [m for m in model.modules() if isinstance(m, SelfAttention)]


# ---------------------------------------------------------------------------------------------------
# constructed attention


@pytest.mark.parametrize("name,options", STRATEGIES, ids=STRATEGY_IDS)
def test_uniform_attention_block_mass_equals_token_fractions(name, options):
    model = tiny_model()
    zero_query_key(model)
    plan, teacher, text = batch(name, options)
    result = probe_model(model, plan, teacher, text)
    layout = plan.layout
    assert result.layers == [0, 1]
    for layer in result.layers:
        vis = layout.visibility(layer)
        sizes = torch.tensor(layout.key_block_sizes(vis), dtype=torch.float64)
        visible = vis.visible.double() * sizes
        expected = visible / visible.sum(1, keepdim=True)
        # every query block is recorded, also the source rows the last layer does not output
        assert result.query_blocks(layer) == list(range(layout.num_blocks))
        for head in (None, 0, 1):
            torch.testing.assert_close(result.block_mass(layer, head), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.entropy(layer), result.max_entropy(layer), atol=1e-5, rtol=0)
    if name == "sar":  # layer 0: target scale s puts n_s / (n_s + sum_{t<=s} n_t) on ref@s
        labels = result.key_labels(0)
        assert labels[-3:] == ["ref@1x1", "ref@2x2", "ref@4x4"]
        mass = result.block_mass(0)
        assert mass[1, labels.index("ref@1x1")] == pytest.approx(1 / 2, abs=1e-5)
        assert mass[2, labels.index("ref@2x2")] == pytest.approx(4 / 9, abs=1e-5)
        assert mass[3, labels.index("ref@4x4")] == pytest.approx(16 / 37, abs=1e-5)
        assert mass[3, 0] == 0.0  # the full-resolution source is invisible to targets in layer 0


# Uniform attention over a 4x4 finest source, radius 1 (Chebyshev, in source tokens), by hand:
# * sos 1x1: centre (2, 2); source centres 0.5..3.5 within 1 per axis: {1.5, 2.5} -> 2x2 = 4/16.
# * tgt1 2x2: query (0, 0) centre (1, 1): {0.5, 1.5} per axis -> 4/16; same for all four queries.
# * tgt2 4x4: centres coincide; per axis 2, 3, 3, 2 neighbours -> (2+3+3+2)^2 / 16 / 16 = 100/256.
UNIFORM_LOCALITY = {"sos": 0.25, "tgt1@2x2": 0.25, "tgt2@4x4": 100 / 256}


@pytest.mark.parametrize("name,options", STRATEGIES, ids=STRATEGY_IDS)
def test_uniform_attention_locality_matches_hand_computed(name, options):
    model = tiny_model()
    zero_query_key(model)
    plan, teacher, text = batch(name, options)
    result = probe_model(model, plan, teacher, text)
    labels = result.block_labels()
    src = geometry.finest_source_block(plan.layout)
    for layer in result.layers:
        vis = plan.layout.visibility(layer)
        locality, diagonality = result.locality(layer), result.diagonality(layer)
        for label, value in UNIFORM_LOCALITY.items():
            block = labels.index(label)
            if vis.visible[block, src]:
                assert float(locality[block]) == pytest.approx(value, abs=1e-6)
                assert float(diagonality[block]) == pytest.approx(1.0, abs=1e-6)
            else:  # e.g. SAR layer 0 or full-scale "coarser" for coarse targets: undefined
                assert math.isnan(float(locality[block]))
    uniform = result.uniform_locality()
    for label, value in UNIFORM_LOCALITY.items():
        assert float(uniform[labels.index(label)]) == pytest.approx(value)


def test_constructed_weights_give_hand_computed_statistics():
    """Feed hand-made weights of tgt1@2x2 (4 queries; keys: 16 source, sos, 4 tgt1) to the recorder."""
    model = tiny_model()
    layout = batch("max_scale", {})[0].layout
    probs = torch.zeros(1, 2, 4, 21)
    probs[0, :, 0, 0] = probs[0, :, 0, 15] = 0.5  # (0,0) and (3,3): one inside the window, one not
    probs[0, :, 1, 3], probs[0, :, 1, 16], probs[0, :, 1, 17] = 0.25, 0.25, 0.5  # source (0,3), sos, tgt
    probs[0, :, 2, 5] = 1.0  # source (1,1): far from query (1,0)'s centre (3,1)
    probs[0, :, 3, :16] = 1 / 16  # uniform on the source
    probe = AttentionProbe(model, layers=[0])
    probe.record(0, layout, 2, 2, 0, probs, (0, 1, 2))
    result = probe.result
    # locality: 0.5, 0.25/0.25, 0, 4/16 -> mean 0.4375; diagonality: 0.5/(4/16), 1/(4/16), 0, 1 -> 1.75
    assert float(result.locality(0)[2]) == pytest.approx(0.4375)
    assert float(result.diagonality(0)[2]) == pytest.approx(1.75)
    assert result.block_mass(0)[2, :3].tolist() == pytest.approx([0.8125, 0.0625, 0.125])
    assert float(result.entropy(0)[2]) == pytest.approx(1.625 * math.log(2))


def test_geometry_windows_and_alignment():
    window = geometry.locality_window((1, 1), (4, 4), 1.0).view(4, 4)
    assert window.nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    aligned = geometry.aligned_tokens((2, 2), (4, 4))
    assert aligned[3].view(4, 4).nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    # a source coarser than the query: the source cell containing the query centre
    coarse = geometry.aligned_tokens((4, 4), (2, 2))
    assert coarse.sum(1).tolist() == [1] * 16 and coarse[5].nonzero().flatten().tolist() == [0]
    assert coarse[15].nonzero().flatten().tolist() == [3]


# ---------------------------------------------------------------------------------------------------
# eager path == fast path


class CompareHook:
    """A probe-slot callable running both paths on the same inputs; returns the fast output."""

    def __init__(self):
        self.diffs: list[tuple[int, int, float]] = []

    def __call__(self, module, q, k, v, ctx):
        eager = eager_self_attention(q, k, v, module.layer_index, ctx, observer=lambda *a: None)
        fast = self_attention(q, k, v, module.layer_index, ctx)
        assert eager.shape == fast.shape
        diff = float((eager - fast).abs().max()) if fast.numel() else 0.0
        self.diffs.append((module.layer_index, ctx.first_block, diff))
        return fast


@pytest.mark.parametrize("attention", ["blockwise", "masked"])
@pytest.mark.parametrize("name,options", STRATEGIES, ids=STRATEGY_IDS)
def test_eager_equals_fast_teacher_forced_and_cached(name, options, attention):
    model = tiny_model(attention=attention)
    plan, teacher, text = batch(name, options)
    hook = CompareHook()
    for module in attention_modules(model):
        module.probe = hook
    try:
        with torch.no_grad():
            model(plan, teacher, text)
        model.generate(plan, text, cfg=3.0, greedy=True)
    finally:
        for module in attention_modules(model):
            module.probe = None
    nb = plan.layout.num_source_blocks
    # teacher forcing (one call per layer) + generate (prefill and one call per scale, per layer)
    assert len(hook.diffs) == 2 * (1 + 1 + SCHEDULE.num_scales)
    assert {(layer, first) for layer, first, _ in hook.diffs} >= {(0, nb + s) for s in range(SCHEDULE.num_scales)}
    assert max(d for *_, d in hook.diffs) <= 1e-5


@pytest.mark.parametrize("name,options", STRATEGIES, ids=STRATEGY_IDS)
def test_probed_model_outputs_match_unprobed(name, options):
    model = tiny_model()
    plan, teacher, text = batch(name, options)
    with torch.no_grad():
        fast = model(plan, teacher, text)
        with AttentionProbe(model):
            probed = model(plan, teacher, text)
    assert (probed - fast).abs().max() <= 1e-5
    gen_fast = model.generate(plan, text, cfg=1.0, greedy=True)
    with AttentionProbe(model, layers=[0]) as probe:
        gen_probed = model.generate(plan, text, cfg=1.0, greedy=True)
    for a, b in zip(gen_fast.logits, gen_probed.logits):
        assert (a - b).abs().max() <= 1e-5
    assert probe.result.query_blocks(0)  # the cached path recorded statistics
    rows = probe.result.block_mass(0)[probe.result.query_blocks(0)]
    torch.testing.assert_close(rows.sum(1), torch.ones(len(rows), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# hook hygiene, selection, accumulation


def test_hooks_attached_only_inside_and_removed_on_exception():
    model = tiny_model()
    plan, teacher, text = batch("sar", {})
    with AttentionProbe(model, layers=[-1]) as probe:
        assert [m.probe is not None for m in attention_modules(model)] == [False, True]
        with pytest.raises(RuntimeError, match="do not nest"):
            AttentionProbe(model, layers=[1]).__enter__()
        with torch.no_grad():
            model(plan, teacher, text)
    assert all(m.probe is None for m in attention_modules(model))
    assert probe.result.layers == [1]

    with pytest.raises(ValueError, match="boom"):
        with AttentionProbe(model):
            assert all(m.probe is not None for m in attention_modules(model))
            raise ValueError("boom")
    assert all(m.probe is None for m in attention_modules(model))

    # a probe inside a training step (autograd on) refuses, and still detaches
    with pytest.raises(RuntimeError, match="no_grad"):
        with AttentionProbe(model):
            model(plan, teacher, text)
    assert all(m.probe is None for m in attention_modules(model))


def test_probe_model_restores_mode_and_selects_heads():
    model = tiny_model().train()
    plan, teacher, text = batch("max_scale", {})
    full = probe_model(model, plan, teacher, text)
    assert model.training
    one = probe_model(model, plan, teacher, text, layers=[0], heads=[1])
    assert one.layers == [0] and one.heads == (1,)
    torch.testing.assert_close(one.block_mass(0), full.block_mass(0, head=1))
    torch.testing.assert_close(one.locality(0), full.locality(0, head=1), equal_nan=True)
    with pytest.raises(KeyError):
        one.block_mass(0, head=0)


def test_accumulation_is_mean_over_samples_and_keyed():
    model = tiny_model()
    plan4, teacher4, text4 = batch("full_scale", {}, size=4)
    whole = probe_model(model, plan4, teacher4, text4, maps=[MapRequest(1, None, 2)])
    halves = None
    for part in (slice(0, 2), slice(2, 4)):
        plan = conditioning.ConditioningPlan(plan4.layout, plan4.source_tokens[part])
        text = TextFeatures(text4.features[part], text4.lengths[part])
        halves = probe_model(model, plan, teacher4[part], text, maps=[MapRequest(1, None, 2)], result=halves)
    assert set(halves.blocks) == set(whole.blocks)  # keyed, not appended
    assert all(st.samples == 4 for st in halves.blocks.values())
    for layer in whole.layers:
        for name in ("block_mass", "entropy", "locality", "diagonality"):
            torch.testing.assert_close(getattr(halves, name)(layer), getattr(whole, name)(layer), equal_nan=True)
    torch.testing.assert_close(halves.full_map(1, None, 2), whole.full_map(1, None, 2))
    assert json.dumps(halves.to_dict()) == json.dumps(halves.to_dict())  # reading never changes state


def test_result_rejects_another_layout():
    model = tiny_model()
    result = probe_model(model, *batch("max_scale", {}))
    with pytest.raises(ValueError, match="another sequence layout"):
        probe_model(model, *batch("sar", {}), result=result)
    assert all(m.probe is None for m in attention_modules(model))


# ---------------------------------------------------------------------------------------------------
# full maps and the byte budget


def test_full_map_matches_block_mass_and_budget_raises():
    model = tiny_model()
    plan, teacher, text = batch("sar", {})
    result = probe_model(model, plan, teacher, text, maps=[MapRequest(0), MapRequest(-1, head=0, query="tgt2@4x4")])
    layout = plan.layout
    full = result.full_map(0)  # (L, L + extra): the paper's whole-sequence map, SAR key axis
    assert full.shape == (layout.length, layout.length + sum(SCHEDULE.sizes))
    torch.testing.assert_close(full.sum(1), torch.ones(layout.length))
    assert (full[~layout.token_mask(0)] == 0).all()
    # summing map columns per key block and averaging rows per query block gives the block mass
    vis = layout.visibility(0)
    cols = torch.tensor(layout.key_block_sizes(vis))
    rows = torch.tensor(layout.block_sizes)
    per_key = torch.stack([c.sum(1) for c in full.split(cols.tolist(), dim=1)], dim=1)
    per_block = torch.stack([r.mean(0) for r in per_key.split(rows.tolist(), dim=0)])
    torch.testing.assert_close(per_block.double(), result.block_mass(0), atol=1e-6, rtol=0)
    assert result.full_map(1, 0, "tgt2@4x4").shape == (16, layout.length)

    need = AttentionProbe(model, maps=[MapRequest(0)]).map_bytes(layout)
    with pytest.raises(ProbeBudgetError, match="budget"):
        probe_model(model, plan, teacher, text, maps=[MapRequest(0)], max_map_bytes=need - 1)
    # inside a forward (cached inference, layout known only then): raises and detaches
    with pytest.raises(ProbeBudgetError):
        with AttentionProbe(model, maps=[MapRequest(0)], max_map_bytes=1024):
            model.generate(plan, text, cfg=1.0, greedy=True)
    assert all(m.probe is None for m in attention_modules(model))


def test_to_dict_is_json_with_layout_strategy_and_config():
    model = tiny_model()
    plan, teacher, text = batch("sar", {})
    result = probe_model(model, plan, teacher, text, maps=[MapRequest(0)])
    data = json.loads(json.dumps(result.to_dict({"ckpt": "none"}), allow_nan=False))
    assert data["strategy"] == {"name": "sar", "layers": [0]}
    assert data["config"]["ckpt"] == "none" and data["config"]["model"]["depth"] == 2
    assert data["layout"]["blocks"] == ["src@4x4", "sos", "tgt1@2x2", "tgt2@4x4"]
    layer0 = data["layers"]["0"]
    assert layer0["key_blocks"][-1] == "ref@4x4"
    for row in layer0["block_mass"]["mean"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-6)
    assert layer0["locality"]["mean"] == {}  # SAR layer 0: targets never see the finest source
    assert set(data["layers"]["1"]["locality"]["mean"]) == {"sos", "tgt1@2x2", "tgt2@4x4"}
    assert len(data["layers"]["1"]["entropy"]["per_head"]["sos"]) == 2
    scalars = result.scalars()
    assert "probe/layer1/locality/tgt2@4x4" in scalars and all(math.isfinite(v) for v in scalars.values())


# ---------------------------------------------------------------------------------------------------
# plots, compile, benchmark


def test_plots_write_non_empty_pngs(tmp_path):
    from varedit_lab.probes import plots

    model = tiny_model()
    result = probe_model(model, *batch("full_scale", {}), maps=[MapRequest(0), MapRequest(1)])
    paths = plots.save_all(result, tmp_path)
    assert [p.name for p in paths] == ["block_mass.png", "locality.png", "attention_maps.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    fig = plots.plot_block_mass(result, layers=[1], head=0)
    assert len([ax for ax in fig.axes if ax.get_visible()]) >= 1
    with pytest.raises(ValueError, match="no full maps"):
        plots.plot_attention_maps(result, head=0)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_probe_on_compiled_model():
    """Probing uses the uncompiled module (``_orig_mod``); the compiled model is untouched."""
    model = tiny_model()
    plan, teacher, text = batch("sar", {})
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(plan, teacher, text)
    result = probe_model(compiled, plan, teacher, text, layers=[0])
    assert result.layers == [0] and result.query_blocks(0)
    # attaching to the compiled wrapper and calling it also records (the hook is never compiled)
    with torch.no_grad(), AttentionProbe(compiled, layers=[1]) as probe:
        compiled(plan, teacher, text)
    assert probe.result.query_blocks(1)
    with torch.no_grad():
        after = compiled(plan, teacher, text)
    torch.testing.assert_close(after, before)
    assert all(m.probe is None for m in attention_modules(model))


def test_overhead_benchmark_quick_mode(tmp_path):
    """Runs in-process (no timing assertion): the JSON has both variants and the attached cost."""
    spec = importlib.util.spec_from_file_location("probe_overhead", REPO / "benchmarks" / "probe_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shipped = SelfAttention.forward
    out = tmp_path / "overhead.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert SelfAttention.forward is shipped  # the baseline's patch is undone
    report = json.loads(out.read_text())
    assert report["train_step"]["baseline_ms"] > 0 and report["train_step"]["detached_ms"] > 0
    assert report["attached_probe_forward"]["probed_ms"] > 0
    assert report["train_step"]["rounds"] == report["config"]["repeats"]
    # the baseline really lacks the probe check: with a probe set it takes the fast path
    stripped = bench.forward_without_probe_check()
    assert "probe" not in stripped.__code__.co_names and "probe" in shipped.__code__.co_names


def test_probe_result_requires_a_forward():
    with pytest.raises(ValueError, match="recorded nothing"):
        ProbeResult().block_mass(0)
