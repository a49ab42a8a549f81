"""Joining or starting Ray for the jobs (one place, so every job gets the same fix)."""

from __future__ import annotations

import logging
import math
import os
import socket

import ray

# Libraries whose INFO logs (Ray Train's TrainingReport dumps and checkpoint notices, Ray
# Data's plans and logged progress, MLflow's store set-up) drown a local run's own lines.
CHATTY_LOGGERS = ("ray.train", "ray.tune", "ray.data", "mlflow")
QUIET_LEVEL = "WARNING"


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join RAY_ADDRESS (e.g. under `ray job submit`), else start a local instance.

    A local instance gets an explicit dashboard port, announced to its own processes as
    RAY_API_SERVER_ADDRESS: Ray Train's PlacementGroupCleaner, which frees a worker group's
    resources when a run ends or Tune (ASHA) stops a trial, looks the cluster up through the
    state API and fails when several Ray instances run on the machine ("Found multiple active
    Ray instances"); the run's CPUs then stay reserved and the next run waits forever.
    `num_cpus` sizes the local instance's logical CPUs (ignored when joining a cluster).
    `quiet` (local instances only): Ray Train/Tune/Data and MLflow keep only their warnings
    and errors, in the driver and (Ray Data) in the workers; Ray Train's own workers and
    controller follow `RunConfig.logging_config` (`pipeline.train.run_training(quiet=)`).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    if quiet:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(QUIET_LEVEL)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        runtime_env["env_vars"]["RAY_DATA_LOG_LEVEL"] = QUIET_LEVEL  # Ray Data in the workers
        # Datasets carry the driver's DataContext: without Ray's distributed tqdm, a dataset
        # executed in a worker (the training split) logs its progress at INFO, hidden above.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    ray.init(num_cpus=num_cpus, dashboard_port=port, runtime_env=runtime_env)


def local_cpus(run_cpus: float) -> int:
    """Logical CPUs for a local Ray that must hold one run needing `run_cpus` (see
    `pipeline.train.run_cpus`): at least the machine's cores.

    A run's Ray Data decoding and validation tasks hold logical CPUs beside its training
    workers; with only as many logical CPUs as cores, a worker that reserves every core
    leaves them none and training waits forever ("backpressured: ResourceBudget"). They are
    light next to training, so the cores are over-subscribed a little instead.
    """
    return max(os.cpu_count() or 1, math.ceil(run_cpus))
