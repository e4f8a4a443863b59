"""GPU slots for the local runner: each run gets its own ``CUDA_VISIBLE_DEVICES``.

With ``--parallel K`` on a GPU machine, K runs share the visible GPUs without overlap: a run that
asks for ``trainer.devices=N`` gets N GPUs of its own (``-1``: all of them), and waits while fewer
are free. Runs on ``trainer.accelerator=cpu``, and every run on a machine without GPUs, get no
slot and an unchanged environment.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Sequence

import torch
from omegaconf import DictConfig

CPU_ACCELERATORS = ("cpu",)


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: ``CUDA_VISIBLE_DEVICES`` if set, else ``0..count-1``."""
    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(count)]


def gpus_needed(cfg: DictConfig, available: int) -> int:
    """How many GPUs a run takes: 0 on CPU (or with no GPUs), all for ``devices=-1``, else ``devices``."""
    if available == 0 or str(cfg.trainer.accelerator).lower() in CPU_ACCELERATORS:
        return 0
    devices = int(cfg.trainer.devices)
    return available if devices == -1 else devices


class GpuPool:
    """Free GPU ids; ``take`` hands out the lowest free ones, ``release`` returns them."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        self.free = list(ids)

    def take(self, count: int) -> list[str] | None:
        """``count`` GPUs (``[]`` for 0), or None while fewer are free."""
        if count > len(self.free):
            return None
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    def release(self, ids: Sequence[str] | None) -> None:
        self.free = sorted({*self.free, *(ids or [])}, key=self.ids.index)


def plan_slots(needs: Sequence[int], ids: Sequence[str], parallel: int) -> list[list[str] | None]:
    """The GPUs each run would get if runs finish in the order they started (what --dry-run shows).

    ``None`` for a run that needs no GPU.
    """
    pool, running, plan = GpuPool(ids), deque[list[str]](), []
    for need in needs:
        slot = pool.take(need)
        while slot is None or len(running) >= parallel:
            if not running:  # more than the machine has; the runner rejects it
                break
            pool.release(running.popleft())
            slot = pool.take(need) if slot is None else slot
        plan.append(slot if need else None)
        running.append(slot or [])
    return plan
