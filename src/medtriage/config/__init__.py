"""Configuration: the typed schema (one dataclass per group), the project root, and the composed Hydra config."""

from medtriage.config.compose import compose_train_config, register_configs, to_plain_dict
from medtriage.config.schema import (
    AugmentConfig,
    AugmentOn,
    DataConfig,
    Device,
    ExportConfig,
    Imbalance,
    Loader,
    LrScaling,
    ModelConfig,
    PathsConfig,
    Precision,
    PreprocessSpec,
    SyntheticTilesConfig,
    TrackingConfig,
    TrainConfig,
    TrainerConfig,
    check_values,
)
from medtriage.project import CONFIG_DIR_NAME, find_project_root, git_commit

__all__ = [
    "CONFIG_DIR_NAME",
    "AugmentConfig",
    "AugmentOn",
    "DataConfig",
    "Device",
    "ExportConfig",
    "Imbalance",
    "Loader",
    "LrScaling",
    "ModelConfig",
    "PathsConfig",
    "Precision",
    "PreprocessSpec",
    "SyntheticTilesConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainerConfig",
    "check_values",
    "compose_train_config",
    "find_project_root",
    "git_commit",
    "register_configs",
    "to_plain_dict",
]
