"""Build and run a Lightning training job (editor or tokenizer) from a resolved run config.

The run directory ``{output_dir}/{name}`` holds ``config.yaml`` (the resolved config), ``metrics.csv``
(CSVLogger), the W&B run (offline by default), ``checkpoints/`` (``last.ckpt`` every
``trainer.checkpoint_every_n_steps`` plus the best by ``trainer.checkpoint_monitor``), validation
edit grids and ``summary.json``. ``resume=auto`` continues from the newest of ``checkpoints/last.ckpt``
and Lightning's SLURM requeue checkpoint ``hpc_ckpt_N.ckpt``. Extra Trainer arguments and callbacks
come from ``trainer.extra`` / ``trainer.callbacks`` (:mod:`varedit_lab.trainer_options`).
"""

from __future__ import annotations

import csv
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from omegaconf import DictConfig

from varedit_lab.callbacks import PENDING_ROW_KEY, ConsoleProgress, RunCheckpoint, RunSummary, StepTimer, ValidateAtEnd
from varedit_lab.checkpoint_io import CheckpointError, check_checkpoint, is_checkpoint
from varedit_lab.config import ConfigError, config_hash, save_config, to_dict
from varedit_lab.config.identity import model_changes
from varedit_lab.config.inputs import missing_tokenizer
from varedit_lab.data.shards import expand_shards
from varedit_lab.console import RunConsole, library_logs_to, quiet_library_warnings
from varedit_lab.distributed import TopologyCheck, fsdp2_strategy, fsdp_strategy
from varedit_lab.model.compat import check_finite
from varedit_lab.runs import RunFolder
from varedit_lab.trainer_options import build_callbacks as build_extra_callbacks
from varedit_lab.trainer_options import log_model_setting

# Expected in every run: the frozen tokenizer/text encoder are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
quiet_library_warnings()

# What the console's progress lines show per task: the training metric, then the validation metrics.
PROGRESS_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tokenizer": ("train/psnr", ("val/psnr", "val/psnr_textured", "val/roundtrip_bit_acc")),
    "editor": ("train/loss", ("val/balance", "val/success", "val/preservation", "val/copy_balance", "val/bit_acc")),
}


def run_name(cfg: DictConfig, config_path: str | Path | None = None) -> str:
    """``cfg.name``, or ``{experiment}-{strategy}-s{seed}-{hash}`` (stable across reruns and ranks)."""
    if cfg.name:
        return str(cfg.name)
    stem = Path(config_path).stem if config_path else cfg.task
    label = cfg.conditioning.name.rsplit(":", 1)[-1].lower() if cfg.task == "editor" else "tokenizer"
    return f"{stem}-{label}-s{cfg.seed}-{config_hash(cfg)}" if stem != label else f"{stem}-s{cfg.seed}-{config_hash(cfg)}"


def run_dir(cfg: DictConfig, config_path: str | Path | None = None) -> Path:
    return Path(cfg.output_dir) / run_name(cfg, config_path)


def build_task(cfg: DictConfig) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    if cfg.task == "tokenizer":
        from varedit_lab.tokenizer.module import build_tokenizer_task

        return build_tokenizer_task(cfg)
    from varedit_lab.data.datamodule import EditDataModule
    from varedit_lab.module import EditorModule

    return EditorModule(cfg), EditDataModule(cfg.data, seed=cfg.seed)


