"""Build and run a Lightning training job (editor or tokenizer) from a resolved run config.

The run directory ``{output_dir}/{name}`` holds ``config.yaml`` (the resolved config), ``metrics.csv``
(CSVLogger), the W&B run (offline by default), ``checkpoints/`` (``last.ckpt`` every
``trainer.checkpoint_every_n_steps`` plus the best by ``trainer.checkpoint_monitor``), validation
edit grids and ``summary.json``. ``resume=auto`` continues from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from varedit_lab.callbacks import RunSummary, StepTimer, write_summary

# Expected in every run: the frozen tokenizer/text encoder are in eval mode on purpose, and resumed
# runs write into their existing directory.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty.*")
from varedit_lab.config import config_hash, save_config, to_dict
from varedit_lab.distributed import TopologyCheck, fsdp2_strategy, fsdp_strategy, is_checkpoint


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


_RESTRICTION = {"online": 0, "offline": 1, "dryrun": 1, "disabled": 2}


def wandb_mode(cfg: DictConfig) -> str:
    """The more restrictive of ``logger.mode`` and ``WANDB_MODE`` (CI forces offline; a user can
    silence W&B with ``WANDB_MODE=disabled``; a config that disables W&B stays disabled)."""
    env = os.environ.get("WANDB_MODE", "online").lower()
    mode = max((cfg.logger.mode, env), key=lambda m: _RESTRICTION.get(m, 0))
    return "offline" if mode == "dryrun" else mode


def build_loggers(cfg: DictConfig, directory: Path, name: str) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(directory), name="", version="")]
    mode = wandb_mode(cfg)
    if mode != "disabled":
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                name=cfg.logger.name or name,
                group=cfg.logger.group,
                tags=list(cfg.logger.tags),
                save_dir=str(directory),
                offline=mode == "offline",
                config=to_dict(cfg),
            )
        )
    return loggers


def build_callbacks(cfg: DictConfig, directory: Path, extra_summary: dict[str, Any]) -> tuple[list[pl.Callback], StepTimer]:
    timer = StepTimer()
    ckpt_dir = directory / "checkpoints"
    callbacks: list[pl.Callback] = [
        TopologyCheck(cfg.trainer.devices),
        timer,
        RunSummary(directory, timer, extra_summary),
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False, save_last=True,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_top_k=0),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.trainer.checkpoint_monitor:
        callbacks.append(
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.trainer.checkpoint_monitor,
                            mode=cfg.trainer.checkpoint_mode, save_top_k=1, save_last=False)
        )
    if cfg.optim.ema_decay:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=cfg.optim.ema_decay))
    if cfg.task == "editor" and cfg.probes.every_n_val > 0:
        from varedit_lab.probes.callback import ProbeCallback  # writes {run}/probes/stepNNNNNN, logs to W&B

        callbacks.append(ProbeCallback.from_config(cfg.probes))
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    return callbacks, timer


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
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(directory),
        logger=loggers,
        callbacks=callbacks,
    )


def resume_path(cfg: DictConfig, directory: Path) -> str | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = directory / "checkpoints" / "last.ckpt"  # a directory under fsdp/fsdp2
        return str(last) if is_checkpoint(last) else None
    if not is_checkpoint(cfg.resume):
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint (file, or complete sharded directory)")
    return str(cfg.resume)


@rank_zero_only
def _save_resolved(cfg: DictConfig, directory: Path) -> None:
    save_config(cfg, directory / "config.yaml")


def train(cfg: DictConfig, config_path: str | Path | None = None) -> Path:
    """Train as configured; returns the run directory. Failures are recorded in ``summary.json``."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    name = run_name(cfg, config_path)
    directory = Path(cfg.output_dir) / name
    directory.mkdir(parents=True, exist_ok=True)
    _save_resolved(cfg, directory)
    module, datamodule = build_task(cfg)
    extra = {"run_name": name, "task": cfg.task, "config": to_dict(cfg)}
    if hasattr(module, "strategy"):
        layout = module.strategy.layout(module.schedule, module.rope_layout)
        extra.update(strategy=module.strategy.describe(), metrics={"perf/seq_len": float(layout.length)})
    callbacks, timer = build_callbacks(cfg, directory, extra)
    trainer = build_trainer(cfg, directory, callbacks, build_loggers(cfg, directory, name))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, directory))
    except BaseException as err:
        if trainer.is_global_zero:
            write_summary(directory / "summary.json", "failed", trainer, timer, extra, error=f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise
    finally:
        finish_wandb(trainer)
    return directory


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close this run's W&B run so that the next ``train`` in the process starts a new one."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers) and trainer.is_global_zero:
        import wandb

        wandb.finish()
