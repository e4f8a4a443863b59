"""``varedit-lab data precompute CONFIG.yaml [key=value ...] --shards SPEC --out DIR``: tokenizer
codes (and T5 features) into shards, so large runs skip the frozen VAE and text encoder.

Registered as a ``data`` subcommand through ``register_data`` (see varedit_lab.cli.data_cmd).
The run config gives the tokenizer (``tokenizer.checkpoint`` + architecture), the schedule
(``model.scales``), the text encoder (``text:``) and the image size (``data.image_size``).
"""

from __future__ import annotations

import argparse


def register_data(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser(
        "precompute",
        help="store tokenizer codes (and text features) in shards",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("config", help="run config YAML (editor): tokenizer, model.scales, text, data.image_size")
    p.add_argument("--shards", required=True, help="input shard spec (brace pattern, glob or directory)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="train", help="output shard name prefix (default train)")
    p.add_argument("--no-text", action="store_true", help="do not store text features")
    p.add_argument("--text-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=256, help="samples per output shard (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of this split")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (right after CONFIG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from varedit_lab.config import load_config, to_dict
    from varedit_lab.model.layout import ScaleSchedule
    from varedit_lab.tokenizer import load_tokenizer
    from varedit_lab.tokenizer.precompute import precompute_shards

    cfg = load_config(args.config, args.overrides)
    tok = cfg.tokenizer
    if not tok.checkpoint:
        raise ValueError("tokenizer.checkpoint is not set: precomputing codes of a random tokenizer is never what you want")
    tokenizer = load_tokenizer(tok.checkpoint, tok)
    text = None
    if not args.no_text:
        from varedit_lab.text import TextEncoder

        text = TextEncoder.from_config(cfg.text)
    written = precompute_shards(
        args.shards,
        args.out,
        tokenizer,
        ScaleSchedule.from_scales(list(cfg.model.scales)),
        int(cfg.data.image_size),
        text_encoder=text,
        text_dtype=args.text_dtype,
        split=args.split,
        batch_size=args.batch_size,
        samples_per_shard=args.per_shard,
        overwrite=args.overwrite,
        provenance={"tokenizer_checkpoint": str(Path(tok.checkpoint).resolve()), "text_config": to_dict(cfg.text)},
    )
    print(f"wrote {len(written)} shards to {args.out}")
    return 0
