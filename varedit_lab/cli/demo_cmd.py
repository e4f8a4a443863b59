"""``varedit-lab demo [--mode full|quick]``: the main job behind ``make demo``."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="synthetic data -> tokenizer -> full/max/SAR ablation sweep -> report -> probes",
        description="Run the main job on CPU: generate the synthetic edit benchmark, train (or reuse) the tokenizer, "
        "run the conditioning ablation sweep, write the report and probe the best run. Reuses finished stages.",
    )
    parser.add_argument("--mode", choices=["full", "quick"], default="full", help="full: 3 strategies x 3 seeds; quick: 1 seed, fewer steps")
    parser.add_argument("--root", default="runs/demo", help="where the sweep, report and probes go (default runs/demo)")
    parallel = min(2, os.cpu_count() or 1)  # two 1-thread runs beat one 2-thread run on small models
    parser.add_argument("--parallel", type=int, default=parallel, help=f"sweep runs at once, each with cpu_count // parallel threads (default {parallel})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.demo import run_demo

    summary = run_demo(args.mode, args.root, args.parallel)
    return 0 if summary["sweep_exit_code"] == 0 else 1
