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

    failed = unreadable = 0
    for path in args.fixtures:
        print(f"== {path}")
        try:
            results = check_reference(path)
        except (OSError, ValueError, KeyError) as err:  # not a fixture: say so, check the others
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"error: {message}")
            unreadable += 1
            continue
        print(format_table(results))
        bad = [r.field for r in results if not r.ok]
        failed += len(bad)
        print(f"{len(results) - len(bad)}/{len(results)} fields ok" + (f"; FAILED: {bad}" if bad else ""))
    if unreadable:
        print(f"{unreadable} of {len(args.fixtures)} files could not be checked")
    return 1 if failed or unreadable else 0
