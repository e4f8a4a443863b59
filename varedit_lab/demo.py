"""The main job (``make demo``): data, tokenizer, the conditioning ablation sweep, report, probes.

Every stage reuses what a previous run left (data, the trained tokenizer, completed sweep runs), so
an interrupted demo resumes. ``quick`` runs one seed with fewer steps.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


from varedit_lab.config import experiments_dir, load_config
from varedit_lab.data.synth import write_synthetic_shards
from varedit_lab.eval.cost import measure_cost, write_cost
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.sweep import SweepOptions, load_sweep, run_sweep, write_report
from varedit_lab.sweep.spec import grid_values
from varedit_lab.tokenizer import load_tokenizer
from varedit_lab.tokenizer.precompute import MANIFEST, precompute_shards
from varedit_lab.training import train


@dataclass(frozen=True)
class DemoPlan:
    """What a mode runs. ``None`` steps take the config's own (the YAML is the recipe)."""

    sweep_file: str  # under experiments/
    suite: str  # `data synth --suite`
    image_size: int
    tokenizer_config: str  # under experiments/; its `name` is the tokenizer's run folder
    editor_config: str  # the sweep's base config (cost is measured on it)
    tokenizer_steps: int | None = None
    editor_steps: int | None = None
    val_every: int | None = None
    train_samples: int = 4096
    precompute: bool = False  # store the tokenizer's latents/bits once for every run of the sweep
    measure_cost: bool = False  # time every arm alone before the sweep (cost.json for the report)
    shared_tokenizer: bool = True  # train it where the experiments/ configs expect it (runs/<name>)
    overrides: tuple[str, ...] = ()

    @property
    def data_dir(self) -> Path:
        return Path("data") / f"{self.suite if self.suite != 'flat' else 'synthetic'}{self.image_size}"


MODES: dict[str, DemoPlan] = {
    # The decisive ablation (issue 13) on the textured benchmark at 96 px: max-scale, SAR and
    # full-scale (all-scale visibility) x 4 paired seeds, 300 steps each, trainable word encoder.
    "full": DemoPlan("sweeps/conditioning_ablation.yaml", "textured", 96, "tokenizer/textured96.yaml", "synthetic/textured96.yaml",
                     precompute=True, measure_cost=True),
    # <= 5 minutes: the flat 64 px suite, one seed per strategy, a short tokenizer of its own.
    "quick": DemoPlan("sweeps/conditioning_ablation_quick.yaml", "flat", 64, "tokenizer/synthetic64.yaml", "synthetic/base.yaml",
                      tokenizer_steps=400, editor_steps=120, val_every=120, train_samples=2048, shared_tokenizer=False,
                      overrides=("text.kind=words",)),
}


@dataclass
class DemoPaths:
    root: Path
    data: Path
    tokenizer_run: Path
    sweep: Path
    probes: Path
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, mode: str, plan: DemoPlan | None = None) -> "DemoPaths":
        # The full demo trains the tokenizer where experiments/synthetic/*.yaml point (runs/<name>);
        # the quick one trains a shorter one of its own (so it never stands in for the full one).
        plan = plan or MODES[mode]
        name = str(load_config(experiments_dir() / plan.tokenizer_config).name)
        tokenizer = Path("runs") / name if plan.shared_tokenizer else root / mode / name
        return cls(root, plan.data_dir, tokenizer, root / mode / "sweep", root / mode / "probes")

    @property
    def precomputed(self) -> Path:
        return self.data / "precomputed"


def _say(out: TextIO, message: str) -> None:
    print(f"[demo] {message}", file=out, flush=True)


def ensure_data(paths: DemoPaths, plan: DemoPlan, out: TextIO) -> None:
    manifest = paths.data / "synth.json"
    if manifest.is_file():
        have = int(json.loads(manifest.read_text()).get("counts", {}).get("train", 0))
        if have >= plan.train_samples:
            _say(out, f"data: reusing {paths.data} ({have} training pairs)")
            return
        _say(out, f"data: {paths.data} has {have} training pairs, this mode wants {plan.train_samples}: regenerating")
    _say(out, f"data: generating the {plan.suite} edit benchmark at {plan.image_size} px into {paths.data}")
    write_synthetic_shards(paths.data, {"train": plan.train_samples, "val": 64, "test": 256}, image_size=plan.image_size, seed=0,
                           overwrite=manifest.is_file(), suite=plan.suite)
    if paths.precomputed.exists():  # codes of the old images
        shutil.rmtree(paths.precomputed)


