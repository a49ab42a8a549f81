"""GPU or CPU: what a stage asks Ray for, and which device the process that runs it uses.

Two questions, answered in two places:

- `resolve_use_gpu(use_gpu)`, on the driver: do this stage's Ray workers, replicas or tasks
  ask for GPUs? `auto` answers yes when the cluster has GPUs now, or when its autoscaler can
  add GPU nodes (`cluster.yaml`'s GPU types start at `min_workers: 0`, so a fresh cluster
  reports none until a job asks for one).
- `local_device(use_gpu)`, in the process that runs the work: `cuda` only when this process
  holds a GPU (Ray assigned it one, or, outside Ray workers, torch sees one). A CPU task on a
  GPU cluster therefore gets the CPU, whatever the cluster's totals say.
"""

from __future__ import annotations

import logging

import ray
import torch

logger = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """A stage was told to use a GPU that the process running it does not have."""


def parse_use_gpu(use_gpu: bool | str | None) -> bool | None:
    """True / False for an explicit setting, None for `auto` (or None)."""
    if isinstance(use_gpu, bool):
        return use_gpu
    value = str(use_gpu or "auto").lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    if value != "auto":
        raise ValueError(f"use_gpu: expected auto|true|false, got {use_gpu!r}")
    return None


def autoscaler_max_gpus() -> float:
    """GPUs the autoscaler could add, from the cluster config it publishes in the GCS
    (`max_count` x GPUs of each node type; 0 without an autoscaler)."""
    from ray._private.state import state  # the lookup Ray Train makes for the same question

    try:
        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception as e:  # noqa: BLE001 - no autoscaler state is "no GPUs to add"
        logger.debug("no autoscaler cluster config: %s", e)
        return 0.0
    return float(limits.get("GPU", 0))


def resolve_use_gpu(use_gpu: bool | str | None) -> bool:
    """Whether the Ray workers of a stage ask for GPUs (decided on the driver).

    `auto`: with Ray, when the cluster has GPUs or its autoscaler can add GPU nodes;
    without Ray, when torch sees a GPU here.
    """
    explicit = parse_use_gpu(use_gpu)
    if explicit is not None:
        return explicit
    if not ray.is_initialized():
        return torch.cuda.is_available()
    if ray.cluster_resources().get("GPU", 0) > 0:
        return True
    if autoscaler_max_gpus() > 0:
        logger.info("use_gpu auto: no GPU node is up yet; the autoscaler can add GPU nodes")
        return True
    return False


def _in_ray_worker() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def holds_gpu() -> bool:
    """True when this process may use a GPU: a Ray worker only with GPUs assigned to it."""
    if not torch.cuda.is_available():
        return False
    return not _in_ray_worker() or bool(ray.get_gpu_ids())


def local_device(use_gpu: bool | str | None, stage: str = "this stage") -> torch.device:
    """The device for work running in this process.

    `auto`: `cuda` when this process holds a GPU (`holds_gpu`), else the CPU. `true`: `cuda`,
    or a DeviceError naming `stage` when this process holds none. `false`: the CPU.
    """
    explicit = parse_use_gpu(use_gpu)
    if explicit is False:
        return torch.device("cpu")
    if holds_gpu():
        return torch.device("cuda")
    if explicit:
        if not _in_ray_worker():
            where = "torch sees no CUDA device here"
        elif ray.get_gpu_ids():
            where = f"Ray assigned GPU {ray.get_gpu_ids()} but torch sees no CUDA device"
        else:
            where = "this Ray task was given no GPU (it must ask for num_gpus)"
        raise DeviceError(f"{stage}: use_gpu is true but {where}")
    return torch.device("cpu")
