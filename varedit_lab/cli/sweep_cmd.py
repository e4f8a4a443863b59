"""``varedit-lab sweep``: run a W&B-format sweep file locally, report on it, or validate it.

Forms (the first word picks the action; a file name alone means ``run``)::

    varedit-lab sweep [run] FILE.yaml [key=value ...] [--max-runs N] [--parallel K] [--dry-run]
                                      [--retry-failed] [--dir DIR] [--no-report] [--allow-custom-command]
                                      [--launcher local|submitit] [--launcher-config YAML]
    varedit-lab sweep report DIR [--no-wandb]
    varedit-lab sweep report --wandb ENTITY/PROJECT/SWEEP_ID [--dir DIR] [--no-wandb]
    varedit-lab sweep validate FILE.yaml [FILE.yaml ...]

``key=value`` after FILE applies to every run (e.g. ``trainer.max_steps=50``). The same FILE works
with a W&B server: ``wandb sweep FILE.yaml`` then ``wandb agent ENTITY/PROJECT/SWEEP_ID``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ACTIONS = ("run", "report", "validate")


def _add_options(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that options given before and after FILE can be merged (see _parse).
    parser.add_argument("--max-runs", type=int, metavar="N", help="run at most N runs (required for random/bayes unless the file sets run_cap)")
    parser.add_argument(
        "--parallel",
        type=int,
        metavar="K",
        help="run K runs at once (default 1): on GPUs each gets its own CUDA_VISIBLE_DEVICES (trainer.devices of them); "
        "on CPU each is limited to cpu_count // K threads",
    )
    parser.add_argument("--launcher", choices=("local", "submitit"), help="local: a process per run (default) · submitit: a SLURM job per run")
    parser.add_argument("--launcher-config", type=Path, metavar="YAML", help="submitit executor parameters (default experiments/launch/submitit.yaml)")
    parser.add_argument("--dry-run", action="store_true", default=None, help="print each run's command (and whether it would run); start nothing")
    parser.add_argument("--retry-failed", action="store_true", default=None, help="run failed runs again (completed runs are always skipped)")
    parser.add_argument("--dir", type=Path, metavar="DIR", help="sweep directory (default runs/sweeps/<sweep name>)")
    parser.add_argument("--no-report", action="store_true", default=None, help="skip summary.csv/report.md/plots at the end")
    parser.add_argument(
        "--wandb",
        dest="wandb_sweep",
        metavar="ENTITY/PROJECT/SWEEP_ID",
        help="report: read the runs of this W&B sweep from the server (wandb.Api) instead of a local DIR",
    )
    parser.add_argument("--no-wandb", action="store_true", default=None, help="do not log the report to W&B")
    parser.add_argument(
        "--allow-custom-command",
        action="store_true",
        default=None,
        help="accept a command that is not `varedit-lab train` (it must still take varedit-lab config overrides)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep",
        help="run, report on or validate a sweep file (W&B sweep format)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="varedit-lab sweep [run|report|validate] PATH [key=value ...] [options]",
    )
    _add_options(parser)
    # Everything after the first word is parsed again in _parse, so options may follow FILE.
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="[run|report|validate] PATH", help=argparse.SUPPRESS)
    parser.set_defaults(func=run, _sweep_parser=parser)


def _parse(args: argparse.Namespace) -> tuple[str, list[str], argparse.Namespace]:
    """(action, positional words, options) from ``args.words`` merged with the options given before it."""
    inner = argparse.ArgumentParser(prog="varedit-lab sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(inner)
    inner.add_argument("positional", nargs="*")
    parsed = inner.parse_intermixed_args(args.words)
    for key, value in vars(parsed).items():
        if key != "positional" and value is None:
            setattr(parsed, key, getattr(args, key, None))
    words = list(parsed.positional)
    if not words:
        args._sweep_parser.error("missing FILE.yaml (or: report DIR, validate FILE...)")
    action = words.pop(0) if words[0] in ACTIONS else "run"
    return action, words, parsed


def run(args: argparse.Namespace) -> int:
    action, words, opts = _parse(args)
    parser: argparse.ArgumentParser = args._sweep_parser
    if action == "report":
        if opts.wandb_sweep:
            if words:
                parser.error("usage: varedit-lab sweep report --wandb ENTITY/PROJECT/SWEEP_ID [--dir DIR]")
            return _report_wandb(opts.wandb_sweep, opts.dir, wandb=not opts.no_wandb)
        if len(words) != 1:
            parser.error("usage: varedit-lab sweep report DIR  (or: report --wandb ENTITY/PROJECT/SWEEP_ID)")
        return _report(Path(words[0]), wandb=not opts.no_wandb)
    if action == "validate":
        if not words:
            parser.error("usage: varedit-lab sweep validate FILE.yaml [FILE.yaml ...]")
        return _validate(words, bool(opts.allow_custom_command))
    if not words or "=" in words[0]:
        parser.error("usage: varedit-lab sweep [run] FILE.yaml [key=value ...] [options]")
    file, overrides = words[0], words[1:]
    bad = [w for w in overrides if "=" not in w]
    if bad:
        parser.error(f"expected key=value overrides after {file}, got {bad}")
    return _run(file, overrides, opts)


def _run(file: str, overrides: list[str], opts: argparse.Namespace) -> int:
    from varedit_lab.sweep import SweepOptions, load_sweep, run_sweep

    spec = load_sweep(file, allow_custom_command=bool(opts.allow_custom_command))
    _warn_missing_inputs(spec, overrides)
    options = SweepOptions(
        max_runs=opts.max_runs,
        parallel=opts.parallel or 1,
        dry_run=bool(opts.dry_run),
        retry_failed=bool(opts.retry_failed),
        sweep_dir=opts.dir,
        overrides=overrides,
        report=not opts.no_report,
        report_wandb=not opts.no_wandb,
        launcher=opts.launcher or "local",
        launcher_config=opts.launcher_config,
    )
    return run_sweep(spec, options).exit_code


def _warn_missing_inputs(spec, overrides: list[str]) -> None:
    """Before anything runs: say so when every run would fail for a missing input file."""
    from varedit_lab.config import ConfigError, load_config
    from varedit_lab.config.inputs import missing_tokenizer

    if not spec.experiment or "tokenizer.checkpoint" in spec.parameters:
        return
    try:
        problem = missing_tokenizer(load_config(spec.experiment, overrides))
    except ConfigError:
        return  # the runner reports config errors itself, per run
    if problem:
        print(f"warning: every run of this sweep will fail:\n{problem}", file=sys.stderr, flush=True)


def _report(sweep_dir: Path, wandb: bool) -> int:
    from varedit_lab.sweep import write_report

    paths = write_report(sweep_dir, wandb=wandb)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _report_wandb(path: str, sweep_dir: Path | None, wandb: bool) -> int:
    from varedit_lab.sweep import write_report
    from varedit_lab.sweep.runner import DEFAULT_ROOT
    from varedit_lab.sweep.wandb_source import load_wandb_results, split_sweep_path

    source = load_wandb_results(path)
    folder = sweep_dir or DEFAULT_ROOT / f"wandb-{split_sweep_path(path)[2]}"
    for name, written in write_report(folder, wandb=wandb, source=source).items():
        print(f"{name}: {written}")
    return 0


def _validate(files: list[str], allow_custom_command: bool) -> int:
    from varedit_lab.sweep import SweepError, load_sweep
    from varedit_lab.sweep.plan import grid_proposals

    failed = 0
    for file in files:
        try:
            spec = load_sweep(file, allow_custom_command=allow_custom_command)
        except SweepError as err:
            print(f"error: {err}")
            failed += 1
            continue
        size = f"{len(grid_proposals(spec))} runs" if spec.method == "grid" else f"run_cap {spec.run_cap or '— (pass --max-runs)'}"
        print(f"ok: {file} ({spec.name}: {spec.method}, {size})")
    return 1 if failed else 0
