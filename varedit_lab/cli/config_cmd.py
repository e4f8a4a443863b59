"""``varedit-lab config show FILE [key=value ...]``: print the resolved config."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect run configs")
    config_sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser(
        "show",
        help="print the resolved YAML of a config file plus overrides",
        description="Resolve FILE (with its base: includes) and key=value overrides; print YAML.",
    )
    show.add_argument("file", nargs="?", help="experiment YAML (omit for the schema defaults)")
    show.add_argument("overrides", nargs="*", help="key=value overrides, or section=preset (e.g. trainer=ddp_sim)")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from varedit_lab.config import load_config, to_yaml

    file, overrides = args.file, list(args.overrides)
    if file is not None and "=" in file:  # no file given, only overrides
        file, overrides = None, [file, *overrides]
    print(to_yaml(load_config(file, overrides)), end="")
    return 0
