"""One GPU check for issue 17 (at most ~8 minutes on one H100/H200): a 2B-shaped transformer at reduced depth.

1. **Train step**: bf16 autocast (fp32 parameters, as ``trainer.precision=bf16-mixed``), FSDP2
   ``fully_shard`` per block and on the trunk root (``varedit_lab.distributed.shard_trunk``, the
   ``trainer=fsdp2`` path), activation checkpointing per block, AdamW, at ``--train-size`` px (512:
   3545 tokens, the released stage-2 length). Reports step time, tokens/s, MFU (useful model FLOPs,
   ``varedit_lab.model.flops``, over the GPU's dense bf16 peak), the peak allocated memory and the
   memory plan's figure for the same config (``varedit_lab.memplan``).
2. **Edit**: a 512 px cached edit with classifier-free guidance (batch 1, cfg 4, tau 0.5, top-p
   0.97; bf16 block projections as at inference), transformer only (no T5, no VAE). Reports seconds
   per edit and the same scaled to the full 32 blocks, next to the paper's 0.7 s (2B, 512 px, A800)
   and the README's ~0.7 s for 8B-512 on an H800.

    python benchmarks/gpu_check.py --out gpu_check.json                # defaults: depth 4, batch 8
    python benchmarks/gpu_check.py --device cpu --width 64 --heads 2 --text-channels 64 --depth 2 \
        --batch 2 --steps 2 --train-size 64 --edit-size 64 --edit-repeats 1   # CPU dry run (tests)

Prints one JSON object (and writes it to ``--out``). Random weights and inputs: no downloads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

import conditioning  # noqa: E402
from varedit_lab.config import load_config  # noqa: E402
from varedit_lab.distributed import shard_trunk  # noqa: E402
from varedit_lab.editing import cast_block_linears  # noqa: E402
from varedit_lab.memplan import GIB, model_shape, train_memory  # noqa: E402
from varedit_lab.model.build import transformer_config  # noqa: E402
from varedit_lab.model.flops import edit_flops, train_step_flops  # noqa: E402
from varedit_lab.model.layout import ScaleSchedule  # noqa: E402
from varedit_lab.model.loss import bitwise_loss  # noqa: E402
from varedit_lab.model.transformer import TextFeatures, VAREditTransformer  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
PAPER_EDIT_SECONDS = {"2B-512 (paper Table 1, A800)": 0.7, "8B-512 (README, H800)": 0.7}
FULL_DEPTH_2B = 32
WARMUP = 2
TEXT_LEN = 32


def scales_for(size: int) -> list[int]:
    grid = size // 16  # the 2B tokenizer: stride 16, no patchify
    return [s for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64) if s <= grid]


def run_config(args: argparse.Namespace) -> Any:
    """The run config of the trained shape (for the model and the memory plan)."""
    return load_config(None, [
        "model.preset=infinity_2b", f"model.depth={args.depth}", f"model.width={args.width}", f"model.num_heads={args.heads}",
        f"model.text_channels={args.text_channels}", "model.text_maxlen=64", f"model.scales=[{','.join(map(str, scales_for(args.train_size)))}]",
        "model.activation_checkpointing=true", "model.cond_drop_rate=0.1", "conditioning.name=sar",
        "tokenizer.codebook_dim=32", "tokenizer.patch_size=16", "tokenizer.encoder_ch_mult=[1,1,2,2,4]",
        "tokenizer.decoder_ch_mult=[1,1,2,2,4]", f"data.image_size={args.train_size}", f"data.batch_size={args.batch}",
        "trainer.strategy=fsdp2", "trainer.devices=1", "trainer.precision=bf16-mixed",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
    ])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def init_single_process_group(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                             rank=0, world_size=1)
    return init_device_mesh(device.type, (1,))


def train_check(args: argparse.Namespace, cfg: Any, device: torch.device) -> dict[str, Any]:
    tcfg = transformer_config(cfg.model, 32, False)
    torch.manual_seed(0)
    with device:
        model = VAREditTransformer(tcfg).train()
    shard_trunk(model, init_single_process_group(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    schedule = ScaleSchedule.from_scales(cfg.model.scales)
    plan = conditioning.build("sar").plan(torch.randn(args.batch, 32, *schedule.vae_grids(False)[-1], device=device), schedule,
                                          "paper", False)
    teacher = torch.randn(args.batch, schedule.total - 1, 32, device=device)
    bits = torch.randint(0, 2, (args.batch, schedule.total, 32), device=device)
    text = TextFeatures(torch.randn(args.batch, TEXT_LEN, args.text_channels, device=device), torch.full((args.batch,), TEXT_LEN, device=device))
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = bitwise_loss(model(plan, teacher, text), bits, schedule).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[WARMUP:] or times)
    flops = train_step_flops(tcfg, plan.layout, TEXT_LEN, args.batch)
    peak = PEAK_TFLOPS.get(next((k for k in PEAK_TFLOPS if device.type == "cuda" and k in torch.cuda.get_device_name()), ""), None)
    planned = train_memory(model_shape(cfg), cfg, args.batch, True, 1, TEXT_LEN)
    measured = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return {
        "loss": float(loss), "step_time_s": step, "step_times_s": times, "tokens_per_s": args.batch * plan.layout.length / step,
        "model_tflop_per_step": flops / 1e12, "mfu": flops / step / (peak * 1e12) if peak else None, "peak_tflops": peak,
        "sequence_length": plan.layout.length, "batch": args.batch,
        "peak_memory_gib": measured, "planned_trunk_peak_gib": planned["trunk_peak"] / GIB,
        "plan_relative_error": planned["trunk_peak"] / GIB / measured - 1 if measured else None,
    }


@torch.no_grad()
def edit_check(args: argparse.Namespace, cfg: Any, device: torch.device) -> dict[str, Any]:
    schedule = ScaleSchedule.from_scales(scales_for(args.edit_size))
    tcfg = transformer_config(cfg.model, 32, False)
    torch.manual_seed(1)
    model = VAREditTransformer(tcfg).eval()
    if device.type == "cuda":
        cast_block_linears(model, torch.bfloat16)
    model = model.to(device)
    plan = conditioning.build("sar").plan(torch.randn(1, 32, *schedule.vae_grids(False)[-1], device=device), schedule, "paper", False)
    text = TextFeatures(torch.randn(1, TEXT_LEN, args.text_channels, device=device), torch.full((1,), TEXT_LEN, device=device))
    times = []
    for i in range(args.edit_repeats + (1 if args.edit_repeats > 1 else 0)):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model.generate(plan, text, cfg=4.0, tau=0.5, top_p=0.97, generator=torch.Generator(device=device).manual_seed(i))
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:] if len(times) > 1 else times)
    return {"image_size": args.edit_size, "sequence_length": plan.layout.length, "seconds_per_edit": seconds, "times_s": times,
            "seconds_per_edit_full_depth_32": seconds * FULL_DEPTH_2B / args.depth,
            "model_tflop_per_edit": edit_flops(tcfg, plan.layout, TEXT_LEN) / 1e12, "paper_seconds": PAPER_EDIT_SECONDS,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--depth", type=int, default=4, help="blocks (the 2B model has 32)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--text-channels", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="training samples per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--edit-size", type=int, default=512)
    parser.add_argument("--edit-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu for a dry run")
    device = torch.device(args.device)
    cfg = run_config(args)
    started = time.perf_counter()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "shape": {"depth": args.depth, "width": args.width, "heads": args.heads, "text_channels": args.text_channels},
        "train": train_check(args, cfg, device),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["edit"] = edit_check(args, cfg, device)
    result["wall_s"] = time.perf_counter() - started
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
