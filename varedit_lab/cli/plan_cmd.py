"""``varedit-lab plan CONFIG [key=value ...] [--gpu-mem 80GB]``: per-device memory before launching.

Prints, per device, parameters, gradients, AdamW state, activations with and without activation
checkpointing, the frozen text encoder and VAE and the KV cache of an edit, for the config's trainer
preset (DDP, FSDP, FSDP2; trainer.devices x trainer.num_nodes), and with --gpu-mem the largest batch
per device that fits. Model and its checks: varedit_lab/memplan.py, benchmarks/memory_plan.py.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plan", help="memory plan of a config per device (and the largest batch that fits)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (e.g. experiments/released/varedit_2b_512.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer=fsdp2 trainer.num_nodes=2")
    parser.add_argument("--gpu-mem", help="device memory, e.g. 80GB: also print the largest batch that fits")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="devices per node when trainer.devices=-1 (default 8)")
    parser.add_argument("--text-tokens", type=int, default=32, help="T5 tokens per instruction (default 32)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from varedit_lab.config import load_config
    from varedit_lab.memplan import format_plan, memory_plan, parse_size, to_json

    cfg = load_config(args.config, args.overrides)
    plan = memory_plan(cfg, parse_size(args.gpu_mem) if args.gpu_mem else None, args.gpus_per_node, args.text_tokens)
    print(to_json(plan) if args.json else format_plan(plan))
    return 0
