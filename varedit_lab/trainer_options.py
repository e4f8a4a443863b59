"""Trainer options beyond the fixed fields: ``trainer.extra`` (more ``lightning.Trainer`` arguments)
and ``trainer.callbacks`` (callbacks by class path), both checked when the config is loaded.

``trainer.extra`` is checked against ``lightning.Trainer.__init__``'s signature, so a typo fails at
load naming the closest argument. Arguments that varedit-lab sets from its own fields (devices,
max_steps, loggers, ...) are refused there, naming the field to use instead.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl

# Trainer arguments that build_trainer sets, and the config key that controls each.
OWNED: dict[str, str] = {
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy",
    "precision": "trainer.precision",
    "max_steps": "trainer.max_steps",
    "max_epochs": "trainer.max_steps",
    "val_check_interval": "trainer.val_every_n_steps",
    "check_val_every_n_epoch": "trainer.val_every_n_steps",
    "log_every_n_steps": "trainer.log_every_n_steps",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "gradient_clip_val": "optim.grad_clip",
    "deterministic": "trainer.deterministic",
    "enable_progress_bar": "trainer.progress_bar",
    "default_root_dir": "output_dir",
    "logger": "logger.*",
    "callbacks": "trainer.callbacks",
}
LOG_MODEL = {"false": False, "true": True, "all": "all"}


class TrainerOptionError(ValueError):
    """An invalid ``trainer.extra`` / ``trainer.callbacks`` entry; the message names the key."""


def trainer_arguments() -> list[str]:
    """The keyword arguments ``lightning.Trainer`` accepts."""
    params = inspect.signature(pl.Trainer.__init__).parameters
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [name for name, p in params.items() if name != "self" and p.kind in named]


def check_extra(extra: Mapping[str, Any]) -> None:
    valid = trainer_arguments()
    for key in extra:
        if key in OWNED:
            raise TrainerOptionError(f"'trainer.extra.{key}': set it with '{OWNED[key]}' instead")
        if key not in valid:
            free = [k for k in valid if k not in OWNED]
            match = difflib.get_close_matches(key, free, n=1, cutoff=0.0)
            hint = f" Did you mean 'trainer.extra.{match[0]}'?" if match else ""
            raise TrainerOptionError(f"'trainer.extra.{key}' is not an argument of lightning.Trainer.{hint}")


def _callback_class(index: int, entry: Any) -> tuple[type[pl.Callback], dict[str, Any]]:
    where = f"trainer.callbacks[{index}]"
    if not isinstance(entry, Mapping) or "class_path" not in entry:
        raise TrainerOptionError(f"'{where}': must be a mapping with 'class_path' (and optional 'init_args'), got {entry!r}")
    unknown = set(entry) - {"class_path", "init_args"}
    if unknown:
        raise TrainerOptionError(f"'{where}': unknown keys {sorted(unknown)}; valid: ['class_path', 'init_args']")
    path, args = str(entry["class_path"]), dict(entry.get("init_args") or {})
    module_name, _, class_name = path.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise TrainerOptionError(f"'{where}.class_path': cannot import {path!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, pl.Callback)):
        raise TrainerOptionError(f"'{where}.class_path': {path!r} is not a lightning Callback")
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as err:
        raise TrainerOptionError(f"'{where}.init_args': {err} (for {path})") from None
    return cls, args


def check_callbacks(entries: Sequence[Any]) -> None:
    for index, entry in enumerate(entries):
        _callback_class(index, entry)


def build_callbacks(entries: Sequence[Any]) -> list[pl.Callback]:
    """The configured callbacks, instantiated."""
    built = []
    for index, entry in enumerate(entries):
        cls, args = _callback_class(index, entry)
        built.append(cls(**args))
    return built


def log_model_setting(value: str) -> bool | str:
    """``logger.log_model`` as WandbLogger takes it."""
    key = str(value).lower()
    if key not in LOG_MODEL:
        raise TrainerOptionError(f"'logger.log_model' is {value!r}; valid: {sorted(LOG_MODEL)}")
    return LOG_MODEL[key]
