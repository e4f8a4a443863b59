"""GPU smoke check of the sharded training path (issue #8): peak memory, step time and MFU.

Runs the real Trainer assembly (``varedit_lab.training``) with the ``fsdp`` preset (Lightning
FSDPStrategy: a wrap unit per block, activation checkpointing per block, bf16 autocast, sharded
checkpoints) or ``fsdp2``, on a 2B-shaped transformer (width 2048, 16 heads, 2048-wide text) with
reduced depth, on synthetic 256 px edit shards. The frozen parts are small random stand-ins with the
2B layout (tokenizer: stride 16, 32 bits; text encoder: one T5 layer, 2048 wide): no downloads.
After training, rank 0 consolidates the sharded checkpoint with ``export`` and checks it loads.

    python benchmarks/gpu_fsdp_smoke.py [--strategy fsdp|fsdp2] [--depth 4] [--steps 12] [--batch 8]
    torchrun --standalone --nproc_per_node=N benchmarks/gpu_fsdp_smoke.py ...   # N GPUs
    python benchmarks/gpu_fsdp_smoke.py --accelerator cpu --strategy fsdp2 --width 64 --depth 2 \
        --image-size 64 --steps 4 --batch 2      # CPU dry run of the script itself (2 processes)

Prints one JSON object (rank 0) with ``peak_memory_gib``, ``step_time_s`` (median after warm-up),
``tokens_per_s``, ``mfu`` (useful model FLOPs of forward + backward, ``varedit_lab.model.flops``,
per GPU over the GPU's dense bf16 peak; activation-checkpointing recompute is not counted) and the
checks that the configured sharding, checkpointing and precision are in effect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402

from varedit_lab import training  # noqa: E402
from varedit_lab.config import load_config  # noqa: E402
from varedit_lab.model.flops import train_step_flops  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
WARMUP_STEPS = 3


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class PerfMonitor(pl.Callback):
    """Per-step wall time (CUDA-synchronised), text lengths for the FLOP count, peak memory."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.text_lengths: list[float] = []
        self.batch_sizes: list[int] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # cached by the encoder: the step's own call is then free
            self.text_lengths.append(float(module.text_encoder.encode(batch["instruction"]).lengths.float().mean()))
        self.batch_sizes.append(len(batch["instruction"]))
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def trunk_parameters(model_cfg: Any) -> int:
    """Unsharded parameter count (a meta-device copy: sharded parameters report local sizes)."""
    from varedit_lab.model.transformer import VAREditTransformer

    with torch.device("meta"):
        return sum(p.numel() for p in VAREditTransformer(model_cfg).parameters())


def sharding_report(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = list(trainer.strategy.model.modules())
    return {
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "fsdp1_units": sum(isinstance(m, FullyShardedDataParallel) for m in modules),
        "fsdp2_units": sum(isinstance(m, FSDPModule) for m in modules),
        "checkpoint_wrappers": sum(isinstance(m, CheckpointWrapper) for m in modules),
        "trunk_checkpointing": bool(module.model.cfg.activation_checkpointing),
        "compiled_blocks": sum(getattr(b, "_compiled_call_impl", None) is not None for b in module.model.modules()),
        "optimizer_param_types": sorted({type(p).__name__ for g in trainer.optimizers[0].param_groups for p in g["params"]}),
    }


def overrides(args: argparse.Namespace, shards: str, out_dir: Path, devices: int) -> list[str]:
    sim = args.accelerator == "cpu"
    preset = {"fsdp": "fsdp", "fsdp2": "fsdp2_sim" if sim else "fsdp2"}[args.strategy]
    grid = args.image_size // 16
    scales = [s for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64) if s <= grid]
    return [
        f"trainer={preset}",
        f"trainer.devices={devices}",
        f"trainer.num_nodes={args.num_nodes}",
        f"trainer.precision={'32-true' if sim else 'bf16-mixed'}",
        f"trainer.max_steps={args.steps}",
        f"trainer.checkpoint_every_n_steps={args.steps}",  # one sharded save, at the end
        "trainer.checkpoint_monitor=null",
        "trainer.val_every_n_steps=1000000",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "model.preset=infinity_2b",
        f"model.depth={args.depth}",
        *([f"model.width={args.width}", f"model.num_heads={max(1, args.width // 128)}", f"text.tiny_d_model={args.width}"] if args.width else ["text.tiny_d_model=2048"]),
        f"model.scales=[{','.join(map(str, scales))}]",
        "model.rope_layout=paper",
        "model.activation_checkpointing=true",
        f"model.compile_blocks={str(args.compile).lower()}",
        "text.max_length=64",
        "model.text_maxlen=64",
        "text.tiny_num_layers=1",
        "text.tiny_num_heads=16",
        "text.tiny_d_ff=2048",
        "tokenizer.checkpoint=null",
        "tokenizer.codebook_dim=32",
        "tokenizer.patch_size=16",
        "tokenizer.base_ch=32",
        "tokenizer.encoder_ch_mult=[1,1,2,2,4]",
        "tokenizer.decoder_ch_mult=[1,1,2,2,4]",
        "tokenizer.norm_num_groups=8",
        f"data.train_shards={shards}",
        "data.val_shards=null",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        "data.num_workers=1",
        f"data.batches_per_epoch={args.steps + 1}",
        "data.shuffle_buffer=8",
        "sampling.num_val_edits=0",
        "logger.mode=disabled",
        f"output_dir={out_dir}",
        "name=gpu_fsdp_smoke",
    ]


