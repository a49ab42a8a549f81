"""The jobs' shared command-line pieces: flags, defaults, the project's own config folder.

Imports nothing heavy (no torch, Ray or MLflow), so that every job's `--help` answers at
once; the jobs import the pipeline inside `main`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"

DEFAULT_EXPERIMENT = "pep"  # the MLflow experiment jobs/train_pep.py logs to
DEFAULT_METRIC = "segm/AP"  # the run metric the registry compares
DEFAULT_MODEL_NAME = "pep"  # the registered model jobs/promote_pep.py versions
# Eq. 8: L_P + alpha L_E + beta L_PE + gamma L_graph + delta L_mask; the loss term each weight
# multiplies (PEP's loss dict holds every term already multiplied by its weight).
LOSS_WEIGHTS = {
    "alpha": "loss_excavate",
    "beta": "loss_mined_cls",
    "gamma": "loss_graph",
    "delta": "loss_mask",
}
DEFAULT_WEIGHT_RANGE = (0.25, 4.0)  # the sweep's log-uniform range of each weight

# Libraries whose INFO logs (Ray Train's TrainingReport dumps and checkpoint notices, Ray
# Data's plans and logged progress, MLflow's store set-up and downloads, matplotlib's font
# cache) drown a job's own lines.
CHATTY_LOGGERS = ("ray.train", "ray.tune", "ray.data", "mlflow", "matplotlib")
QUIET_LEVEL = "WARNING"
# With its bars off, Ray Data warns once per process "Progress bars disabled. To enable, set
# ...": in the driver and in every worker that executes a dataset (the training split's
# SplitCoordinator, a sweep trial's or an ablation run's own datasets).
PROGRESS_BAR_LOGGER = "ray.data._internal.progress"
PROGRESS_BAR_NOTICE = "Progress bars disabled."


def project_config(name: str) -> Path:
    """configs/<name> of this project, wherever the job is started from."""
    return CONFIG_DIR / name


def quiet_library_logs() -> None:
    """Keep only the warnings and errors of `CHATTY_LOGGERS` in this process, and no MLflow
    artifact or Ray Data progress bars (what a job shows without --verbose). In a sweep's
    trial or an ablation's run task, the datasets it executes itself draw their bars to
    stderr, which Ray forwards to the job's console."""
    import ray.data  # here, not at import: --help stays light

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(QUIET_LEVEL)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    ray.data.DataContext.get_current().enable_progress_bars = False
    hide_progress_bar_notice()


class _DropNotice(logging.Filter):
    """Drops a logger's records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def hide_notice(logger_name: str, *prefixes: str) -> None:
    """Drop a library's notice (records of `logger_name` starting with `prefixes`) in this
    process; once per logger and prefixes however often it is called."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropNotice) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropNotice(prefixes))


def hide_progress_bar_notice() -> None:
    """Drop Ray Data's notice that its progress bars are off (which the quiet jobs did on
    purpose) in this process. A quiet local Ray runs this in every worker process too (its
    `worker_process_setup_hook`, `pipeline.cluster.init_ray`)."""
    hide_notice(PROGRESS_BAR_LOGGER, PROGRESS_BAR_NOTICE)


def add_verbose_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """--verbose: keep the libraries' own logs; `what` says which ones the job hides."""
    parser.add_argument("--verbose", action="store_true", help=f"keep {what}")


def add_config_flags(
    parser: argparse.ArgumentParser,
    default: str | Path | None,
    *,
    config_help: str = "YAML config file (default: %(default)s)",
    set_help: str = "override a config value, e.g. --set train.lr=0.02 (repeatable)",
) -> None:
    """--config (YAML) and repeatable --set KEY=VALUE overrides."""
    parser.add_argument(
        "--config", default=None if default is None else str(default), help=config_help
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=set_help,
    )


def add_data_flag(parser: argparse.ArgumentParser) -> None:
    """--data: a shards root or a COCO folder; default: the generated crowded scenes."""
    parser.add_argument(
        "--data",
        default=None,
        help="shards root (train/ and val/ shard folders) or a COCO folder with "
        "train/annotations.json + train/images and val/...; default: generated crowded scenes",
    )


def add_run_flags(
    parser: argparse.ArgumentParser,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    storage_help: str = "where runs and checkpoints go: a local dir (default ./work/runs) or "
    "a shared / cloud URI for multi-node clusters",
) -> None:
    """--use-gpu, --storage-path, --tracking-uri, --experiment and --work-dir."""
    parser.add_argument("--use-gpu", choices=["auto", "true", "false"], default=None)
    parser.add_argument("--storage-path", default=None, help=storage_help)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument(
        "--experiment", default=experiment, help="MLflow experiment name (default: %(default)s)"
    )
    parser.add_argument("--work-dir", default="work", help="local folder for data/shards/stores")
