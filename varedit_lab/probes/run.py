"""Offline probes of trained checkpoints: load an editor, probe fixed samples, write the outputs.

:func:`probe_checkpoint` is what ``varedit-lab probe``, the demo and the notebook call::

    result = probe_checkpoint("runs/NAME/checkpoints/last.ckpt", layers=[0, -1], out_dir="probes/NAME")

It rebuilds the editor from the checkpoint (its config travels inside), reads the first
``num_samples`` good samples of the shards in shard order (the validation shards of the run's config
by default; the same fixed-list reader as validation, so reruns probe the same samples), encodes them
with the module's own tokenizer and text encoder, and runs teacher-forced forwards under an
:class:`~varedit_lab.probes.AttentionProbe`, accumulating every batch into one
:class:`~varedit_lab.probes.ProbeResult`. With ``out_dir`` it writes ``probe.json`` (statistics, the
probe settings, the strategy, the checkpoint and its run config), the PNGs of
:func:`varedit_lab.probes.plots.save_all`, and ``alignment.md`` / ``alignment.png``: the paper's
Fig. 3 statement next to the model's numbers, with verdicts (:mod:`varedit_lab.probes.alignment`).

:func:`runs_by_strategy` finds one completed run per strategy in a sweep's ``runs/`` folder (what the
demo compares); the comparison itself lives in :mod:`varedit_lab.probes.compare`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from conditioning.base import SequenceLayout
from varedit_lab.probes import alignment
from varedit_lab.probes.probe import DEFAULT_MAP_BYTES, AttentionProbe, MapRequest, ProbeBudgetError, probe_model
from varedit_lab.probes.stats import ProbeResult

MapSpec = Sequence[int | MapRequest] | str | None  # layers/requests, "all" (every probed layer) or None (default)


def load_samples(data: Any, num_samples: int, image_size: int, min_side: int = 8) -> list[dict[str, Any]]:
    """The first ``num_samples`` good samples of the shard spec ``data``, in shard order (decoded)."""
    from varedit_lab.data.shards import expand_shards, read_fixed_list

    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: need at least one sample")
    items, _ = read_fixed_list(expand_shards(data), num_samples, image_size, min_side, where="probe")
    if not items:
        raise ValueError(f"no usable samples in {data}")
    return items


def map_requests(model: torch.nn.Module, layout: SequenceLayout, layers: Sequence[int] | None, heads: Sequence[int] | None,
                 maps: MapSpec, max_map_bytes: int = DEFAULT_MAP_BYTES) -> list[MapRequest]:
    """Full maps to keep: ``maps`` given explicitly (layer indices mean whole-sequence head-mean maps,
    ``"all"`` every probed layer; an explicit request over the byte budget fails in
    :func:`probe_model`), or by default the first and last probed layer, dropped with a warning when
    they exceed ``max_map_bytes`` (large models)."""
    probe = AttentionProbe(model, layers, heads)  # resolves layers; attaches nothing
    if isinstance(maps, str):
        if maps != "all":
            raise ValueError(f"maps={maps!r}: give layers, MapRequests, 'all' or None")
        return [MapRequest(layer) for layer in probe.layers]
    if maps is not None:
        return [m if isinstance(m, MapRequest) else MapRequest(int(m)) for m in maps]
    chosen = sorted({probe.layers[0], probe.layers[-1]})
    probe.maps, probe.max_map_bytes = tuple(MapRequest(layer) for layer in chosen), max_map_bytes
    try:
        probe.check_budget(layout)
    except ProbeBudgetError as err:
        warnings.warn(f"skipping the default full attention maps: {err}", stacklevel=2)
        return []
    return list(probe.maps)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def probe_module(module: Any, items: Sequence[dict[str, Any]], layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, *, batch_size: int = 8, radius: float = 1.0, maps: MapSpec = None,
                 max_map_bytes: int = DEFAULT_MAP_BYTES) -> ProbeResult:
    """Probe an editor module (``model``, ``encode_batch``, ``plan``, as ``EditorModule``) on decoded
    samples; every batch accumulates into the same result."""
    from varedit_lab.data.shards import FixedBatches

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    result: ProbeResult | None = None
    requests: list[MapRequest] | None = None
    for batch in FixedBatches(items, batch_size):
        with torch.no_grad():
            inputs = module.encode_batch(_to_device(batch, module.device))
            plan = module.plan(inputs.source_latent)
        if requests is None:  # the layout is known only now
            requests = map_requests(module.model, plan.layout, layers, heads, maps, max_map_bytes)
        result = probe_model(module.model, plan, inputs.teacher_inputs, inputs.text, layers, heads, maps=requests,
                             radius=radius, max_map_bytes=max_map_bytes, result=result)
    assert result is not None  # items is non-empty
    return result


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _spec_for_json(spec: Any) -> Any:
    if isinstance(spec, (str, Path)):
        return str(spec)
    return [str(s) for s in spec]


def probe_checkpoint(
    ckpt: str | Path,
    data: Any = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    *,
    num_samples: int = 8,
    batch_size: int = 8,
    radius: float = 1.0,
    maps: MapSpec = None,
    out_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device | None = "cpu",
    max_map_bytes: int = DEFAULT_MAP_BYTES,
) -> ProbeResult:
    """Probe a trained editor checkpoint; see the module docstring.

    ``data``: a shard spec (default: ``data.val_shards`` of the checkpoint's run config).
    ``layers``/``heads``: None for all (negative layers count from the end). ``maps``: layers (or
    :class:`MapRequest`) whose full maps are kept, ``"all"`` for every probed layer; None: the first
    and last probed layer when they fit ``max_map_bytes``; ``[]``: none. ``overrides``: config overrides for the rebuilt module
    (e.g. ``tokenizer.checkpoint=/elsewhere/tokenizer.pt`` when the run moved).
    """
    from varedit_lab.module import EditorModule

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no such file (sharded directories: `varedit-lab export` first)")
    module = EditorModule.from_checkpoint(ckpt, list(overrides)).to(_resolve_device(device))
    if not module.cfg.tokenizer.checkpoint:
        # The frozen tokenizer is rebuilt from config, not loaded from the checkpoint: without a
        # tokenizer file it is a fresh random one, not the one the editor was trained with.
        warnings.warn(f"{ckpt}: the run used an untrained tokenizer (tokenizer.checkpoint=null), which checkpoints do "
                      "not store; the probe tokenizes with a new random one", UserWarning, stacklevel=2)
    return _probe_and_write(module, {"checkpoint": str(ckpt.resolve())}, data, layers, heads, num_samples=num_samples,
                            batch_size=batch_size, radius=radius, maps=maps, out_dir=out_dir, max_map_bytes=max_map_bytes)


def probe_released(
    released: str | Path,
    model: str | None,
    data: Any,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    *,
    num_samples: int = 8,
    batch_size: int = 8,
    radius: float = 1.0,
    maps: MapSpec = None,
    out_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device | None = "cpu",
    max_map_bytes: int = DEFAULT_MAP_BYTES,
) -> ProbeResult:
    """Probe released VAREdit weights (a folder in the released layout or the hub id, plus ``model``,
    e.g. ``2B-512``) on the shards ``data``, at the model's resolution; as :func:`probe_checkpoint`."""
    from varedit_lab.module import EditorModule
    from varedit_lab.released import released_config, resolve_released

    if data is None:
        raise ValueError("released weights carry no data config: pass the shards to probe (data=... / --data)")
    files = resolve_released(released, model=model)
    target = _resolve_device(device)
    cfg = released_config(files, [f"data.image_size={files.resolution}", *overrides], target)
    module = EditorModule(cfg).to(target)
    source = {"released": str(files.transformer.resolve()), "model": files.transformer.stem}
    return _probe_and_write(module, source, data, layers, heads, num_samples=num_samples, batch_size=batch_size,
                            radius=radius, maps=maps, out_dir=out_dir, max_map_bytes=max_map_bytes)


def _probe_and_write(module: Any, source: dict[str, Any], data: Any, layers: Sequence[int] | None, heads: Sequence[int] | None,
                     *, num_samples: int, batch_size: int, radius: float, maps: MapSpec, out_dir: str | Path | None,
                     max_map_bytes: int) -> ProbeResult:
    from varedit_lab.config import to_dict

    if data is None:
        data = module.cfg.data.val_shards
        if data is None:
            raise ValueError(f"{next(iter(source.values()))}: its config has no data.val_shards; pass the shards to probe (data=... / --data)")
    items = load_samples(data, num_samples, int(module.cfg.data.image_size), int(module.cfg.data.min_side))
    result = probe_module(module, items, layers, heads, batch_size=batch_size, radius=radius, maps=maps,
                          max_map_bytes=max_map_bytes)
    if out_dir is not None:
        config = {
            **source,
            "data": _spec_for_json(data),
            "num_samples": len(items),
            "sample_keys": [item["key"] for item in items],
            "batch_size": batch_size,
            "image_size": int(module.cfg.data.image_size),
            "strategy_options": module.strategy.describe(),
            "run_config": to_dict(module.cfg),
        }
        write_outputs(result, out_dir, config)
    return result


def write_outputs(result: ProbeResult, out_dir: str | Path, config: Mapping[str, Any] | None = None) -> list[Path]:
    """``probe.json`` (statistics, plus the Fig. 3 numbers and verdicts under ``fig3``), the PNGs
    (block mass, locality, the attention maps when recorded) and ``alignment.md`` + ``alignment.png``:
    the paper's Fig. 3 statement next to this model's numbers (:mod:`varedit_lab.probes.alignment`)."""
    from varedit_lab.probes.plots import plot_alignment, save_all

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(config or {})
    data = {**result.to_dict(config), "fig3": alignment.to_dict(result)}
    probe_json = out_dir / "probe.json"
    probe_json.write_text(json.dumps(data, indent=1, allow_nan=False))
    written = [probe_json] + save_all(result, out_dir)
    plot_alignment(result, out_dir / "alignment.png")
    section = alignment.alignment_markdown(result, image="alignment.png", num_samples=config.get("num_samples"))
    (out_dir / "alignment.md").write_text(section)
    return written + [out_dir / "alignment.png", out_dir / "alignment.md"]


# -- sweeps -------------------------------------------------------------------------------------------


def _run_info(run: Path) -> dict[str, Any] | None:
    """(strategy, variant, seed) of a completed run with a last.ckpt file, from its summary.json; else
    None. ``variant``: the strategy's options and the RoPE layout, which tell runs of one strategy apart."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") != "completed" or not (run / "checkpoints" / "last.ckpt").is_file():
        return None
    config = summary.get("config") or {}
    described = dict(summary.get("strategy") or {})
    strategy = described.pop("name", None) or (config.get("conditioning") or {}).get("name")
    if strategy is None or config.get("task", "editor") != "editor":
        return None
    variant = {**described, **({"rope_layout": config["model"]["rope_layout"]} if "rope_layout" in (config.get("model") or {}) else {})}
    return {"strategy": str(strategy), "variant": variant, "seed": int(config.get("seed", 0))}


def variant_labels(infos: Mapping[Path, Mapping[str, Any]]) -> dict[Path, str]:
    """A label per run: the strategy name, plus ``[key=value, ...]`` for the options (or RoPE layout)
    in which runs of the same strategy differ (``full_scale[visibility=all]`` vs ``[visibility=coarser]``)."""
    by_name: dict[str, list[Path]] = {}
    for run, info in infos.items():
        by_name.setdefault(info["strategy"], []).append(run)
    labels = {}
    for name, runs in by_name.items():
        keys = sorted({k for run in runs for k in infos[run]["variant"]})
        differing = [k for k in keys if len({json.dumps(infos[run]["variant"].get(k), sort_keys=True) for run in runs}) > 1]
        for run in runs:
            variant = infos[run]["variant"]
            labels[run] = name + (f"[{', '.join(f'{k}={variant.get(k)}' for k in differing)}]" if differing else "")
    return labels


def runs_by_strategy(runs_dir: str | Path, prefer: Path | None = None) -> dict[str, Path]:
    """One completed editor run per strategy variant under ``runs_dir`` (a sweep's ``runs/`` folder),
    keyed by :func:`variant_labels` (the plain strategy name unless its runs differ in options or RoPE
    layout): ``prefer`` for its own variant, else the lowest seed (then the first name). Ordered by label."""
    infos = {run: info for run in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()) if (info := _run_info(run)) is not None}
    labels = variant_labels(infos)
    found: dict[str, tuple[tuple[int, int, str], Path]] = {}
    for run, info in infos.items():
        rank = (0 if prefer is not None and run.resolve() == Path(prefer).resolve() else 1, info["seed"], run.name)
        if labels[run] not in found or rank < found[labels[run]][0]:
            found[labels[run]] = (rank, run)
    return {name: found[name][1] for name in sorted(found)}
