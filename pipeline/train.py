"""Distributed PEP training with Ray Train's TorchTrainer.

`run_training` wires the pieces on the driver (datasets, scaling, storage, failure handling,
validation); `train_loop_per_worker` is what every Ray Train worker runs and reads top to
bottom: data shard, model, `prepare_model`, optimizer and schedule, epochs, `ray.train.report`.

Checkpoints are one `checkpoint.pt` per report holding plain data only (state dicts, the
resolved config, the epoch), so they load with `torch.load(..., weights_only=True)` and
`pep_model.load_checkpoint` reads them directly.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.data
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pep_model import Config, build_model, config_from_dict, config_to_dict
from pipeline import reader, storage
from pipeline.devices import resolve_use_gpu
from pipeline.prepare import read_manifest
from pipeline.tracking import log_metrics_safely

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
PROBE_DIR = ".storage_probe"
VALIDATION_CPUS = 0.5  # the validation task beside training (experiment.validate_checkpoint)


class RunExistsError(RuntimeError):
    """A run of that name already exists in the storage path and --resume was not given."""


class StorageNotSharedError(RuntimeError):
    """A training worker cannot read what the driver wrote under `storage_path`."""


# ----------------------------------------------------------------------------- helpers


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD (the paper's recipe) or AdamW; no weight decay on norm layers and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr)
    raise ValueError(f"train.optimizer must be sgd or adamw, got {cfg.train.optimizer!r}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_iters`, then x`lr_gamma` at each epoch milestone.

    One scheduler stepped per iteration (warm-up and steps in one function, so neither
    overwrites the other).
    """
    warmup = max(cfg.train.warmup_iters, 0)
    milestones = [m * iters_per_epoch for m in cfg.train.milestones]

    def factor(it: int) -> float:
        scale = cfg.train.lr_gamma ** sum(it >= m for m in milestones)
        if it < warmup:
            scale *= 0.001 + (1 - 0.001) * it / warmup
        return scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_training_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write the training state (plain data only) to `directory/checkpoint.pt`."""
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def load_training_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by `save_training_checkpoint` (weights only)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def write_storage_probe(storage_path: str, name: str) -> str:
    """Driver side: write a probe file under the run directory; returns its token."""
    fs, root = storage.filesystem(storage_path)
    token = uuid.uuid4().hex
    probe_dir = f"{root}/{name}/{PROBE_DIR}"
    fs.create_dir(probe_dir, recursive=True)
    with fs.open_output_stream(f"{probe_dir}/driver-{token}") as f:
        f.write(token.encode())
    return token


def check_storage_probe(storage_path: str, name: str, token: str, rank: int) -> None:
    """Worker side: read the driver's probe and write (then read back) this worker's own.

    A node-local `storage_path` on a multi-node cluster fails here at once, instead of at
    the first checkpoint upload.
    """
    fs, root = storage.filesystem(storage_path)
    probe_dir = f"{root}/{name}/{PROBE_DIR}"
    node = ray.get_runtime_context().get_node_id()[:12]
    try:
        with fs.open_input_stream(f"{probe_dir}/driver-{token}") as f:
            seen = f.read().decode()
        mine = f"{probe_dir}/worker-{rank}-{token}"
        with fs.open_output_stream(mine) as f:
            f.write(node.encode())
        with fs.open_input_stream(mine) as f:
            back = f.read().decode()
    except (OSError, FileNotFoundError) as e:
        raise StorageNotSharedError(
            f"worker {rank} on node {node} cannot use storage_path {storage_path!r}: {e}. "
            "On a multi-node cluster storage_path must be shared by all nodes (NFS mount or "
            "a cloud URI such as s3://bucket/runs), not a node-local directory."
        ) from e
    if seen != token or back != node:
        raise StorageNotSharedError(
            f"worker {rank} on node {node} read back unexpected probe contents under "
            f"{storage_path!r}; is the storage consistent across nodes?"
        )


def run_directory_exists(storage_path: str, name: str) -> bool:
    """True when `storage_path/name` already holds something (a previous run)."""
    fs, root = storage.filesystem(storage_path)
    info = fs.get_file_info(f"{root}/{name}")
    if info.type == pyarrow.fs.FileType.NotFound:
        return False
    selector = pyarrow.fs.FileSelector(f"{root}/{name}", recursive=False)
    return any(not entry.base_name.startswith(PROBE_DIR) for entry in fs.get_file_info(selector))


def run_cpus(cfg: Config, num_workers: int, validate: bool = True) -> float:
    """Logical CPUs one training run holds: its workers, Ray Data decoding and validation."""
    return (
        num_workers * cfg.train.cpus_per_worker
        + cfg.data.reader_cpus
        + (VALIDATION_CPUS if validate else 0.0)
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # prepare_model wraps in DDP only when world_size > 1.
    return getattr(model, "module", model)


def _to_device(images: list, targets: list, device: torch.device) -> tuple[list, list]:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets


# ----------------------------------------------------------------------------- worker


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every worker (one all-reduce of a flag under DDP), so
    that all workers take or skip a step together and none waits alone in DDP's all-reduce."""
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