def wandb_mode(cfg: DictConfig) -> str:
    """The W&B mode a run logs in: ``logger.mode``, raised or silenced by the environment.

    Precedence, first match wins:

    1. ``disabled`` anywhere (``logger.mode=disabled`` or ``WANDB_MODE=disabled``): no W&B run at all.
    2. The environment asks for more: ``WANDB_MODE=online``, or ``WANDB_SWEEP_ID`` set (the run was
       started by ``wandb agent`` and must report to its sweep): ``online``.
    3. ``WANDB_MODE=offline`` (or ``dryrun``): ``offline`` (CI, nodes without internet).
    4. Otherwise ``logger.mode`` (``offline`` by default).
    """
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if "disabled" in (cfg.logger.mode, env):
        return "disabled"
    if env == "online" or os.environ.get("WANDB_SWEEP_ID"):
        return "online"
    if env in ("offline", "dryrun"):
        return "offline"
    return str(cfg.logger.mode)


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted.

    Rows after ``keep_until_step`` (logged by an interrupted attempt after its last checkpoint; the
    resumed run logs those steps again) are dropped, lazily: the file is rewritten only when the first
    new rows are saved, so a run that fails before logging anything leaves it untouched.
    """

    def __init__(self, log_dir: str, keep_until_step: int | None, pending_row: dict[str, Any] | None = None) -> None:
        self.keep_until_step = keep_until_step
        self.pending_row = pending_row  # the checkpoint's own step row, in case the kill came before its write
        self._continued = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here
        if self.keep_until_step is None or not self._fs.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            reader = csv.DictReader(handle)
            self.metrics_keys = sorted(reader.fieldnames or [])
        self._continued = True

    def save(self) -> None:
        if self._continued and self.metrics:
            self._continued = False
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if _step_of(row) <= self.keep_until_step]
            kept += self._missing_pending_row(kept)
            with self._fs.open(self.metrics_file_path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        super().save()

    def _missing_pending_row(self, kept: list[dict[str, str]]) -> list[dict[str, Any]]:
        row = self.pending_row
        if not row or any(_step_of(r) == row["step"] and any(r.get(k) for k in row if k.startswith("train/")) for r in kept):
            return []
        self.metrics_keys = sorted(set(self.metrics_keys) | set(row))
        return [row]


def _step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``metrics.csv`` straight into the run folder; a resumed run keeps the
    history before its checkpoint and appends to it (see :class:`_HistoryWriter`)."""

    def __init__(self, save_dir: str | Path, keep_until_step: int | None = None, pending_row: dict[str, Any] | None = None) -> None:
        # Every logging call reaches the disk (an appended row): a killed run loses nothing it logged.
        super().__init__(save_dir=str(save_dir), name="", version="", flush_logs_every_n_steps=1)
        self.keep_until_step = keep_until_step
        self.pending_row = pending_row

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self.keep_until_step, self.pending_row)
        return self._experiment


def build_loggers(cfg: DictConfig, folder: RunFolder | Path, name: str, resume: ResumePoint | None = None) -> list[Logger]:
    folder = RunFolder(folder) if not isinstance(folder, RunFolder) else folder
    # CSV step s is logged while global step s + 1 runs: rows from the checkpoint's step on are redone.
    loggers: list[Logger] = [HistoryCSVLogger(folder.path, keep_until_step=resume.step - 1 if resume else None,
                                                   pending_row=resume.pending_row if resume else None)]
    mode = wandb_mode(cfg)
    log_model = log_model_setting(cfg.logger.log_model)
    if log_model and mode == "offline":  # WandbLogger refuses the pair: artifacts need a server
        rank_zero_warn(f"logger.log_model={cfg.logger.log_model} needs W&B online; offline, checkpoints stay in {folder.checkpoints}")
        log_model = False
    if mode != "disabled":
        loggers.append(
            QuietWandbLogger(
                project=cfg.logger.project,
                name=cfg.logger.name or name,
                group=cfg.logger.group,
                tags=list(cfg.logger.tags),
                save_dir=str(folder.path),
                offline=mode == "offline",
                log_model=log_model,
                config=to_dict(cfg),
            )
        )
    return loggers


class QuietWandbLogger(WandbLogger):
    """Lightning's W&B logger, without W&B's console output: silent offline (the run is in the
    folder; ``wandb sync`` uploads it), quiet online (the run's URL, no run-history footer)."""

    def __init__(self, *, offline: bool, **kwargs: Any) -> None:
        import wandb  # imported by WandbLogger anyway; only runs that log to W&B pay for it

        settings = wandb.Settings(silent=True) if offline else wandb.Settings(quiet=True)
        super().__init__(offline=offline, settings=settings, **kwargs)
        # Lightning always passes anonymous=None, which W&B >= 0.19 answers with a deprecation
        # warning in every run; leaving the argument out is what "not anonymous" means there.
        self._wandb_init.pop("anonymous", None)


