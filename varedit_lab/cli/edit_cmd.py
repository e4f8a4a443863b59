"""``varedit-lab edit``: edit one image, or a JSONL batch, with a trained, released or fixture model.

Model sources (exactly one):
  --ckpt CKPT        a checkpoint written by ``varedit-lab train`` (config inside; --override to adjust)
  --released DIR     released VAREdit weights, laid out as
                       DIR/2B-512.pth | 8B-512.pth | 8B-1024.pth   transformer ({size}-{resolution}.pth)
                       DIR/infinity_vae_d32reg.pth                 VAE of the 2B model
                       DIR/infinity_vae_d56_f8_14_patchify.pth     VAE of the 8B model
                       DIR/flan-t5-xl/                             Hugging Face T5 folder
                     (--model 8B-1024 picks the transformer when DIR holds several)
  --fixture F.pt     a reference fixture's weights; fixtures carry no text encoder, so the stored
                     text embedding --fixture-text N is used and instructions are ignored

Inputs:
  --image IN --instruction TEXT --out OUT.png
  --batch JSONL --out-dir DIR   one JSON object per line: {"image": path, "instruction": text,
                                "out": optional file name}; relative image paths are relative to the
                                JSONL's folder. Writes DIR/<out or NNNNN_<stem>.png> and DIR/edits.jsonl.

Outputs have the input's size (the model edits a white-padded square and the result is cropped
back). The GPU is used when present (bf16 autocast), else the CPU in fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model-source and device flags shared by ``edit`` and ``eval``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint written by `varedit-lab train` (e.g. runs/NAME/checkpoints/last.ckpt)")
    source.add_argument("--released", metavar="DIR", help="folder with released VAREdit weights (layout above) or the hub id HiDream-ai/VAREdit (with --model)")
    source.add_argument("--fixture", metavar="FIXTURE.pt", help="reference fixture (weights only; stored text embeddings)")
    parser.add_argument("--model", help="released transformer to use when DIR holds several (e.g. 8B-1024)")
    parser.add_argument("--fixture-text", type=int, default=0, metavar="N", help="stored text embedding of the fixture (default 0)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for --ckpt/--released (repeatable), e.g. tokenizer.checkpoint=/path/vae.pt")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 autocast on GPU, fp32 on CPU")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's own; release: cfg 4, tau 0.5, top-p 0.97)")
    group.add_argument("--cfg", type=float, help="classifier-free guidance strength on logits (1 disables CFG)")
    group.add_argument("--tau", type=float, help="logit temperature")
    group.add_argument("--top-p", type=float, help="drop the minority bit value when its probability <= 1 - top_p")
    group.add_argument("--top-k", type=int, help="top-k over the 2 values of a bit (1 = greedy; >= 2 is a no-op)")
    group.add_argument("--greedy", action="store_true", default=None, help="argmax bits instead of sampling")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (chunk i of a batch uses seed + i)")
    group.add_argument("--batch-size", type=int, default=8, help="images per generation batch (CFG doubles it)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"cfg": args.cfg, "tau": args.tau, "top_p": args.top_p, "top_k": args.top_k, "greedy": args.greedy}


def build_editor(args: argparse.Namespace):
    from varedit_lab.editing import load_editor

    return load_editor(args.ckpt, args.released, args.fixture, model=args.model, overrides=args.override,
                       device=args.device, precision=args.precision, text_index=args.fixture_text)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "edit",
        help="edit images with a checkpoint, released weights or a fixture",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--image", help="input image")
    parser.add_argument("--instruction", help="edit instruction (optional with --fixture)")
    parser.add_argument("--out", help="output image path (with --image)")
    parser.add_argument("--batch", metavar="JSONL", help="JSONL of {image, instruction, out?} records")
    parser.add_argument("--out-dir", help="output folder (with --batch)")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def read_batch(path: Path) -> list[dict[str, Any]]:
    """JSONL records with absolute image paths; raises ValueError naming the bad line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or "image" not in record:
            raise ValueError(f"{path}:{number}: expected an object with 'image' and 'instruction'")
        image = Path(record["image"])
        record["image"] = image if image.is_absolute() else path.parent / image
        if not record["image"].is_file():
            raise FileNotFoundError(f"{path}:{number}: image {record['image']} not found")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _check_inputs(args: argparse.Namespace) -> None:
    single = args.image is not None
    if single == (args.batch is not None):
        raise SystemExit("error: give either --image (with --out) or --batch (with --out-dir)")
    if single and not args.out:
        raise SystemExit("error: --image needs --out")
    if not single and not args.out_dir:
        raise SystemExit("error: --batch needs --out-dir")
    if args.fixture is None:
        if single and args.instruction is None:
            raise SystemExit("error: --image needs --instruction")


def run(args: argparse.Namespace) -> int:
    from varedit_lab.editing import timed

    _check_inputs(args)
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    records = read_batch(Path(args.batch)) if args.batch is not None else []  # fail before loading a model
    editor = build_editor(args)
    print(f"editor: {json.dumps(editor.describe())}", file=sys.stderr)
    sampling = sampling_kwargs(args)
    if args.image is not None:
        images, seconds = timed(editor.edit, [args.image], args.instruction, seed=args.seed, **sampling)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out)
        print(f"wrote {out} ({images[0].size[0]}x{images[0].size[1]}) in {seconds:.2f} s", file=sys.stderr)
        return 0
    return run_batch(editor, records, args, sampling)


def run_batch(editor, records: list[dict[str, Any]], args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    from varedit_lab.editing import timed

    if editor.text_encoder is not None:
        missing = [i for i, r in enumerate(records) if not r.get("instruction")]
        if missing:
            raise ValueError(f"{args.batch}: records {missing[:10]} have no 'instruction'")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    size = args.batch_size
    for chunk, start in enumerate(range(0, len(records), size)):
        group = records[start : start + size]
        instructions = [str(r.get("instruction", "")) for r in group]
        images, seconds = timed(editor.edit, [r["image"] for r in group], instructions, seed=args.seed + chunk,
                                batch_size=size, **sampling)
        for index, (record, image) in enumerate(zip(group, images), start):
            name = record.get("out") or f"{index:05d}_{Path(record['image']).stem}.png"
            path = out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            manifest.append({"image": str(record["image"]), "instruction": record.get("instruction"), "out": str(path),
                             "size": list(image.size), "seconds": round(seconds / len(group), 4)})
        print(f"{min(start + size, len(records))}/{len(records)} edited ({seconds / len(group):.2f} s/image)", file=sys.stderr)
    with open(out_dir / "edits.jsonl", "w") as handle:
        for row in manifest:
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {len(manifest)} images and {out_dir / 'edits.jsonl'}", file=sys.stderr)
    return 0
