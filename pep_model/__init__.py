"""PEP: Perceive, Excavate and Purify — network, losses, post-processing (pure PyTorch)."""

from pep_model.build import (
    CheckpointError,
    build_model,
    checkpoint_config,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pep_model.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from pep_model.pep import PEP

__all__ = [
    "PEP",
    "CheckpointError",
    "build_model",
    "checkpoint_config",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]
