"""Joining or starting Ray for the jobs (one place, so every job gets the same fix)."""

from __future__ import annotations

import logging
import math
import os
import socket

import ray

from pipeline.cli import QUIET_LEVEL, hide_notice, quiet_library_logs

# Set for a quiet local instance's Ray processes (none when joining a cluster): the
# preemption watcher, an actor Ray Train starts beside every worker group to react to nodes
# being drained, has nothing to watch on one machine, and Ray 2.60 logs an error line from its
# creation ("Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the
# object store and max_restarts > 0").
QUIET_WORKER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# A new local instance uses token authentication unless RAY_AUTH_MODE says otherwise, and
# warns that it did so. Ray reads RAY_AUTH_MODE when it is imported (set by `init_ray` it
# comes too late), so the notice is filtered instead.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray's notice at a local start with RAY_AUTH_MODE unset: "... is enabled for this Ray
# cluster" (a token exists) or "... is disabled for this Ray cluster" (none does).
TOKEN_AUTH_NOTICE = (
    "Token authentication is enabled for this Ray cluster.",
    "Token authentication is disabled for this Ray cluster.",
)

logger = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Join RAY_ADDRESS (e.g. under `ray job submit`), else start a local instance.

    A local instance gets an explicit dashboard port, announced to its own processes as
    RAY_API_SERVER_ADDRESS: Ray Train's PlacementGroupCleaner, which frees a worker group's
    resources when a run ends or Tune (ASHA) stops a trial, looks the cluster up through the
    state API and fails when several Ray instances run on the machine ("Found multiple active
    Ray instances"); the run's CPUs then stay reserved and the next run waits forever.
    `num_cpus` sizes the local instance's logical CPUs (ignored when joining a cluster).
    `quiet` (local instances only): Ray (its start-up lines), Ray Train/Tune/Data and MLflow
    keep only their warnings and errors, in the driver and (Ray Data) in the workers; Ray
    Train's own workers and controller follow `RunConfig.logging_config`
    (`pipeline.train.run_training(quiet=)`); see also `QUIET_WORKER_ENV`, `TOKEN_AUTH_NOTICE`.
    Returns True when it started a quiet local instance: the runs a sweep or an ablation
    drives from Ray tasks are then quiet too.
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        _log_resources("joined")
        return False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    if quiet:
        quiet_library_logs()
        hide_notice(TOKEN_AUTH_LOGGER, *TOKEN_AUTH_NOTICE)
        runtime_env["env_vars"]["RAY_DATA_LOG_LEVEL"] = QUIET_LEVEL  # Ray Data in the workers
        runtime_env["env_vars"].update(QUIET_WORKER_ENV)
        runtime_env["worker_process_setup_hook"] = "pipeline.cli.hide_progress_bar_notice"
        # Datasets carry the driver's DataContext: without Ray's distributed tqdm, a dataset
        # executed in a worker (the training split) logs its progress at INFO, hidden above.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    ray.init(
        num_cpus=num_cpus,
        dashboard_port=port,
        runtime_env=runtime_env,
        # the driver's `ray` logger ("Started a local Ray instance. View the dashboard at ...")
        logging_level=QUIET_LEVEL if quiet else logging.INFO,
    )
    _log_resources("local")
    return quiet


def _log_resources(how: str) -> None:
    """One line on the Ray instance the job runs on: what it has now (an autoscaling cluster
    may add nodes later; `devices.resolve_use_gpu` looks at those too)."""
    total = ray.cluster_resources()
    logger.info(
        "Ray (%s): %g CPUs, %g GPUs on %d node(s)",
        how,
        total.get("CPU", 0),
        total.get("GPU", 0),
        len([n for n in ray.nodes() if n.get("Alive")]),
    )


def local_cpus(run_cpus: float) -> int:
    """Logical CPUs for a local Ray that must hold one run needing `run_cpus` (see
    `pipeline.train.run_cpus`): at least the machine's cores.

    A run's Ray Data decoding and validation tasks hold logical CPUs beside its training
    workers; with only as many logical CPUs as cores, a worker that reserves every core
    leaves them none and training waits forever ("backpressured: ResourceBudget"). They are
    light next to training, so the cores are over-subscribed a little instead.
    """
    return max(os.cpu_count() or 1, math.ceil(run_cpus))
