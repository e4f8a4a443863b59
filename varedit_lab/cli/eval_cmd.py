"""``varedit-lab eval``: score an editor on the synthetic benchmark, EMU-Edit or PIE-Bench.

  varedit-lab eval --ckpt runs/NAME/checkpoints/last.ckpt --benchmark synthetic --data data/synthetic64 --out eval/sar
  varedit-lab eval --released weights/ --model 2B-512 --benchmark emu_edit --data emu_edit_test/ \\
      --clip models/clip-vit-base-patch32 --dino models/dino-vits16 --out eval/emu
  varedit-lab eval --released weights/ --benchmark pie_bench --data PIE-Bench_v1/ --clip models/clip-vit-large-patch14 --out eval/pie

synthetic: --data is a synthetic data folder (its {split}-*.tar; --split, default test) or a shard
spec; metrics are success / preservation / balance inside and outside the ground-truth mask, per edit
kind, next to the copy-the-source baseline. emu_edit / pie_bench: --data is a local copy laid out as
documented in varedit_lab/eval/benchmarks.py; L1 always, CLIP metrics with --clip, DINO with --dino
(local Hugging Face folders; nothing is downloaded).

Writes OUT/metrics.json, OUT/metrics.md, image grids (and the edited images for public benchmarks),
and a W&B run (offline by default; none with WANDB_MODE=disabled or --no-wandb).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from varedit_lab.cli.edit_cmd import add_model_arguments, add_sampling_arguments

    parser = sub.add_parser(
        "eval",
        help="evaluate an editor on the synthetic benchmark, EMU-Edit or PIE-Bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--benchmark", required=True, choices=("synthetic", "emu_edit", "pie_bench"))
    parser.add_argument("--data", required=True, help="benchmark data (see above)")
    parser.add_argument("--split", help="synthetic: shard split (default test); emu_edit: keep records of this split")
    parser.add_argument("--clip", metavar="DIR", help="local CLIP folder (CLIPModel + tokenizer + image processor)")
    parser.add_argument("--dino", metavar="DIR", help="local DINO folder (DINOv2 or DINO ViT + image processor)")
    parser.add_argument("--metrics-device", default="cpu", help="device of the CLIP/DINO models (default cpu)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N samples (0 = all)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-save-edits", action="store_true", help="public benchmarks: do not write the edited images")
    parser.add_argument("--no-wandb", action="store_true", help="do not create a W&B run")
    parser.add_argument("--wandb-project", default="varedit-lab-eval")
    parser.add_argument("--wandb-name", help="W&B run name (default: <benchmark>-<out folder name>)")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def _progress(done: int, total: int) -> None:
    print(f"\r{done}/{total} evaluated", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.cli.edit_cmd import build_editor, sampling_kwargs
    from varedit_lab.eval.report import log_to_wandb, write_report

    if not Path(args.data).exists() and args.benchmark != "synthetic":
        raise FileNotFoundError(f"--data {args.data}: not found")
    clip = dino = None
    if args.benchmark != "synthetic":
        from varedit_lab.eval.clip_metrics import ClipScorer, DinoScorer

        clip = ClipScorer.from_pretrained(args.clip, args.metrics_device) if args.clip else None
        dino = DinoScorer.from_pretrained(args.dino, args.metrics_device) if args.dino else None
    elif args.clip or args.dino:
        print("note: --clip/--dino are not used by the synthetic benchmark (it has exact targets)", file=sys.stderr)
    editor = build_editor(args)
    print(f"editor: {json.dumps(editor.describe())}", file=sys.stderr)
    out = Path(args.out)
    sampling = sampling_kwargs(args)
    if args.benchmark == "synthetic":
        from varedit_lab.eval.synthetic import evaluate_synthetic

        metrics = evaluate_synthetic(editor, args.data, out, split=args.split or "test", limit=args.limit,
                                     batch_size=args.batch_size, seed=args.seed, sampling=sampling, progress=_progress)
        images = [out / "grid.png", *sorted((out / "grids").glob("*.png"))]
    else:
        from varedit_lab.eval.benchmarks import evaluate_benchmark, load_benchmark

        samples = load_benchmark(args.benchmark, args.data, limit=args.limit, split=args.split)
        metrics = evaluate_benchmark(editor, samples, out, benchmark=args.benchmark, clip=clip, dino=dino,
                                     batch_size=args.batch_size, seed=args.seed, sampling=sampling,
                                     save_edits=not args.no_save_edits, progress=_progress)
        images = [out / "grid.png"]
    metrics["sampling_overrides"] = {k: v for k, v in sampling.items() if v is not None}
    json_path, md_path = write_report(metrics, out)
    print(md_path.read_text())
    if not args.no_wandb:
        run_dir = log_to_wandb(metrics, out, project=args.wandb_project, name=args.wandb_name or f"{args.benchmark}-{out.name}",
                               images=[p for p in images if p.is_file()])
        if run_dir:
            print(f"W&B run: {run_dir}", file=sys.stderr)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0