class NonFiniteLossError(FloatingPointError):
    """`train.max_nonfinite_steps` steps in a row had a non-finite loss on some worker."""


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches,
    device: torch.device,
    cfg: Config,
    scaler: torch.amp.GradScaler,
) -> dict[str, float]:
    """One pass over this worker's shard; returns mean loss terms, lr and images/s.

    A step whose loss is not finite on any worker is skipped by all of them (`skipped_steps`);
    `train.max_nonfinite_steps` in a row raise NonFiniteLossError on every worker. The loss
    terms are summed on the device and read once, at the end of the epoch.
    `data_wait_s` is the time spent waiting for the next batch (reading, decoding and
    collating upstream): when it is a large share of `epoch_time_s`, training is input-bound.
    `cpu_cores` is this process's CPU time over the epoch's wall time: how many cores the
    worker kept busy (below its torch threads when other processes take the cores).
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = images_seen = skipped = in_a_row = 0
    data_wait = 0.0
    use_amp = cfg.train.amp and device.type == "cuda"
    cpu_start = time.process_time()
    start = wait_start = time.perf_counter()
    for images, targets in batches:
        data_wait += time.perf_counter() - wait_start
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if not all_ranks_finite(loss):
            skipped += 1
            in_a_row += 1
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            logger.warning("step %d skipped: non-finite loss on a worker (here: %s)", steps, terms)
            if in_a_row >= max(cfg.train.max_nonfinite_steps, 1):
                raise NonFiniteLossError(
                    f"{in_a_row} steps in a row with a non-finite loss on some worker "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); this "
                    f"worker's last terms: {terms}. Lower train.lr or check the data."
                )
            scheduler.step()
            wait_start = time.perf_counter()
            continue
        in_a_row = 0
        scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            clip_groups = getattr(getattr(model, "module", model), "clip_groups", None)
            for params in clip_groups() if clip_groups else [list(model.parameters())]:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for key, value in {**losses, "loss": loss}.items():
            value = value.detach().float()
            sums[key] = sums[key] + value if key in sums else value
        steps += 1
        images_seen += len(images)
        wait_start = time.perf_counter()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    metrics = {key: value.item() / max(steps, 1) for key, value in sums.items()}
    metrics.update(
        lr=optimizer.param_groups[0]["lr"],
        images_per_s=images_seen / max(elapsed, 1e-9),
        steps=steps,
        skipped_steps=skipped,
        epoch_time_s=elapsed,
        data_wait_s=data_wait,
        cpu_cores=cpu / max(elapsed, 1e-9),
    )
    return metrics


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> None:
    """Load a GradScaler state, unless the checkpoint's scaler was disabled (an empty state:
    saved on CPU or without AMP); an enabled scaler then starts from its defaults."""
    if state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        logger.info("the checkpoint has no AMP scaler state: the scaler starts afresh")


def prepare_norm_layers(
    model: torch.nn.Module, cfg: Config, world_size: int, device: torch.device
) -> torch.nn.Module:
    """`model.norm: bn` over several GPU workers: SyncBatchNorm, so that the batch statistics
    (and the running ones) are those of the global batch, as one worker would compute them.

    PyTorch's SyncBatchNorm runs on GPUs only: CPU workers keep BatchNorm, with a warning
    (each normalises its own batch, and DDP copies rank 0's running statistics to all).
    """
    if cfg.model.norm != "bn" or world_size <= 1:
        return model
    if device.type != "cuda":
        logger.warning(
            "model.norm=bn with %d CPU workers: SyncBatchNorm needs GPUs, so each worker "
            "normalises its own batch and DDP keeps rank 0's running statistics; "
            "model.norm=gn (or frozen_bn) trains the same on any number of workers",
            world_size,
        )
        return model
    logger.info("model.norm=bn with %d workers: BatchNorm layers -> SyncBatchNorm", world_size)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _quiet_report_log() -> None:
    """Ray Train logs every report's TrainingReport (metrics and checkpoint) at INFO under a
    logger named after its file, outside `ray.train` (so `LoggingConfig` misses it)."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default options for the training dataset, from the driver's DataContext
    (`ray.train.DataConfig.default_ingest_options`), without `exclude_resources`.

    Given explicitly: Ray 2.60's default passes the deprecated `exclude_resources` on, which
    logs a RayDeprecationWarning from Ray Train's dataset manager in every run.
    """
    options = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(
        resource_limits=options.resource_limits,
        preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress,
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop (Ray Train V2)."""
    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if loop_config.get("probe_token"):
        check_storage_probe(
            loop_config["storage_path"], loop_config["name"], loop_config["probe_token"], rank
        )
    if loop_config.get("quiet"):
        _quiet_report_log()
    torch.manual_seed(cfg.train.seed + rank)
    # Ray sets OMP_NUM_THREADS to the worker's CPUs; torch may have read it before that.
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))

    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    model = prepare_norm_layers(build_model(cfg.model), cfg, context.get_world_size(), device)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, loop_config["iters_per_epoch"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_training_checkpoint(ckpt_dir)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state.get("scaler"))
        start_epoch = state["epoch"] + 1
        logger.info("rank %d resumed from the checkpoint of epoch %d", rank, state["epoch"])

    for epoch in range(start_epoch, cfg.train.epochs):
        batches = reader.iter_model_batches(
            shard,
            cfg.train.batch_size,
            local_shuffle_buffer_size=4 * cfg.train.batch_size,
            device=device,
        )
        metrics = train_one_epoch(model, optimizer, scheduler, batches, device, cfg, scaler)
        metrics.update(
            epoch=epoch, resumed_from=start_epoch - 1, torch_threads=torch.get_num_threads()
        )
        if rank == 0 and loop_config.get("mlflow_run"):
            run_id, tracking_uri = loop_config["mlflow_run"]
            log_metrics_safely(run_id, metrics, step=epoch, tracking_uri=tracking_uri)
        last = epoch + 1 == cfg.train.epochs
        validate = (epoch + 1) % max(cfg.eval.every_epochs, 1) == 0 or last
        if last and not loop_config.get("validate_last", True):
            validate = False  # the driver's final evaluation of this checkpoint stands for it
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_training_checkpoint(
                    tmp,
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "config": loop_config["config"],
                    },
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics,
                checkpoint=ckpt,
                checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                validation=bool(validate and ckpt is not None and loop_config.get("validate")),
            )