def build_callbacks(
    cfg: DictConfig, folder: RunFolder | Path, extra_summary: dict[str, Any], resume: ResumePoint | None = None,
    console_log: Path | None = None,
) -> tuple[list[pl.Callback], StepTimer, RunSummary]:
    """The callbacks of every run; progress lines go to the console and to ``console_log`` (if given)."""
    folder = RunFolder(folder) if not isinstance(folder, RunFolder) else folder
    timer = StepTimer()
    summary = RunSummary(folder, timer, extra_summary, resumed=resume is not None)
    callbacks: list[pl.Callback] = [
        TopologyCheck(cfg.trainer.devices),
        timer,
        summary,
        ValidateAtEnd(),
        RunCheckpoint(folder.checkpoints, cfg.trainer.checkpoint_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.trainer.checkpoint_monitor:
        callbacks.append(
            ModelCheckpoint(dirpath=folder.checkpoints, filename="best", monitor=cfg.trainer.checkpoint_monitor,
                            mode=cfg.trainer.checkpoint_mode, save_top_k=1, save_last=False, enable_version_counter=False)
        )
    if cfg.optim.ema_decay:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    if cfg.task == "editor" and cfg.probes.every_n_val > 0:
        from varedit_lab.probes.callback import ProbeCallback  # writes {run}/probes/stepNNNNNN, logs to W&B

        callbacks.append(ProbeCallback.from_config(cfg.probes))
    callbacks += build_extra_callbacks(cfg.trainer.callbacks)
    train_metric, val_metrics = PROGRESS_METRICS.get(cfg.task, PROGRESS_METRICS["editor"])
    console = RunConsole(console_log)
    callbacks.append(ConsoleProgress(console, folder.name, train_metric, val_metrics, echo_steps=not progress_bar_on(cfg)))
    if progress_bar_on(cfg):
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    return callbacks, timer, summary


def progress_bar_on(cfg: DictConfig) -> bool:
    """The TQDM bar only on a terminal: redirected, its carriage-return frames fill the log file
    (the console progress lines say the same, one line each)."""
    return bool(cfg.trainer.progress_bar) and sys.stdout.isatty()


def build_strategy(cfg: DictConfig) -> str | Strategy:
    """``trainer.strategy`` as Lightning takes it: its own names, or a configured strategy object
    for the sharded ones (see :mod:`varedit_lab.distributed`)."""
    name = cfg.trainer.strategy
    if name == "fsdp":
        return fsdp_strategy(cfg)
    if name == "fsdp2":
        return fsdp2_strategy(cfg)
    return name


def build_trainer(cfg: DictConfig, directory: Path, callbacks: list[pl.Callback], loggers: list[Logger]) -> pl.Trainer:
    t = cfg.trainer
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        deterministic=t.deterministic,
        enable_progress_bar=progress_bar_on(cfg),
        enable_model_summary=False,
        default_root_dir=str(directory),
        logger=loggers,
        callbacks=callbacks,
        **to_dict(cfg)["trainer"]["extra"],  # checked at config load (varedit_lab.trainer_options)
    )


@dataclass(frozen=True)
class ResumePoint:
    """A validated checkpoint to continue from."""

    path: str
    step: int  # its global step: metrics.csv rows after it belong to the interrupted attempt
    pending_row: dict[str, Any] | None = None  # the CSV row of its last step (callbacks.RunCheckpoint)


def resolve_resume(cfg: DictConfig, folder: RunFolder) -> ResumePoint | None:
    """The checkpoint ``resume`` asks for, checked before anything touches the run folder.

    ``resume=auto`` continues from the newest of the folder's ``last.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_N.ckpt`` (written on SIGUSR1 before a requeue) when there is one (else starts afresh);
    a path continues from that checkpoint. The file must load with ``weights_only=True``
    (sharded directories: :func:`~varedit_lab.checkpoint_io.check_sharded_checkpoint`), hold finite
    weights, and have been trained under a config that defines the same model as ``cfg``.
    """
    if not cfg.resume:
        return None
    path = newest_checkpoint(folder) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None or not is_checkpoint(path):
        if cfg.resume == "auto":
            return None
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint (file, or complete sharded directory)")
    checkpoint = check_checkpoint(path, "checkpoint to resume from")
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"resume={path}: not a Lightning checkpoint (a {type(checkpoint).__name__})")
    saved = checkpoint.get("varedit_config")
    if saved is not None:
        changes = model_changes(saved, to_dict(cfg))
        if changes:
            raise ConfigError(
                f"resume={path}: the checkpoint was trained as a different model; these settings differ from it:\n  "
                + "\n  ".join(changes)
                + "\nResume with the checkpoint's settings, or start a new run (another name= or output_dir=)."
            )
    check_finite(checkpoint.get("state_dict") or {}, f"resume={path}")
    pending = checkpoint.get(PENDING_ROW_KEY)
    return ResumePoint(str(path), int(checkpoint.get("global_step", 0)), pending if isinstance(pending, dict) else None)


