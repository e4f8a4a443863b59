"""``varedit-lab export CKPT OUT.pth [--released-layout]``: one consolidated transformer file.

CKPT is a Lightning checkpoint file (single process, DDP) or a sharded checkpoint directory
(``trainer.strategy=fsdp``/``fsdp2``: DCP shards + ``meta.pt``), e.g. ``runs/NAME/checkpoints/last.ckpt``.
OUT.pth is a flat state dict of the transformer only (the frozen tokenizer and text encoder are not
included): our ``blocks.{i}.…`` keys, or the released ``block_chunks.{c}.module.{j}.…`` layout with
``--released-layout``. The run config is written next to it (``OUT.config.yaml``). Both layouts load
with ``varedit_lab.model.compat.load_state_dict_strict`` (and ``model.init_from=OUT.pth``).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="consolidate a (sharded) training checkpoint into one transformer .pth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint file or sharded checkpoint directory")
    parser.add_argument("out", help="output .pth (flat state dict of the transformer)")
    parser.add_argument("--released-layout", action="store_true", help="write the released block_chunks key layout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.distributed import export_trunk

    summary = export_trunk(args.checkpoint, args.out, released_layout=args.released_layout)
    print(json.dumps(summary, indent=2))
    return 0
