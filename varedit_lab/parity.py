"""Parity against reference fixtures (``../shared/fixtures/reference``, format_version 1).

A fixture holds tiny reference models' weights, inputs and outputs. :func:`check_reference` rebuilds
the model from the fixture's config, loads the reference state dict through the strict converter and
compares every expected field this code can produce. Works for any fixture of that format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from conditioning import build as build_strategy
from conditioning.base import ConditioningPlan, ConditioningStrategy
from varedit_lab.checkpoint_io import CheckpointError, load_weights
from varedit_lab.model.compat import load_state_dict_strict
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.loss import bitwise_loss
from varedit_lab.model.quant import multiscale_quantize
from varedit_lab.model.transformer import TextFeatures, TransformerConfig, VAREditTransformer

SUPPORTED_FORMAT = 1


@dataclass
class FieldResult:
    field: str
    max_abs_diff: float
    tolerance: float
    ok: bool
    note: str = ""


def load_fixture(path: str | Path) -> dict[str, Any]:
    fixture = load_weights(path, "reference fixture")
    version = fixture.get("format_version") if isinstance(fixture, dict) else None
    if version != SUPPORTED_FORMAT:
        raise CheckpointError(f"{path}: not a reference fixture of format_version {SUPPORTED_FORMAT} (found {version!r})")
    return fixture


def compare(field: str, got: Any, expected: Any, tolerance: float, note: str = "") -> FieldResult:
    """Max |diff| over a tensor or a list of tensors; ``tolerance == 0`` means exact equality."""
    got_list = got if isinstance(got, (list, tuple)) else [got]
    exp_list = expected if isinstance(expected, (list, tuple)) else [expected]
    if len(got_list) != len(exp_list) or any(g.shape != e.shape for g, e in zip(got_list, exp_list)):
        shapes = [tuple(g.shape) for g in got_list], [tuple(e.shape) for e in exp_list]
        return FieldResult(field, float("inf"), tolerance, False, f"shape mismatch {shapes[0]} vs {shapes[1]}")
    diff = max(float((g.double() - e.double()).abs().max()) if g.numel() else 0.0 for g, e in zip(got_list, exp_list))
    return FieldResult(field, diff, tolerance, diff <= tolerance, note)


# ---------------------------------------------------------------------------------------------
# transformer
def transformer_config(fixture: dict[str, Any]) -> TransformerConfig:
    t, vae = fixture["config"]["transformer"], fixture["config"]["vae"]
    return TransformerConfig(
        depth=t["depth"],
        width=t["embed_dim"],
        num_heads=t["num_heads"],
        mlp_hidden=t["mlp_hidden"],
        text_channels=t["text_channels"],
        text_maxlen=t["text_maxlen"],
        codebook_dim=vae["codebook_dim"],
        patchify=bool(t.get("apply_spatial_patchify", vae.get("apply_spatial_patchify", 0))),
        block_chunks=t["block_chunks"],
        cond_drop_rate=0.0,
    )


def fixture_strategy(fixture: dict[str, Any]) -> ConditioningStrategy:
    """SAR on the fixture's ``sar_layers``; max-scale when there are none."""
    layers = list(fixture["config"]["transformer"].get("sar_layers", []))
    return build_strategy("sar", {"layers": layers}) if layers else build_strategy("max_scale")


def fixture_model(fixture: dict[str, Any]) -> VAREditTransformer:
    model = VAREditTransformer(transformer_config(fixture)).eval()
    load_state_dict_strict(model, fixture["model_state_dict"])
    return model


