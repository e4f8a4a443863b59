"""``varedit-lab``: thin subcommands that parse arguments and call the library.

Each module in ``COMMANDS`` defines ``register(subparsers)``; heavy imports happen inside the command
so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
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
    "varedit_lab.cli.download_cmd",
    "varedit_lab.cli.plan_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varedit-lab",
        description="Ablate source conditioning in visual-autoregressive image editing (VAREdit).",
    )
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


DEBUG_ENV = "VAREDIT_DEBUG"
# Errors about what the user gave (a config, a path, a file's contents): exit status 2; others 1.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


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
    except Exception as err:  # noqa: BLE001 - a library error reaches the user as its message
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        else:
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            print(f"error: {message or type(err).__name__}\n(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2 if isinstance(err, INPUT_ERRORS) else 1
    return int(code or 0)
