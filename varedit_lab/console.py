"""What a run says on the console, and the run's ``console.log`` that keeps everything.

The console gets what a user needs: progress lines (step / total, ETA, the metric that matters),
validation results and a final line with the result. ``console.log`` in the run folder gets those
lines too, with the libraries' informational messages (Lightning's accelerator banner and tips, the
topology, why fitting stopped) that the console no longer shows. Known library noise (deprecations
inside Lightning, a W&B setting Lightning passes) is filtered by its exact message.

This module imports no torch: the sweep runner uses :data:`PROGRESS_MARK` to echo its runs' lines.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

CONSOLE_LOG = "console.log"
# Every progress/result line of a run starts with this mark (the sweep runner echoes such lines).
PROGRESS_MARK = "» "
# Loggers whose INFO messages go to console.log only (warnings and errors still reach the console).
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")

# Warnings raised inside the libraries, with nothing for the user to do about them: (message, module).
NOISE_WARNINGS = (
    # lightning/pytorch/utilities/_pytree.py on torch >= 2.10 (a Lightning-internal call), every run
    (r".*isinstance\(treespec, LeafSpec\).*", ""),
    (r".*LeafSpec.*is deprecated.*", ""),
    # our CSV logger writes into the run folder on purpose (it continues metrics.csv across resumes)
    (r".*Experiment logs directory .* exists and is not empty.*", ""),
    # resumes: checkpoints/ holds the run's own last.ckpt, overwritten in place on purpose
    (r".*Checkpoint directory .* exists and is not empty.*", ""),
    # model.compile_blocks: torch.compile imports torch.utils.mkldnn (via torch._inductor), whose 14
    # @torch.jit.script_method decorators each warn once
    (r"`torch.jit.script_method` is deprecated", r"torch\.jit\._script"),
)


def quiet_library_warnings() -> None:
    """Ignore the warnings of :data:`NOISE_WARNINGS` (by message and module, nothing broader)."""
    for message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


DECIBEL_METRICS = ("psnr", "success", "preservation", "balance")


def format_metric(name: str, value: float) -> str:
    """``val/psnr 24.41 dB``, ``train/loss 0.4132`` (PSNR-based metrics in dB)."""
    if any(word in name for word in DECIBEL_METRICS):
        return f"{name} {value:.2f} dB"
    return f"{name} {value:.4g}"


class RunConsole:
    """Writes a run's lines to the console (``stream``, stderr by default) and to ``console.log``."""

    def __init__(self, log_path: str | Path | None, stream: TextIO | None = None) -> None:
        self.log_path = Path(log_path) if log_path is not None else None
        self.stream = stream

    def say(self, text: str, echo: bool = True) -> None:
        """One progress/result line; ``echo=False`` writes it to ``console.log`` only."""
        line = PROGRESS_MARK + text
        if echo:
            print(line, file=self.stream or sys.stderr, flush=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


@contextmanager
def library_logs_to(log_path: str | Path | None) -> Iterator[None]:
    """While the block runs, the INFO messages of :data:`LIBRARY_LOGGERS` go to ``log_path`` only.

    Their console handlers are raised to WARNING (restored afterwards); a file handler at INFO
    appends to ``log_path``. With ``log_path=None`` (ranks > 0) the messages are only kept off the console.
    """
    file_handler = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_path, mode="a")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    saved: list[tuple[logging.Handler, int]] = []
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                saved.append((handler, handler.level))
                handler.setLevel(max(handler.level, logging.WARNING))
        if file_handler is not None:
            logger.addHandler(file_handler)
    try:
        yield
    finally:
        for logger in loggers:
            if file_handler is not None:
                logger.removeHandler(file_handler)
        if file_handler is not None:
            file_handler.close()
        for handler, level in saved:
            handler.setLevel(level)


__all__ = ["CONSOLE_LOG", "LIBRARY_LOGGERS", "NOISE_WARNINGS", "PROGRESS_MARK", "RunConsole", "format_duration",
           "format_metric", "library_logs_to", "quiet_library_warnings"]
