"""``varedit-lab``: thin subcommands that parse arguments and call the library.

Each module in ``COMMANDS`` defines ``register(subparsers)``; heavy imports happen inside the command
so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS = [
    "varedit_lab.cli.config_cmd",
    "varedit_lab.cli.check_reference",
    "varedit_lab.cli.data_cmd",
    "varedit_lab.cli.train",
    "varedit_lab.cli.sweep_cmd",
    "varedit_lab.cli.demo_cmd",
    "varedit_lab.cli.export_cmd",
    "varedit_lab.cli.edit_cmd",
    "varedit_lab.cli.eval_cmd",
    "varedit_lab.cli.probe_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varedit-lab",
        description="Ablate source conditioning in visual-autoregressive image editing (VAREdit).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options too (argparse stops collecting positionals at the first option)
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in t and not t.startswith("-") for t in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - turn library errors into one clear line
        from varedit_lab.config import ConfigError

        if isinstance(err, (ConfigError, FileNotFoundError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    return int(code or 0)
