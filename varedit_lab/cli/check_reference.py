"""``varedit-lab check-reference FIXTURE.pt ...``: parity table against reference fixtures."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "check-reference",
        help="compare this implementation with reference fixtures",
        description="Build the model from each fixture's config, load its reference state dict strictly "
        "and compare every expected field. Exits non-zero on any failure.",
    )
    parser.add_argument("fixtures", nargs="+", help="fixture .pt files (format_version 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.parity import check_reference, format_table

    failed = 0
    for path in args.fixtures:
        results = check_reference(path)
        print(f"== {path}")
        print(format_table(results))
        bad = [r.field for r in results if not r.ok]
        failed += len(bad)
        print(f"{len(results) - len(bad)}/{len(results)} fields ok" + (f"; FAILED: {bad}" if bad else ""))
    return 1 if failed else 0
