"""``varedit-lab probe``: attention statistics of a trained checkpoint or released weights (paper §3.2.2, Fig. 3).

  varedit-lab probe --ckpt runs/NAME/checkpoints/last.ckpt --out probes/NAME
  varedit-lab probe --released DIR --model 2B-512 --data 'shards/val-*.tar' --out probes/2B-512
  varedit-lab probe --ckpt CKPT --data 'data/synthetic64/val-*.tar' --layers 0 1 -1 --samples 16 --out DIR

Probes the first --samples samples of --data (default: the validation shards of the checkpoint's run
config; required with --released, a folder in the released layout or the hub id HiDream-ai/VAREdit), teacher-forced, and writes DIR/probe.json (block attention mass per query x key block,
locality, diagonality and entropy per layer and head, with the probe settings, the strategy, the
checkpoint and its run config) and DIR/block_mass.png, DIR/locality.png and, when full maps were kept,
DIR/attention_maps.png (the paper's figure), and DIR/alignment.md + DIR/alignment.png: the paper's
Fig. 3 statement (layer 1 on the corresponding and coarser source scales, deeper layers local and
diagonal on the finest source) next to this model's numbers, with a verdict per claim. --maps LAYER ... keeps the whole-sequence head-mean maps
of those layers (default: the first and last probed layer, skipped when over the byte budget; --maps
with no layer keeps none). A table of first-vs-last-layer means and the Fig. 3 verdicts are printed
at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "probe",
        help="attention-map probes of a checkpoint: probe.json + PNGs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint written by `varedit-lab train` (a file)")
    source.add_argument("--released", metavar="DIR", help="released VAREdit weights: a folder or the hub id HiDream-ai/VAREdit")
    parser.add_argument("--model", help="released model with --released: 2B-512, 8B-512 or 8B-1024")
    parser.add_argument("--data", help="shard spec to probe (default: data.val_shards of the checkpoint's config)")
    parser.add_argument("--out", required=True, help="output folder (probe.json and PNGs)")
    parser.add_argument("--layers", type=int, nargs="+", metavar="L", help="layers to probe (negative from the end; default all)")
    parser.add_argument("--heads", type=int, nargs="+", metavar="H", help="heads to record (default all)")
    parser.add_argument("--samples", type=int, default=8, help="samples to probe (the first good ones in shard order; default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default 8)")
    parser.add_argument("--radius", type=float, default=1.0, help="locality radius in finest-source tokens (>= 0.5; default 1)")
    parser.add_argument("--maps", type=int, nargs="*", metavar="LAYER",
                        help="layers whose full maps to keep (default: first and last probed; no value: none)")
    parser.add_argument("--max-map-mib", type=float, default=64.0, help="byte budget of the full maps in MiB (default 64)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the rebuilt editor (repeatable), e.g. tokenizer.checkpoint=/path/tokenizer.pt")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 or auto")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.samples < 1 or args.batch_size < 1:
        raise SystemExit("error: --samples and --batch-size must be >= 1")
    if args.radius < 0.5:
        raise SystemExit("error: --radius must be >= 0.5 (the query's own source cell)")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file")
    if args.released is not None and not args.data:
        raise SystemExit("error: --released needs --data (shards to probe; released weights carry no data config)")
    if args.model is not None and args.released is None:
        raise SystemExit("error: --model selects a released model: use it with --released")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from varedit_lab.probes.alignment import verdicts
    from varedit_lab.probes.compare import summary_markdown
    from varedit_lab.probes.run import probe_checkpoint, probe_released

    options = dict(num_samples=args.samples, batch_size=args.batch_size, radius=args.radius, maps=args.maps, out_dir=args.out,
                   overrides=args.override, device=args.device, max_map_bytes=int(args.max_map_mib * 2**20))
    if args.released is not None:
        result = probe_released(args.released, args.model, args.data, args.layers, args.heads, **options)
    else:
        result = probe_checkpoint(args.ckpt, args.data, args.layers, args.heads, **options)
    out = Path(args.out)
    whole_maps = any(head is None and len(blocks) == result.layout.num_blocks for _, head, blocks in result.maps)
    written = ["probe.json", "block_mass.png", "locality.png"] + (["attention_maps.png"] if whole_maps else [])
    written += ["alignment.md", "alignment.png"]
    print(f"probed layers {result.layers} of {result.layout.description.get('name')}: wrote {', '.join(written)} to {out}",
          file=sys.stderr)
    print(summary_markdown({str(result.layout.description.get("name")): result}), end="")
    print("\nPaper's Fig. 3 statement vs this model (details: alignment.md):")
    for verdict in verdicts(result):
        print(f"- {verdict.claim}: {verdict.outcome.upper()} ({verdict.evidence})")
    return 0
