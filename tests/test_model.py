"""Model correctness on tiny configs: teacher forcing == cached inference, attention executors agree,
CFG with batches, no-cache generation, and a few optimizer steps learn, for every strategy."""

from __future__ import annotations

import pytest
import torch

import conditioning
from conditioning.base import ConditioningPlan
from varedit_lab.model.loss import bitwise_loss
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.quant import multiscale_quantize
from varedit_lab.model.transformer import TextFeatures, TransformerConfig, VAREditTransformer

SCHEDULE = ScaleSchedule.from_scales([1, 2, 3, 4])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier stalls on a shared machine (conftest restores)."""
    torch.set_num_threads(1)
D = 8  # bits per token
STRATEGIES = [
    ("full_scale", {}),
    ("full_scale", {"visibility": "all"}),
    ("max_scale", {}),
    ("sar", {}),
    ("sar", {"layers": [0, 1]}),
]
IDS = ["full_coarser", "full_all", "max_scale", "sar", "sar_two_layers"]


def tiny_config(**overrides) -> TransformerConfig:
    base = dict(depth=3, width=64, num_heads=2, mlp_hidden=128, text_channels=32, text_maxlen=16, codebook_dim=D, cond_drop_rate=0.0)
    return TransformerConfig(**{**base, **overrides})


def make_model(**overrides) -> VAREditTransformer:
    torch.manual_seed(0)
    model = VAREditTransformer(tiny_config(**overrides))
    # Random AdaLN/gates instead of near-identity init, so that every path matters numerically.
    with torch.no_grad():
        for block in model.blocks:
            block.ada_gss.normal_(0, 0.5)
    return model.eval()


def make_data(name: str, options: dict, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = SCHEDULE.finest
    tokens = multiscale_quantize(torch.randn(batch, D, h, w, generator=g), SCHEDULE, patchify=False)
    plan = conditioning.build(name, options).plan(torch.randn(batch, D, h, w, generator=g), SCHEDULE, "paper", patchify=False)
    lengths = torch.tensor([5, 3, 4, 2][:batch])
    feats = torch.randn(batch, 5, 32, generator=g) * (torch.arange(5)[None, :, None] < lengths[:, None, None])
    return plan, tokens, TextFeatures(feats, lengths)


def per_scale(logits: torch.Tensor) -> list[torch.Tensor]:
    return list(logits.split(list(SCHEDULE.sizes), dim=1))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("name, options", STRATEGIES, ids=IDS)
def test_teacher_forcing_equals_cached_inference(name, options):
    model = make_model()
    plan, tokens, text = make_data(name, options, batch=2)
    with torch.no_grad():
        cond = model(plan, tokens.teacher_inputs, text)
        uncond = model(plan, tokens.teacher_inputs, model.uncond_text(text))
    # cfg = 1: no guidance, one branch.
    got = model.generate(plan, text, cfg=1.0, tau=1.0, forced_bits=tokens.bits)
    assert max_diff(got.logits, per_scale(cond)) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(got.bits, tokens.bits))
    # cfg != 1: the guided logits are the cfg-combination of two teacher-forced forwards, / tau.
    cfg, tau = 3.0, 0.5
    got = model.generate(plan, text, cfg=cfg, tau=tau, forced_bits=tokens.bits)
    expected = per_scale((cfg * cond + (1 - cfg) * uncond) / tau)
    assert max_diff(got.logits, expected) <= 1e-5


@pytest.mark.parametrize("name, options", STRATEGIES, ids=IDS)
def test_generation_without_cache_matches(name, options):
    model = make_model()
    plan, _, text = make_data(name, options, batch=2)
    cached = model.generate(plan, text, cfg=2.0, tau=0.7, greedy=True)
    again = model.generate(plan, text, cfg=2.0, tau=0.7, greedy=True, use_cache=False)
    assert max_diff(cached.logits, again.logits) <= 1e-4
    assert all(torch.equal(a, b) for a, b in zip(cached.bits, again.bits))


@pytest.mark.parametrize("name, options", STRATEGIES, ids=IDS)
def test_blockwise_equals_masked(name, options):
    plan, tokens, text = make_data(name, options, batch=2)
    bits = torch.cat(tokens.bits, dim=1)
    results = {}
    for impl in ("blockwise", "masked"):
        model = make_model(attention=impl).train()
        logits = model(plan, tokens.teacher_inputs, text)
        bitwise_loss(logits, bits, SCHEDULE).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            model.eval()
            guided = model.generate(plan, text, cfg=3.0, tau=0.5, forced_bits=tokens.bits).logits
        results[impl] = (logits.detach(), grads, guided)
    (lb, gb, cb), (lm, gm, cm) = results["blockwise"], results["masked"]
    assert float((lb - lm).abs().max()) <= 1e-5
    assert max_diff(cb, cm) <= 1e-4
    assert gb.keys() == gm.keys()
    for key in gm:
        scale = float(gm[key].abs().max()) + 1e-8
        assert float((gb[key] - gm[key]).abs().max()) <= 1e-5 * max(1.0, scale), key


def test_blockwise_gradients_match_autograd_reference(monkeypatch):
    """The hand-written blockwise backward equals autograd through plain per-block SDPA calls."""
    import varedit_lab.model.attention as attention

    plan, tokens, text = make_data("sar", {"layers": [0, 2]}, batch=2)
    bits = torch.cat(tokens.bits, dim=1)
    grads = []
    for fast in (True, False):
        if not fast:  # route around the custom Function: autograd through per-block SDPA calls
            monkeypatch.setattr(attention._BlockwiseFlashCPU, "apply", staticmethod(_generic))
        model = make_model().train()
        bitwise_loss(model(plan, tokens.teacher_inputs, text), bits, SCHEDULE).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-6)


def _generic(calls, num_extras, q, k, v, *extras):
    from varedit_lab.model.attention import _gather

    ke, ve = extras[:num_extras], extras[num_extras:]
    outs = [
        torch.nn.functional.scaled_dot_product_attention(q[:, :, c.q0 : c.q1], _gather(c.pieces, k, ke), _gather(c.pieces, v, ve), scale=1.0)
        for c in calls
    ]
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("name, options", STRATEGIES[1:4], ids=IDS[1:4])
def test_batched_cfg_generation(name, options):
    """Batch > 1 with CFG: each sample equals its own batch-1 edit."""
    model = make_model()
    plan, _, text = make_data(name, options, batch=3)
    together = model.generate(plan, text, cfg=4.0, tau=0.5, greedy=True)
    for i in range(3):
        alone = model.generate(
            ConditioningPlan(plan.layout, plan.source_tokens[i : i + 1]),
            TextFeatures(text.features[i : i + 1, : int(text.lengths[i])], text.lengths[i : i + 1]),
            cfg=4.0,
            tau=0.5,
            greedy=True,
        )
        assert max_diff([x[i : i + 1] for x in together.logits], alone.logits) <= 1e-4
        assert all(torch.equal(a[i : i + 1], b) for a, b in zip(together.bits, alone.bits))
    assert together.summed_codes.shape == (3, D, *SCHEDULE.finest)


@pytest.mark.parametrize("name, options", STRATEGIES[::2] + [STRATEGIES[3]], ids=["full_coarser", "max_scale", "sar_two_layers", "sar"])
def test_few_steps_reduce_loss_and_decode(name, options):
    torch.manual_seed(0)
    model = VAREditTransformer(tiny_config(cond_drop_rate=0.1, drop_path_rate=0.1)).train()
    plan, tokens, text = make_data(name, options, batch=2)
    bits = torch.cat(tokens.bits, dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        loss = bitwise_loss(model(plan, tokens.teacher_inputs, text, generator=gen), bits, SCHEDULE).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    out = model.generate(ConditioningPlan(plan.layout, plan.source_tokens[:1]), TextFeatures(text.features[:1], text.lengths[:1]), top_p=0.97, generator=gen)
    assert [tuple(b.shape) for b in out.bits] == [(1, n, D) for n in SCHEDULE.sizes]
    assert out.summed_codes.shape == (1, D, *SCHEDULE.finest) and torch.isfinite(out.summed_codes).all()


@pytest.mark.parametrize("source, target", [((16, 16), (6, 6)), ((16, 16), (12, 12)), ((16, 16), (1, 1)), ((8, 6), (3, 5)), ((5, 7), (2, 3))])
def test_sar_area_pool_equals_interpolate(source, target):
    """SAR's separable matmul pooling == F.interpolate(mode="area") per head (the release's pooling)."""
    from conditioning.sar import area_pool

    x = torch.randn(2, 3, source[0] * source[1], 8).transpose(1, 2).contiguous().transpose(1, 2)  # (B,H,S,D) of (B,S,H,D)
    img = x.transpose(2, 3).reshape(2, 3 * 8, *source)
    expected = torch.nn.functional.interpolate(img, size=target, mode="area").reshape(2, 3, 8, -1).transpose(2, 3)
    torch.testing.assert_close(area_pool(x, source, target), expected, rtol=0, atol=1e-6)


def test_normalize_scale_rotate_backward_matches_autograd():
    from varedit_lab.model.blocks import normalize_scale_rotate, rotate

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    x[0, 0, 0] = 0  # a zero vector: the eps clamp path
    x.requires_grad_()
    scale = torch.rand(1, 1, 3, 1, dtype=torch.float64, requires_grad=True)
    angles = torch.rand(5, 1, 4, dtype=torch.float64)
    cis = torch.complex(angles.cos(), angles.sin())
    grad = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    got = torch.autograd.grad(normalize_scale_rotate(x, scale, cis), (x, scale), grad)
    expected = torch.autograd.grad(rotate(torch.nn.functional.normalize(x, dim=-1, eps=1e-12) * scale, cis), (x, scale), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name, options", [STRATEGIES[0], STRATEGIES[3]], ids=["full_coarser", "sar"])
def test_activation_checkpointing_gives_the_same_gradients(name, options):
    plan, tokens, text = make_data(name, options, batch=2)
    bits = torch.cat(tokens.bits, dim=1)
    grads = []
    for checkpointing in (False, True):
        model = make_model(activation_checkpointing=checkpointing, drop_path_rate=0.1).train()
        gen = torch.Generator().manual_seed(0)
        bitwise_loss(model(plan, tokens.teacher_inputs, text, generator=gen), bits, SCHEDULE).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_bf16_autocast_train_step_and_edit_run():
    """Under autocast (bf16 on GPU in the editor) q/k stay fp32 and mixed dtypes take the generic path."""
    plan, tokens, text = make_data("sar", {}, batch=2)
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(plan, tokens.teacher_inputs, text)
    loss = bitwise_loss(logits.float(), torch.cat(tokens.bits, dim=1), SCHEDULE).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval().generate(plan, text, cfg=3.0, tau=0.5, greedy=True)
    assert all(torch.isfinite(x).all() for x in out.logits)
