"""``varedit-lab download --model 2B-512|8B-512|8B-1024 [--dir DIR]``: fetch one released model.

Downloads that model's transformer, its Infinity VAE and flan-t5-xl from the hub repository
(HiDream-ai/VAREdit; layout in varedit_lab/released.py), never the other models' files. Without --dir
the files stay in the Hugging Face cache (HF_HOME / HF_HUB_CACHE) and the snapshot folder is printed;
HF_HUB_OFFLINE=1 uses a pre-filled cache without network. The printed folder is what --released takes
(so does the hub id itself: `--released HiDream-ai/VAREdit --model 2B-512`).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("download", help="download one released VAREdit model (transformer, VAE, T5)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="which released model: 2B-512, 8B-512 or 8B-1024")
    parser.add_argument("--dir", help="put the files in this folder (default: the Hugging Face cache)")
    parser.add_argument("--repo", help="hub repository (default HiDream-ai/VAREdit)")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.released import HUB_REPO, download, model_files, resolve_released

    model_files(args.model)  # a clear error for an unknown name before any network access
    folder = download(args.model, args.dir, repo=args.repo or HUB_REPO, revision=args.revision)
    files = resolve_released(folder, model=args.model)  # fails loudly on an incomplete snapshot
    print(f"{args.model}: {', '.join(model_files(args.model))} in")
    print(folder)
    return 0 if files else 1
