"""``varedit-lab data ...``: build and inspect edit shards.

* ``data synth``: the synthetic edit benchmark (train/val/test shards with ground-truth masks);
* ``data convert``: a folder or JSONL of (source, target, instruction[, mask]) into shards;
* ``data inspect``: count samples, edit kinds and keys of a shard spec (reads through the loader's
  decoder, so it also reports bad samples);
* ``data precompute``: tokenizer codes and text features into shards (varedit_lab.tokenizer.precompute_cmd).

Adding a subcommand: write a module with
``register_data(data_subparsers)`` that adds a parser and ``set_defaults(func=...)``, and append its
dotted name to :data:`DATA_COMMANDS`; or call :func:`add_data_command` from anywhere before
``build_parser()`` runs. Keep heavy imports inside the run function.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from typing import Callable

# Modules that add ``data`` subcommands through ``register_data(data_subparsers)``.
DATA_COMMANDS: list[str] = ["varedit_lab.tokenizer.precompute_cmd"]

_EXTRA: list[Callable[[argparse._SubParsersAction], None]] = []


def add_data_command(register: Callable[[argparse._SubParsersAction], None]) -> None:
    """Register a function that adds one subcommand to ``varedit-lab data``."""
    _EXTRA.append(register)


def _user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected failures (existing shards, bad options, bad samples in --strict) into one line."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (FileExistsError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapped


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="build and inspect edit shards", description=__doc__.split("\n\n")[0])
    data_sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    _register_synth(data_sub)
    _register_convert(data_sub)
    _register_inspect(data_sub)
    for name in DATA_COMMANDS:
        importlib.import_module(name).register_data(data_sub)
    for extra in _EXTRA:
        extra(data_sub)
    for action in data_sub.choices.values():  # one-line errors for plug-in subcommands too
        run = action.get_default("func")
        if run is not None and not hasattr(run, "__wrapped__"):
            action.set_defaults(func=_user_errors(run))


# -- synth -----------------------------------------------------------------------------------------


def _register_synth(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "synth",
        help="write the synthetic edit benchmark as shards",
        description="Procedural scenes (1-4 coloured shapes) and edits (recolor, remove, add, move, resize, "
        "background) with exact targets and ground-truth edit masks, deterministic from --seed. Suites: "
        "flat (flat colours, 64 px by default) and textured (stripes/checks/gradients of 2-4 tokens on shapes and "
        "background, texture masks in the shards, 128 px by default). "
        "Writes OUT/{train,val,test}-NNNNNN.tar, OUT/synth.json and OUT/vocab.txt (every instruction word).",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=1024, help="training samples (default 1024)")
    p.add_argument("--val", type=int, default=64, help="validation samples (default 64)")
    p.add_argument("--test", type=int, default=256, help="test samples (default 256)")
    p.add_argument("--suite", default="flat", help="benchmark suite: flat or textured (default flat)")
    p.add_argument("--image-size", "--size", dest="size", type=int, default=None, help="image size in pixels (default: 64 flat, 128 textured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-shard", type=int, default=128, help="samples per shard (default 128)")
    p.add_argument("--kinds", default=None, help="comma-separated subset of edit kinds (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the same splits")
    p.set_defaults(func=_user_errors(run_synth))


def run_synth(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from varedit_lab.data.synth import EDIT_KINDS, write_synthetic_shards

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds is not None else EDIT_KINDS
    counts = {"train": args.train, "val": args.val, "test": args.test}
    shards = write_synthetic_shards(
        args.out,
        counts,
        image_size=args.size,
        seed=args.seed,
        samples_per_shard=args.per_shard,
        kinds=kinds,
        overwrite=args.overwrite,
        suite=args.suite,
    )
    manifest = json.loads((Path(args.out) / "synth.json").read_text())
    for split, names in shards.items():
        if names:
            size = sum(Path(n).stat().st_size for n in names)
            print(f"{split:5s} {counts[split]:7d} samples  {len(names):4d} shards  {size / 1e6:8.2f} MB  {manifest['shards'][split]}")
    print(f"suite {manifest['suite']}, {manifest['image_size']} px; vocabulary: {Path(args.out) / manifest['vocab']}")
    print(f"{manifest['samples_per_second']} samples/s; rejected and resampled: {manifest['rejections']}")
    return 0


# -- convert ---------------------------------------------------------------------------------------


def _register_convert(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "convert",
        help="convert a folder or JSONL of edit triples into shards",
        description="Input layouts: a FOLDER with source/, target/, optional mask/ (matched by file stem) and "
        "instructions.json ({name: text}) or instructions.tsv (name<TAB>text); or a JSONL file of "
        '{"source": path, "target": path, "instruction": text, "mask": path (optional), "id": ...} '
        "with paths relative to the JSONL. Writes OUT/SPLIT-NNNNNN.tar.",
    )
    p.add_argument("--input", required=True, help="folder or .jsonl file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="train", help="shard name prefix (default train)")
    p.add_argument("--size", type=int, default=None, help="resize to cover + centre-crop to SIZE (default: copy bytes)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of this split")
    p.set_defaults(func=_user_errors(run_convert))


def run_convert(args: argparse.Namespace) -> int:
    from varedit_lab.data.convert import convert_to_shards
    from varedit_lab.data.synth import shard_pattern

    result = convert_to_shards(
        args.input, args.out, split=args.split, image_size=args.size, samples_per_shard=args.per_shard, strict=args.strict, overwrite=args.overwrite
    )
    skipped = sum(result.skipped.values())
    print(f"wrote {result.written} samples to {len(result.shards)} shards; skipped {skipped} {dict(result.skipped) if skipped else ''}")
    if result.shards:
        print(shard_pattern(args.out, args.split, len(result.shards)))
    return 0 if result.written else 1


# -- inspect ---------------------------------------------------------------------------------------


def _register_inspect(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "inspect",
        help="count samples, edit kinds and bad samples of a shard spec",
        description="SHARDS is a brace pattern, a directory or a list of .tar files (quote brace patterns).",
    )
    p.add_argument("shards", nargs="+")
    p.add_argument("--size", type=int, default=64, help="decode size (default 64)")
    p.add_argument("--show", type=int, default=3, help="print this many instructions (default 3)")
    p.set_defaults(func=_user_errors(run_inspect))


def run_inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    from varedit_lab.data.shards import expand_shards, read_fixed_list

    urls = expand_shards(args.shards if len(args.shards) > 1 else args.shards[0])
    items, bad = read_fixed_list(urls, 0, args.size, where="inspect")
    kinds = Counter(item["kind"] or "?" for item in items)
    masks = sum("mask" in item for item in items)
    textures = sum("source_texture" in item for item in items)
    print(f"{len(urls)} shards, {len(items)} good samples ({masks} with masks, {textures} with texture masks), bad: {dict(bad) or 0}")
    print("kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    for item in items[: args.show]:
        print(f"  {item['key']}: {item['instruction']}")
    return 0 if items else 1
