"""AdamW with linear warm-up then a constant or cosine learning rate: shared by every trained module."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier: linear warm-up, then constant (as the release trains) or cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_schedule(decay: Sequence[torch.nn.Parameter], no_decay: Sequence[torch.nn.Parameter], optim: Any,
                        max_steps: int) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: AdamW (weight decay on ``decay`` only) and a per-step
    schedule from an :class:`~varedit_lab.config.OptimConfig`."""
    optimizer = torch.optim.AdamW(
        [{"params": list(decay), "weight_decay": optim.weight_decay}, {"params": list(no_decay), "weight_decay": 0.0}],
        lr=optim.lr,
        betas=tuple(optim.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, optim.warmup_steps, max_steps, optim.schedule, optim.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