def check_tokenizer_exists(cfg: DictConfig) -> None:
    """The tokenizer checkpoint the config names exists (checked before the run folder is made)."""
    problem = missing_tokenizer(cfg)
    if problem:
        raise FileNotFoundError(problem)


def check_shards(cfg: DictConfig) -> None:
    """The shards the config names exist (checked before the run folder is made)."""
    for key in ("train_shards", "val_shards"):
        try:
            expand_shards(cfg.data[key])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data.{key}: {err}\nMake shards with `varedit-lab data synth --out DIR` (the synthetic "
                                    "benchmark; README's configs read data/synthetic64) or `varedit-lab data convert`.") from None


def newest_checkpoint(folder: RunFolder) -> Path | None:
    """The most recently written of ``checkpoints/last.ckpt`` and ``hpc_ckpt_*.ckpt`` (run folder)."""
    candidates = [p for p in [folder.last_checkpoint, *folder.path.glob("hpc_ckpt_*.ckpt")] if is_checkpoint(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


@rank_zero_only
def _prepare_folder(cfg: DictConfig, folder: RunFolder, resume: ResumePoint | None) -> None:
    """Starting afresh in a used folder moves the earlier attempt aside (one current run per folder);
    resuming keeps everything. Then the resolved config is saved."""
    if resume is None:
        archived = folder.archive_previous_attempt()
        if archived is not None:
            rank_zero_info(f"{folder.path} held an earlier attempt (not resumed): moved to {archived}")
    folder.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder.config)


def train(cfg: DictConfig, config_path: str | Path | None = None) -> Path:
    """Train as configured; returns the run directory.

    Everything that can be checked is checked before the run folder is touched (a failed resume
    leaves it byte-identical). Failures once training has started are recorded in ``summary.json``.
    """
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    name = run_name(cfg, config_path)
    folder = RunFolder(Path(cfg.output_dir) / name)
    # Untrusted files first (the resume checkpoint here, tokenizer / init_from weights while building):
    # a malicious file is refused whatever else is missing. Nothing touches the run folder before.
    resume = resolve_resume(cfg, folder)
    check_tokenizer_exists(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = build_task(cfg)
    check_shards(cfg)
    _prepare_folder(cfg, folder, resume)
    # A resume of a finished run trains nothing and changes nothing in the folder, console.log included.
    finished = resume is not None and 0 < cfg.trainer.max_steps <= resume.step
    console_log = folder.console_log if rank_zero_only.rank == 0 and not finished else None
    with library_logs_to(console_log):
        return _fit(cfg, folder, name, module, datamodule, resume, console_log)


def _fit(cfg: DictConfig, folder: RunFolder, name: str, module: pl.LightningModule, datamodule: pl.LightningDataModule,
         resume: ResumePoint | None, console_log: Path | None) -> Path:
    extra = {"run_name": name, "task": cfg.task, "config": to_dict(cfg)}
    if hasattr(module, "strategy"):
        layout = module.strategy.layout(module.schedule, module.rope_layout)
        extra.update(strategy=module.strategy.describe(), metrics={"perf/seq_len": float(layout.length)})
    callbacks, timer, summary = build_callbacks(cfg, folder, extra, resume, console_log)
    trainer = build_trainer(cfg, folder.path, callbacks, build_loggers(cfg, folder, name, resume))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
    except BaseException as err:
        if trainer.is_global_zero and (resume is None or summary.trained):
            summary.write(trainer, "failed", error=f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise
    finally:
        finish_wandb(trainer)
    return folder.path


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close this run's W&B run so that the next ``train`` in the process starts a new one."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers) and trainer.is_global_zero:
        import wandb

        wandb.finish()
