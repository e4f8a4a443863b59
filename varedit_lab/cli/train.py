"""varedit-lab train EXPERIMENT.yaml [key=value ...]: train the editor or the tokenizer.

The YAML's task selects what is trained. Overrides use the config dotlist (optim.lr=1e-4),
section=preset (trainer=ddp_sim) or the W&B agent forms (${args_no_hyphens} gives key=value;
${args} gives --key=value). resume=auto continues from the run's checkpoints/last.ckpt.

The console shows progress lines (step / total, the metric that matters, ETA), the validation
results and a final line; the run folder's console.log keeps them with the libraries' messages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train the editor or the tokenizer from an experiment YAML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="experiment YAML (e.g. experiments/synthetic/sar.yaml)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value overrides (resume=auto to continue a run)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.config import load_config
    from varedit_lab.training import train

    cfg = load_config(args.config, args.overrides)
    directory = train(cfg, args.config)
    print(f"run directory: {directory}", file=sys.stderr)
    tokenizer = Path(directory) / "tokenizer.pt"
    if cfg.task == "tokenizer" and tokenizer.is_file():
        print(f"tokenizer: {tokenizer} (editor runs use it with tokenizer.checkpoint={tokenizer})", file=sys.stderr)
    return 0
