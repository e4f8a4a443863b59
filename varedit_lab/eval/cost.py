"""Cost per conditioning strategy, measured alone: train step, edit time and sequence length.

Sweep runs share the machine's cores, so their own ``perf/train_step_s`` says more about the
neighbours than about the strategy. ``measure_cost`` times every arm in one process, one after the
other, on the same real batch (after a warm-up), so the figures compare; the report reads them
from ``cost.json``::

    {"measured": "...", "threads": 1, "batch_size": 32, "repeats": 3,
     "strategies": {"max_scale": {"train_step_s": ..., "edit_s": ..., "seq_len": ...}, ...}}

``train_step_s`` is forward + bitwise loss + backward + AdamW step at the run's batch size;
``edit_s`` a greedy CFG edit of one image with the KV cache (transformer + VAE decode; the text
encoder excluded), the medians of ``repeats`` timings.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from varedit_lab.config import load_config
from varedit_lab.data.datamodule import EditDataModule
from varedit_lab.model.loss import bitwise_loss
from varedit_lab.module import EditorModule, select_text


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_arm(config: str | Path, overrides: Sequence[str], repeats: int = 3) -> dict[str, float]:
    """Train-step and edit seconds of one configured editor on the first training batch."""
    cfg = load_config(config, list(overrides))
    module = EditorModule(cfg).train()
    data = EditDataModule.from_config(cfg)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-9)

    def train_step() -> None:
        inputs = module.encode_batch(batch)
        logits = module.model(module.plan(inputs.source_latent), inputs.teacher_inputs, inputs.text)
        loss = bitwise_loss(logits, torch.cat(inputs.target_bits, 1), module.schedule, cfg.loss.reweight_by_scale).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    module.eval()
    with torch.no_grad():
        inputs = module.encode_batch(batch)
        plan = module.plan(inputs.source_latent[:1])
        text = select_text(inputs.text, 1)
    edit_s = _median_seconds(lambda: module.edit(plan, text), repeats)
    module.train()
    return {"train_step_s": _median_seconds(train_step, repeats), "edit_s": edit_s, "seq_len": int(plan.layout.length)}


def measure_cost(config: str | Path, arms: dict[str, Sequence[str]], overrides: Sequence[str] = (), threads: int = 1,
                 repeats: int = 3) -> dict[str, Any]:
    """``arms``: name -> extra overrides (e.g. ``{"sar": ["conditioning.name=sar"]}``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        strategies = {name: measure_arm(config, [*overrides, *extra], repeats) for name, extra in arms.items()}
    finally:
        torch.set_num_threads(previous)
    batch_size = int(load_config(config, list(overrides)).data.batch_size)
    return {"measured": "alone in one process, arms one after another, same batch; medians after a warm-up",
            "threads": threads, "batch_size": batch_size, "repeats": repeats, "strategies": strategies}


def write_cost(path: str | Path, cost: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cost, indent=2) + "\n")
    return path


__all__ = ["measure_arm", "measure_cost", "write_cost"]
