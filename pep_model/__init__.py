"""PEP: Perceive, Excavate and Purify — network, losses, post-processing (pure PyTorch).

The names below load on first use (PEP 562), so that `from pep_model import load_config`
reads a config without importing torch (the jobs' `--help` and config errors answer at once).
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "pep_model.build": [
        "CheckpointError",
        "build_model",
        "checkpoint_config",
        "load_checkpoint",
        "read_checkpoint",
        "save_checkpoint",
    ],
    "pep_model.config": [
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
    ],
    "pep_model.pep": ["PEP"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pep_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