# ----------------------------------------------------------------------------- driver


@dataclass
class TrainingRun:
    """What `run_training` returns: Ray's result plus where things are."""

    result: ray.train.Result
    checkpoint_path: str  # the last checkpoint directory: a local path or a URI (s3://...)
    run_path: str

    def local_checkpoint(self, dst_dir: str | Path) -> Path:
        """The last checkpoint's `checkpoint.pt` on this machine: in place when the storage is
        local, else downloaded into `dst_dir`."""
        if not storage.is_uri(self.checkpoint_path):
            return Path(self.checkpoint_path) / CHECKPOINT_FILE
        return storage.fetch_checkpoint(self.checkpoint_path, dst_dir)


def run_training(
    cfg: Config,
    train_shards: str,
    *,
    storage_path: str,
    name: str,
    resume: bool = False,
    num_workers: int | None = None,
    use_gpu: str | bool | None = None,
    placement_strategy: str = "PACK",
    validation_config: ray.train.v2.api.validation_config.ValidationConfig | None = None,
    callbacks: list | None = None,
    mlflow_run: tuple[str, str] | None = None,
    quiet: bool = False,
    validate_last: bool = True,
) -> TrainingRun:
    """Train PEP on the shards in `train_shards` with a TorchTrainer.

    Refuses to reuse `storage_path/name` unless `resume` is set; with `resume` Ray Train
    restores the run's last checkpoint (`ray.train.get_checkpoint()` in the workers).
    `validation_config` validates every `eval.every_epochs` epochs and the last one; with
    `validate_last=False` not the last one (when the caller evaluates that checkpoint itself).
    `quiet`: Ray Train's controller and workers log only warnings and errors (no per-report
    TrainingReport dumps or checkpoint notices).
    """
    num_workers = num_workers or cfg.train.num_workers
    gpu = resolve_use_gpu(cfg.train.use_gpu if use_gpu is None else use_gpu)
    if not resume and run_directory_exists(storage_path, name):
        raise RunExistsError(
            f"a run named {name!r} already exists in {storage_path}; pass --resume to continue "
            "it, or choose another --name"
        )

    # seed=None: fresh augmentations every epoch (each epoch re-executes the dataset).
    dataset = reader.training_dataset(train_shards, cfg.data, seed=None)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < run_cpus(cfg, num_workers, validate=False):
        logger.warning(
            "the cluster has %g CPUs: %d training workers take %d each and Ray Data needs %g "
            "more to read and decode the shards; training waits until CPUs are added "
            "(lower --num-workers or train.cpus_per_worker, or add nodes)",
            cpus,
            num_workers,
            cfg.train.cpus_per_worker,
            cfg.data.reader_cpus,
        )
    rows = read_manifest(train_shards)["counts"]["images_written"]
    iters_per_epoch = max(1, math.ceil(rows / (cfg.train.batch_size * num_workers)))
    token = write_storage_probe(storage_path, name)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(cfg),
            "iters_per_epoch": iters_per_epoch,
            "storage_path": storage_path,
            "name": name,
            "probe_token": token,
            "validate": validation_config is not None,
            "validate_last": validate_last,
            "mlflow_run": mlflow_run,
            "quiet": quiet,
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if gpu else {})},
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options()),
        validation_config=validation_config,
    )
    logger.info(
        "training %s: %d images, %d workers (gpu=%s), %d epochs, %d iters/epoch",
        name,
        rows,
        num_workers,
        gpu,
        cfg.train.epochs,
        iters_per_epoch,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    fs = result.checkpoint.filesystem
    return TrainingRun(
        result=result,
        checkpoint_path=storage.uri(fs, result.checkpoint.path),
        run_path=storage.uri(fs, result.path),
    )
