"""Typed configs: dataclasses per component, YAML + dotted overrides, the rules a config alone
shows. The full pre-launch check (model-aware and placement rules too) is
:func:`megarlhf.planning.validate`."""

from megarlhf.config.base import ConfigError, from_dict, to_dict
from megarlhf.config.loader import dump_config, load_config
from megarlhf.config.schema import (
    AlgorithmConfig,
    AsyncConfig,
    BatchConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RewardConfig,
    RoleConfig,
    RolloutConfig,
    TrainConfig,
)
from megarlhf.config.validate import active_roles, trained_roles, validate_config

__all__ = [
    "AlgorithmConfig", "AsyncConfig", "BatchConfig", "CheckpointConfig", "ClusterConfig",
    "ConfigError", "DataConfig", "JobConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RewardConfig", "RoleConfig", "RolloutConfig", "TrainConfig",
    "active_roles", "dump_config", "from_dict", "load_config", "to_dict", "trained_roles",
    "validate_config",
]