def ensure_tokenizer(paths: DemoPaths, plan: DemoPlan, out: TextIO) -> Path:
    checkpoint = paths.tokenizer_run / "tokenizer.pt"
    if checkpoint.is_file():
        _say(out, f"tokenizer: reusing {checkpoint}")
        return checkpoint
    config = experiments_dir() / plan.tokenizer_config
    steps = [f"trainer.max_steps={plan.tokenizer_steps}"] if plan.tokenizer_steps else []
    cfg = load_config(config, [*steps, "trainer.progress_bar=false", f"output_dir={paths.tokenizer_run.parent}",
                               f"name={paths.tokenizer_run.name}", f"data.train_shards={paths.data}/train-*.tar",
                               f"data.val_shards={paths.data}/val-*.tar"])
    _say(out, f"tokenizer: training {cfg.trainer.max_steps} steps ({plan.tokenizer_config})")
    train(cfg, config)
    if not checkpoint.is_file():
        raise RuntimeError(f"tokenizer training finished without writing {checkpoint}")
    return checkpoint


def editor_overrides(paths: DemoPaths, plan: DemoPlan, tokenizer: Path) -> list[str]:
    """What every run of the sweep (and the cost stage) gets on top of the sweep's base config."""
    shards = paths.precomputed if plan.precompute else paths.data
    steps = [f"trainer.max_steps={plan.editor_steps}"] if plan.editor_steps else []
    steps += [f"trainer.val_every_n_steps={plan.val_every}"] if plan.val_every else []
    return [
        f"tokenizer.checkpoint={tokenizer.resolve()}",
        f"data.train_shards={shards.resolve()}/train-*.tar",
        f"data.val_shards={shards.resolve()}/val-*.tar",
        f"text.vocabulary={(paths.data / 'vocab.txt').resolve()}",
        *steps,
        "trainer.progress_bar=false",
        *plan.overrides,
    ]


def ensure_precomputed(paths: DemoPaths, plan: DemoPlan, tokenizer: Path, out: TextIO) -> None:
    """The tokenizer's source latents and target bits of every train/val sample, stored once
    (``data precompute``): the sweep's runs then never run the VAE encoder."""
    manifest = paths.precomputed / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("tokenizer_checkpoint") == str(tokenizer.resolve()):
        _say(out, f"precompute: reusing {paths.precomputed}")
        return
    cfg = load_config(experiments_dir() / plan.editor_config, [f"tokenizer.checkpoint={tokenizer}", *plan.overrides])
    tokenizer_model = load_tokenizer(tokenizer, cfg.tokenizer)
    schedule = ScaleSchedule.from_scales(list(cfg.model.scales))
    _say(out, f"precompute: tokenizer codes of {paths.data} -> {paths.precomputed}")
    for split in ("train", "val"):
        precompute_shards(f"{paths.data}/{split}-*.tar", paths.precomputed, tokenizer_model, schedule, plan.image_size, split=split,
                          overwrite=True, provenance={"tokenizer_checkpoint": str(tokenizer.resolve())})


def ensure_cost(paths: DemoPaths, plan: DemoPlan, tokenizer: Path, spec_arms: list[str], out: TextIO) -> Path:
    path = paths.sweep / "cost.json"
    if path.is_file():
        _say(out, f"cost: reusing {path}")
        return path
    _say(out, f"cost: timing {', '.join(spec_arms)} alone (train step, edit), after the sweep")
    cost = measure_cost(experiments_dir() / plan.editor_config, {arm: [f"conditioning.name={arm}"] for arm in spec_arms},
                        editor_overrides(paths, plan, tokenizer))
    for arm, values in cost["strategies"].items():
        _say(out, f"cost: {arm}: {values['train_step_s']:.2f} s/step, {values['edit_s']:.2f} s/edit, {values['seq_len']} tokens")
    return write_cost(path, cost)