def check_transformer(fixture: dict[str, Any]) -> list[FieldResult]:
    cfg, exp, inp = fixture["config"], fixture["expected"], fixture["inputs"]
    schedule = ScaleSchedule.from_scales(cfg["scale_schedule"])
    model = fixture_model(fixture)
    layout = fixture_strategy(fixture).layout(schedule, "reference_compat")
    text = TextFeatures(inp["text_embeddings"], inp["text_lengths"])
    gt_bits = torch.cat(exp["gt_bits"], dim=1)
    guided_tol = min(1e-4, 1e-5 * (abs(cfg["cfg"]) + abs(1 - cfg["cfg"])) / cfg["tau"])
    results = [compare("rope_positions", layout.positions, exp["rope_positions"], 0)]

    with torch.no_grad():
        logits = model(ConditioningPlan(layout, exp["src_features"]), exp["teacher_inputs"], text)
        weighted = bitwise_loss(logits, gt_bits, schedule, reweight=True)
        uniform = bitwise_loss(logits, gt_bits, schedule, reweight=False)
    results += [
        compare("logits_teacher_forced", logits, exp["logits_teacher_forced"], 1e-5),
        compare("loss", weighted.loss, exp["loss"], 1e-5),
        compare("loss_unweighted", uniform.loss, exp["loss_unweighted"], 1e-5),
        compare("bit_ce_per_token", weighted.ce_per_token, exp["bit_ce_per_token"], 1e-5),
    ]
    plan0 = ConditioningPlan(layout, exp["src_features"][:1])
    text0 = TextFeatures(inp["text_embeddings"][:1], inp["text_lengths"][:1])
    forced = model.generate(plan0, text0, cfg=cfg["cfg"], tau=cfg["tau"], forced_bits=[b[:1] for b in exp["gt_bits"]])
    results.append(compare("logits_cached_cfg", forced.logits, exp["logits_cached_cfg"], guided_tol))
    greedy = model.generate(plan0, text0, cfg=cfg["cfg"], tau=cfg["tau"], greedy=True)
    results.append(compare("greedy_bits", greedy.bits, exp["greedy_bits"], 0))
    # Compare the greedy run's logits scale by scale with the reference's own bits fed back.
    fed = model.generate(plan0, text0, cfg=cfg["cfg"], tau=cfg["tau"], forced_bits=exp["greedy_bits"])
    results.append(compare("greedy_logits", fed.logits, exp["greedy_logits"], guided_tol))
    return results


def check_quantizer(fixture: dict[str, Any]) -> list[FieldResult]:
    """Multi-scale BSQ from the stored target latent (no VAE needed)."""
    cfg, exp = fixture["config"], fixture["expected"]
    schedule = ScaleSchedule.from_scales(cfg["scale_schedule"])
    patchify = bool(cfg["vae"].get("apply_spatial_patchify", 0))
    tokens = multiscale_quantize(exp["tgt_raw_features"], schedule, patchify)
    note = "from tgt_raw_features"
    return [
        compare("gt_bits", tokens.bits, exp["gt_bits"], 0, note),
        compare("teacher_inputs", tokens.teacher_inputs, exp["teacher_inputs"], 1e-6, note),
        compare("vae_recon_summed_codes", tokens.summed_codes, exp["vae_recon_summed_codes"], 1e-6, note),
    ]


# Each check takes the loaded fixture and returns rows; other packages append theirs.
def check_tokenizer(fixture: dict[str, Any]) -> list[FieldResult]:
    """The VAE fields (varedit_lab.tokenizer.parity; imported here lazily, it imports this module)."""
    from varedit_lab.tokenizer.parity import check_tokenizer as check

    return check(fixture)


CHECKS: list[Callable[[dict[str, Any]], list[FieldResult]]] = [check_quantizer, check_tokenizer, check_transformer]


def check_reference(path: str | Path) -> list[FieldResult]:
    torch.manual_seed(0)
    fixture = load_fixture(path)
    results: list[FieldResult] = []
    for check in CHECKS:
        results.extend(check(fixture))
    return results


def format_table(results: list[FieldResult]) -> str:
    rows = [("field", "max abs diff", "tolerance", "ok", "note")]
    for r in results:
        rows.append((r.field, f"{r.max_abs_diff:.3g}", f"{r.tolerance:.3g}", "ok" if r.ok else "FAIL", r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
