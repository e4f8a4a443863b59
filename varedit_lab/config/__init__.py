"""Run configuration: structured schemas, YAML loading with ``base:`` includes, overrides."""

from varedit_lab.config.loader import (
    CHOICES,
    ConfigError,
    config_hash,
    experiments_dir,
    load_config,
    save_config,
    to_dict,
    to_yaml,
    validate,
)
from varedit_lab.config.schema import (
    ConditioningConfig,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    ProbesConfig,
    RunConfig,
    SamplingConfig,
    TextConfig,
    TokenizerConfig,
    TrainerConfig,
)

__all__ = [
    "CHOICES",
    "ConditioningConfig",
    "ConfigError",
    "DataConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "ProbesConfig",
    "RunConfig",
    "SamplingConfig",
    "TextConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "config_hash",
    "experiments_dir",
    "load_config",
    "save_config",
    "to_dict",
    "to_yaml",
    "validate",
]
