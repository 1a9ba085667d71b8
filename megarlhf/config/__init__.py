"""Typed configs: dataclasses per component, YAML + dotted overrides, validation before launch."""

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
from megarlhf.config.validate import active_roles, trained_roles, validate

__all__ = [
    "AlgorithmConfig", "AsyncConfig", "BatchConfig", "CheckpointConfig", "ClusterConfig",
    "ConfigError", "DataConfig", "JobConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RewardConfig", "RoleConfig", "RolloutConfig", "TrainConfig",
    "active_roles", "dump_config", "from_dict", "load_config", "to_dict", "trained_roles",
    "validate",
]
