"""Load a run config: YAML (with ``base:`` includes) + ``key=value`` overrides onto the schema.

Order of precedence, lowest first: schema defaults, the ``base:`` files (in order, recursively),
the file itself, then command-line overrides. A ``<section>=<preset>`` override (for example
``trainer=ddp_sim``) merges ``experiments/<section>/<preset>.yaml`` before the other overrides.
Every failure raises :class:`ConfigError` naming the key, the file and the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from varedit_lab.config.schema import RunConfig
from varedit_lab.model.presets import PRESETS

class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and how to fix it."""


def experiments_dir() -> Path:
    """The repository's ``experiments/`` folder (editable install) or ``./experiments``."""
    repo = Path(__file__).resolve().parents[2] / "experiments"
    return repo if repo.is_dir() else Path.cwd() / "experiments"


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys.extend(_schema_keys(value, key + "."))
    return keys


_ALL_KEYS = _schema_keys(RunConfig())


def _closest(key: str) -> str:
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    same_section = [k for k in _ALL_KEYS if k.startswith(section) and k.count(".") == key.count(".")]
    match = difflib.get_close_matches(key, same_section or _ALL_KEYS, n=1, cutoff=0.0)
    return f" Did you mean '{match[0]}'?" if match else ""


def _key_of(err: OmegaConfBaseException) -> str:
    full_key = getattr(err, "full_key", None)
    return str(full_key) if full_key else "?"


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = _key_of(err)
        raise ConfigError(f"{source}: unknown key '{key}'.{_closest(key)}") from None
    except ValidationError as err:
        key = _key_of(err)
        message = err.msg.splitlines()[0]
        if message.startswith("Invalid value"):  # a Literal field: the message lists the valid choices
            raise ConfigError(f"{source}: '{key}': {message}") from None
        raise ConfigError(f"{source}: wrong type for '{key}': {message}{_expected_type(key)}") from None


def _expected_type(key: str) -> str:
    node: Any = RunConfig()
    ftype = None
    for part in key.split("."):
        match = [f for f in fields(node) if f.name == part] if is_dataclass(node) else []
        if not match:
            return ""
        ftype = match[0].type
        node = getattr(node, part)
    return f" (expected {ftype})" if ftype else ""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one YAML file with its ``base:`` chain resolved (bases merged first, in order)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' include ({' -> '.join(str(p) for p in seen)})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", None)
    merged = OmegaConf.create({})
    if bases is not None:
        base_list = [bases] if isinstance(bases, str) else list(bases)
        for base in base_list:
            merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), seen + (path,)))
    return OmegaConf.merge(merged, raw)  # type: ignore[return-value]


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``section=preset`` group selections from plain dotlist overrides."""
    sections = {f.name for f in fields(RunConfig) if is_dataclass(getattr(RunConfig(), f.name))}
    presets, dotlist = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.lstrip("-")  # accept --key=value as W&B's ${args} writes it
        if key in sections:
            presets.append(f"{key}={value}")
        else:
            dotlist.append(f"{key}={value}")
    return presets, dotlist


def _preset_file(section: str, name: str) -> Path:
    path = experiments_dir() / section / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (experiments_dir() / section).glob("*.yaml"))
        raise ConfigError(f"override '{section}={name}': no preset {path}. Available: {available}")
    return path


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Resolve the run config of ``path`` (optional) plus overrides; validate it; return it."""
    cfg: DictConfig = OmegaConf.structured(RunConfig)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), str(path))
    return _apply_overrides(cfg, overrides, str(path) if path else "<overrides>")


def config_from_dict(data: dict[str, Any], overrides: Iterable[str] = (), source: str = "<dict>") -> DictConfig:
    """A run config from a plain dict (e.g. the one saved in a checkpoint) plus overrides."""
    cfg = _merge(OmegaConf.structured(RunConfig), OmegaConf.create(data), source)
    return _apply_overrides(cfg, overrides, source)


def _apply_overrides(cfg: DictConfig, overrides: Iterable[str], source: str) -> DictConfig:
    presets, dotlist = _split_overrides(list(overrides))
    for item in presets:
        section, name = item.split("=", 1)
        preset = _preset_file(section, name)
        cfg = _merge(cfg, _read_yaml(preset), str(preset))
    for item in dotlist:
        try:
            override = OmegaConf.from_dotlist([item])
        except Exception as err:
            raise ConfigError(f"override '{item}': {err}") from None
        cfg = _merge(cfg, override, f"override '{item}'")
    validate(cfg, source=source)
    return cfg


def validate(cfg: DictConfig, source: str = "config") -> None:
    """What the schema's types cannot say: value ranges, the model preset, the conditioning strategy
    name and options (closed choices are ``Literal`` fields, checked by OmegaConf on every merge)."""
    _check_ranges(cfg, RunConfig(), "", source)
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"{source}: 'model.preset' is {cfg.model.preset!r}; valid presets: {sorted(PRESETS)}")
    from conditioning.registry import validate_options  # light: no torch import for built-ins

    try:
        validate_options(cfg.conditioning.name, OmegaConf.to_container(cfg.conditioning.options))
    except (KeyError, TypeError, ValueError) as err:
        msg = err.args[0] if err.args else str(err)
        raise ConfigError(f"{source}: conditioning: {msg}") from None
    _check_trainer_options(cfg, source)


def _check_trainer_options(cfg: DictConfig, source: str) -> None:
    """``trainer.extra`` against lightning.Trainer's signature, ``trainer.callbacks`` by import, and
    ``logger.log_model``. Lightning is imported only when there is something to check (keeps
    ``config show`` instant)."""
    extra = OmegaConf.to_container(cfg.trainer.extra, resolve=True)
    callbacks = OmegaConf.to_container(cfg.trainer.callbacks, resolve=True)
    if str(cfg.logger.log_model).lower() not in ("false", "true", "all"):
        raise ConfigError(f"{source}: 'logger.log_model' is {cfg.logger.log_model!r}; valid: ['all', 'false', 'true']")
    if not extra and not callbacks:
        return
    from varedit_lab.trainer_options import TrainerOptionError, check_callbacks, check_extra

    try:
        check_extra(extra)  # type: ignore[arg-type]
        check_callbacks(callbacks)  # type: ignore[arg-type]
    except TrainerOptionError as err:
        raise ConfigError(f"{source}: {err}") from None


def _check_ranges(cfg: Any, schema: Any, prefix: str, source: str) -> None:
    """Every field declared with :func:`~varedit_lab.config.schema.at_least` holds a value in range."""
    for f in fields(schema):
        value = getattr(cfg, f.name)
        if is_dataclass(getattr(schema, f.name)):
            _check_ranges(value, getattr(schema, f.name), f"{prefix}{f.name}.", source)
            continue
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if value is None or (low is None and high is None):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{source}: '{prefix}{f.name}' is {value}; it must be {bounds}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain-container form for loggers (W&B shows raw DictConfigs badly)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig, exclude: Sequence[str] = ("resume", "output_dir", "logger", "trainer.progress_bar")) -> str:
    """A short stable hash of the settings that define a run (not where or how it is logged)."""
    data = to_dict(cfg)
    for key in exclude:
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


__all__ = [
    "ConfigError",
    "config_from_dict",
    "config_hash",
    "experiments_dir",
    "load_config",
    "save_config",
    "to_dict",
    "to_yaml",
    "validate",
]