def sweep_arms(plan: DemoPlan) -> list[str]:
    spec = load_sweep(experiments_dir() / plan.sweep_file)
    return [str(v) for v in grid_values("conditioning.name", spec.parameters.get("conditioning.name", {})) or []]


def run_ablation(paths: DemoPaths, plan: DemoPlan, tokenizer: Path, parallel: int, out: TextIO) -> int:
    spec = load_sweep(experiments_dir() / plan.sweep_file)
    overrides = editor_overrides(paths, plan, tokenizer)
    _say(out, f"sweep: {spec.name}: {spec.raw.get('description', '')}")
    result = run_sweep(spec, SweepOptions(parallel=parallel, sweep_dir=paths.sweep, overrides=overrides), out=out)
    return result.exit_code


def best_run(sweep_dir: Path, metric: str = "val/balance") -> Path | None:
    """The completed run with the highest ``metric`` (the probes analyse it)."""
    best, best_value = None, float("-inf")
    for summary_path in sorted((sweep_dir / "runs").glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        value = summary.get("metrics", {}).get(metric)
        if summary.get("status") == "completed" and value is not None and value > best_value:
            best, best_value = summary_path.parent, value
    return best


def run_demo(mode: str = "full", root: str | Path = "runs/demo", parallel: int = 1, out: TextIO | None = None) -> dict[str, Any]:
    out = out or sys.stdout
    if mode not in MODES:
        raise ValueError(f"unknown demo mode {mode!r}; valid: {sorted(MODES)}")
    plan, paths = MODES[mode], DemoPaths.create(Path(root), mode)
    start = time.perf_counter()
    stages = [("data", lambda: ensure_data(paths, plan, out))]
    tokenizer: dict[str, Path] = {}
    stages.append(("tokenizer", lambda: tokenizer.setdefault("path", ensure_tokenizer(paths, plan, out))))
    if plan.precompute:
        stages.append(("precompute", lambda: ensure_precomputed(paths, plan, tokenizer["path"], out)))
    stages.append(("sweep", lambda: run_ablation(paths, plan, tokenizer["path"], parallel, out)))
    if plan.measure_cost:  # after the sweep: the arms are timed alone on the machine, not beside its runs
        stages.append(("cost", lambda: str(ensure_cost(paths, plan, tokenizer["path"], sweep_arms(plan), out))))
        stages.append(("report", lambda: str(write_report(paths.sweep, wandb=False, out=out)["report"])))
    results: dict[str, Any] = {}
    for name, stage in stages:
        t0 = time.perf_counter()
        results[name] = stage()
        paths.timings[name] = time.perf_counter() - t0
    best = best_run(paths.sweep)
    if best is not None:
        t0 = time.perf_counter()
        results["probes"] = probe_best_run(best, paths.probes, out)
        paths.timings["probes"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    summary = {
        "mode": mode,
        "minutes": round(total / 60, 2),
        "stage_minutes": {k: round(v / 60, 2) for k, v in paths.timings.items()},
        "data": str(paths.data),
        "tokenizer": str(tokenizer.get("path")),
        "report": str(paths.sweep / "report.md"),
        "sweep_exit_code": results.get("sweep"),
        "best_run": str(best) if best else None,
        "probes": str(paths.probes) if best else None,
    }
    (paths.root / mode).mkdir(parents=True, exist_ok=True)
    (paths.root / mode / "demo.json").write_text(json.dumps(summary, indent=2))
    stages = ", ".join(f"{name} {minutes:.1f}" for name, minutes in summary["stage_minutes"].items())
    _say(out, f"done in {total / 60:.1f} min ({stages} min; stages reused from an earlier run take seconds)")
    for key in ("report", "best_run", "probes", "tokenizer", "data"):
        _say(out, f"{key}: {summary[key]}")
    if not plan.shared_tokenizer:
        # the experiments/ configs read runs/<tokenizer name>/tokenizer.pt; this mode trained a shorter one elsewhere
        _say(out, f"the README's editor commands need a tokenizer: add tokenizer.checkpoint={tokenizer.get('path')} "
                  f"(or first: varedit-lab train experiments/{plan.tokenizer_config})")
    return summary


def probe_best_run(run_dir: Path, out_dir: Path, out: TextIO) -> str:
    """Attention probes (paper §3.2.2) of the sweep; returns ``out_dir``.

    The best run's ``checkpoints/last.ckpt`` is probed on the first 8 validation samples of its own
    config (every layer) into ``out_dir/probe.json`` + PNGs. When the sweep's ``runs/`` folder also
    holds completed runs of other strategies, one run per strategy (the lowest seed) is probed into
    ``out_dir/strategies/<run>/`` (runs of one strategy with different options, e.g. full-scale
    ``visibility`` all vs coarser, count as different strategies); ``strategy_comparison.png`` and
    ``probes.md`` (first vs last layer per strategy) compare them, and ``probes.md`` ends with the
    paper's Fig. 3 statement next to the full-scale model's numbers (``alignment_markdown``: the
    paper's setting, visibility all, when the sweep has it). Seconds per run on a CPU for the demo's models.
    """
    from varedit_lab.probes.alignment import alignment_markdown, is_paper_setting
    from varedit_lab.probes.compare import compare_strategies, summary_markdown
    from varedit_lab.probes.run import probe_checkpoint, runs_by_strategy

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    settings: dict[str, Any] = {"num_samples": 8, "batch_size": 8}
    t0 = time.perf_counter()
    best = probe_checkpoint(run_dir / "checkpoints" / "last.ckpt", out_dir=out_dir, **settings)
    siblings = runs_by_strategy(run_dir.parent, prefer=run_dir)
    best_strategy = next((label for label, run in siblings.items() if run == run_dir), str(best.layout.description.get("name")))
    _say(out, f"probes: {run_dir.name} ({best_strategy}) -> {out_dir} in {time.perf_counter() - t0:.0f} s")
    results, places = {best_strategy: best}, {best_strategy: (run_dir.name, ".")}
    for strategy, run in siblings.items():
        if strategy in results:
            continue
        t0 = time.perf_counter()
        try:  # a sibling that cannot be probed (e.g. its tokenizer moved) must not fail the demo
            results[strategy] = probe_checkpoint(run / "checkpoints" / "last.ckpt", out_dir=out_dir / "strategies" / run.name, **settings)
        except (OSError, ValueError, RuntimeError) as err:
            _say(out, f"probes: skipping {run.name}: {type(err).__name__}: {err}")
            continue
        places[strategy] = (run.name, f"strategies/{run.name}")
        _say(out, f"probes: {run.name} ({strategy}) in {time.perf_counter() - t0:.0f} s")
    results = dict(sorted(results.items()))
    lines = ["# Attention probes (paper §3.2.2)", "",
             f"Best run `{run_dir.name}` ({best_strategy}); every layer, the first {settings['num_samples']} validation samples.", "",
             "| strategy | run | outputs |", "|---|---|---|"]
    lines += [f"| {name} | `{places[name][0]}` | `{places[name][1]}/` (probe.json, PNGs, alignment.md) |" for name in results]
    lines += ["", "First → last layer, means over target scales 1..K-1 (SOS excluded):", "", summary_markdown(results).rstrip(), "",
              "The paper: layer 1 spreads its attention over the corresponding and coarser source scales (SAR: over",
              "its own pooled reference, a same-scale share of 1 that the mask fixes); deeper layers are local (locality",
              "well above the uniform value in parentheses, diagonality > 1) on the finest source. The section below",
              "decides this for the full-scale model(s) with declared rules; the numbers say what these models do."]
    if len(results) > 1:
        compare_strategies(results, out_dir / "strategy_comparison.png")
        lines += ["", "![strategy comparison](strategy_comparison.png)"]
    # The paper's Fig. 3 model: full-scale with every source scale visible (else any full-scale model).
    full = [name for name, r in results.items() if is_paper_setting(r.layout.description)]
    full = full or [name for name, r in results.items() if r.layout.description.get("name") == "full_scale"]
    for name in full:
        image = "alignment.png" if places[name][1] == "." else f"{places[name][1]}/alignment.png"
        lines += ["", alignment_markdown(results[name], image=image, num_samples=settings["num_samples"]).rstrip()]
    (out_dir / "probes.md").write_text("\n".join(lines) + "\n")
    _say(out, f"probes: {len(results)} strateg{'y' if len(results) == 1 else 'ies'} in {out_dir / 'probes.md'}")
    return str(out_dir)