def write_shards(directory: Path, image_size: int, world: int) -> str:
    """Synthetic edit shards (rank 0 writes, others wait for the marker file)."""
    from varedit_lab.data.synth import shard_pattern, write_synthetic_shards

    shards = max(8, 2 * world)
    done = directory / "ready"
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and not done.exists():
        write_synthetic_shards(directory, {"train": shards * 8}, image_size=image_size, seed=0, samples_per_shard=8, overwrite=True)
        done.write_text("ok")
    deadline = time.time() + 600
    while not done.exists():
        if time.time() > deadline:
            raise TimeoutError(f"rank 0 never finished writing shards to {directory}")
        time.sleep(0.5)
    return shard_pattern(directory, "train", shards)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=("fsdp", "fsdp2"), default="fsdp")
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--devices", type=int, default=None, help="processes per node (default: torchrun's, else 1 GPU / 2 CPU)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--depth", type=int, default=4, help="blocks (the 2B model has 32)")
    parser.add_argument("--width", type=int, default=None, help="override the 2B width 2048 (CPU dry runs)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="per-GPU batch")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU (default: by device name)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "varedit_gpu_fsdp_smoke")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --accelerator cpu for a dry run")
    devices = args.devices or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (1 if args.accelerator == "gpu" else 2)
    world = devices * args.num_nodes
    args.work_dir.mkdir(parents=True, exist_ok=True)
    shards = write_shards(args.work_dir / f"shards{args.image_size}", args.image_size, world)
    cfg = load_config(None, overrides(args, shards, args.work_dir / "runs", devices))

    # The real assembly of varedit_lab.training.train, plus the monitor.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = training.build_task(cfg)
    directory = training.run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    callbacks = training.build_callbacks(cfg, directory, {})[0]
    monitor = PerfMonitor()
    trainer = training.build_trainer(cfg, directory, callbacks + [monitor], training.build_loggers(cfg, directory, "gpu_fsdp_smoke"))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - started
    report = sharding_report(trainer, module)
    peak_alloc = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    if not trainer.is_global_zero:
        return None

    from varedit_lab.distributed import export_trunk

    timed = monitor.times[WARMUP_STEPS:] or monitor.times
    step_time = statistics.median(timed)
    layout = module.strategy.layout(module.schedule, module.rope_layout)
    text_len = statistics.mean(monitor.text_lengths)
    flops = train_step_flops(module.model.cfg, layout, int(round(text_len)), args.batch)
    peak = peak_tflops(args.peak_tflops)
    export_started = time.perf_counter()
    exported = export_trunk(directory / "checkpoints" / "last.ckpt", args.work_dir / "export" / "trunk.pth")
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "config": {"strategy": args.strategy, "depth": args.depth, "width": module.model.cfg.width, "batch_per_gpu": args.batch,
                   "image_size": args.image_size, "seq_len": layout.length, "compile": args.compile, "world_size": world},
        "trunk_parameters": trunk_parameters(module.model.cfg),
        "peak_memory_gib": peak_alloc,
        "peak_reserved_gib": peak_reserved,
        "step_time_s": step_time,
        "step_times_s": monitor.times,
        "tokens_per_s": args.batch * layout.length / step_time,
        "model_tflop_per_step": flops / 1e12,
        "mfu": flops / step_time / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
        "fit_wall_s": wall,
        "checks": report,
        "export": {**exported, "seconds": time.perf_counter() - export_started},
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
