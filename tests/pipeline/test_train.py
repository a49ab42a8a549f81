"""Ray Train training: checkpoints, refusal to overwrite, resume, a killed worker, storage probe."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from pep_model import load_checkpoint
from pipeline.storage import filesystem
from pipeline.train import (
    CHECKPOINT_FILE,
    RunExistsError,
    StorageNotSharedError,
    build_lr_scheduler,
    build_optimizer,
    check_storage_probe,
    ingest_options,
    load_training_checkpoint,
    run_cpus,
    run_training,
    write_storage_probe,
)


def test_ingest_options_are_ray_trains_defaults_without_the_deprecated_field():
    """The training dataset's options, given to Ray Train explicitly: its own default passes
    `exclude_resources` on, which warns (RayDeprecationWarning) in every run."""
    from ray.train import DataConfig
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        ours = ingest_options()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        theirs = DataConfig.default_ingest_options()
    for name in ("resource_limits", "exclude_resources", "preserve_order", "verbose_progress"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_optimizer_skips_weight_decay_on_biases_and_norms(tiny_config):
    cfg = tiny_config("train.optimizer=sgd", "train.weight_decay=0.5")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = build_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 0.5 and [p.ndim for p in decay["params"]] == [4]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_lr_schedule_warms_up_then_steps_at_milestones(tiny_config):
    cfg = tiny_config("train.lr=0.1", "train.warmup_iters=4", "train.milestones=[2, 3]")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    scheduler = build_lr_scheduler(optimizer, cfg, iters_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[2] == pytest.approx(0.1 * (0.001 + 0.999 * 2 / 4))
    assert lrs[4:10] == pytest.approx([0.1] * 6)  # warm-up done, before epoch 2
    assert lrs[10:15] == pytest.approx([0.01] * 5)  # epoch 2
    assert lrs[15:20] == pytest.approx([0.001] * 5)  # epoch 3


def test_a_run_holds_cpus_for_its_workers_decoding_and_validation(tiny_config):
    from pipeline import cluster

    one = tiny_config("train.cpus_per_worker=1", "data.reader_cpus=0.5")
    two = tiny_config("train.cpus_per_worker=2", "data.reader_cpus=0.5")
    assert run_cpus(one, num_workers=1) == 2.0  # worker + decoding + validation
    assert run_cpus(two, num_workers=3) == 7.0
    assert run_cpus(two, num_workers=1, validate=False) == 2.5
    # A local Ray gets at least the machine's cores, and room for the run's small tasks.
    cores = os.cpu_count() or 1
    assert cluster.local_cpus(2.5) == max(cores, 3)
    assert cluster.local_cpus(0.5) == cores


def _train_worker_pids() -> list[int]:
    """Pids of this Ray instance's live Ray Train worker processes (children of our raylet)."""
    import psutil
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if not cmdline.startswith("ray::RayTrainWorker"):
            continue
        try:
            parents = " ".join(" ".join(p.cmdline()) for p in proc.parents())
        except psutil.Error:
            continue
        if session_dir in parents:
            pids.append(proc.pid)
    return pids


def _registered_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray Train's controller has registered for the run, if any.

    A checkpoint folder on storage is not enough: the worker writes it during `report`, and
    the controller registers it only when it next polls the workers (later on a busy machine).
    A worker killed in between restarts from scratch. The controller's snapshot file
    (Ray Train V2 internals) is written after registration.
    """
    fs, path = filesystem(f"{run_dir}/checkpoint_manager_snapshot.json")
    try:
        with fs.open_input_stream(path) as f:
            state = json.loads(f.read())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


KILLED_EPOCHS = 5


@pytest.fixture(scope="module")
def killed_run(tiny_config, tiny_shards, s3_server):
    """One run on S3 storage (the stand-in), as on a cluster, whose worker process is killed
    mid-run; the restarted group resumes from the last checkpoint. Its checkpoints then serve
    the checkpoint, refusal and resume test (one Ray Train run fewer in the suite)."""
    cfg = tiny_config(f"train.epochs={KILLED_EPOCHS}", "train.max_failures=2")
    storage = f"s3://{s3_server.bucket}/train-test"
    outcome: dict = {}

    def train():
        try:
            outcome["run"] = run_training(
                cfg, str(tiny_shards / "train"), storage_path=storage, name="killed"
            )
        except BaseException as e:  # surfaced by the assertions
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    run_dir = f"{storage}/killed"
    deadline = time.time() + 300
    while not _registered_checkpoint(run_dir) and thread.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    registered = _registered_checkpoint(run_dir)
    pids = _train_worker_pids()
    last = f"train-test/killed/checkpoint_epoch_{KILLED_EPOCHS - 1:04d}/{CHECKPOINT_FILE}"
    finished_early = last in s3_server.keys("train-test/killed/")
    if registered and len(pids) == 1 and not finished_early:
        os.kill(pids[0], signal.SIGKILL)  # the real worker process, mid-run
    thread.join(timeout=600)
    return SimpleNamespace(
        cfg=cfg, storage=storage, outcome=outcome, registered=registered, pids=pids,
        finished_early=finished_early,
    )


def test_killed_worker_restarts_from_last_checkpoint(killed_run):
    """A worker process killed mid-run; the restarted group resumes from the last checkpoint
    on S3 (the stand-in), as on a cluster."""
    assert killed_run.registered, killed_run.outcome.get("error")
    assert len(killed_run.pids) == 1
    assert not killed_run.finished_early, "the run finished before the kill; it needs more epochs"
    assert "error" not in killed_run.outcome, killed_run.outcome.get("error")
    metrics = killed_run.outcome["run"].result.metrics
    assert metrics["epoch"] == KILLED_EPOCHS - 1  # completed the configured epochs
    assert metrics["resumed_from"] >= 0  # the restarted worker group loaded a checkpoint
    assert _train_worker_pids() == [] or killed_run.pids[0] not in _train_worker_pids()


def test_checkpoints_load_and_existing_run_needs_resume(killed_run, tiny_config, tiny_shards,
                                                        tmp_path):
    """On S3 storage, as on a cluster: the checkpoint's URI, the refusal to reuse a run name
    and `resume` all go through the bucket (on the killed run's checkpoints)."""
    assert "run" in killed_run.outcome, killed_run.outcome.get("error")
    run, storage, cfg = killed_run.outcome["run"], killed_run.storage, killed_run.cfg
    last = KILLED_EPOCHS - 1
    assert run.checkpoint_path == f"{storage}/killed/checkpoint_epoch_{last:04d}"
    local = run.local_checkpoint(tmp_path / "dl")
    assert local == tmp_path / "dl" / CHECKPOINT_FILE
    state = load_training_checkpoint(local.parent)  # weights_only=True inside
    assert state["epoch"] == last
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "config"}
    model, loaded_cfg = load_checkpoint(local)
    assert loaded_cfg.model.fpn_channels == 32
    assert run.result.metrics["steps"] == 6  # 12 train images / batch 2 / 1 worker
    assert run.result.metrics["torch_threads"] == cfg.train.cpus_per_worker == 1
    assert 0 <= run.result.metrics["data_wait_s"] <= run.result.metrics["epoch_time_s"]
    # the worker computed (its CPU time is real), and no process outruns the machine
    assert 0.1 < run.result.metrics["cpu_cores"] <= os.cpu_count()
    assert all(
        torch.isfinite(torch.tensor(v)) for k, v in run.result.metrics.items() if "loss" in k
    )

    with pytest.raises(RunExistsError, match="--resume"):
        run_training(cfg, str(tiny_shards / "train"), storage_path=storage, name="killed")

    # --resume with a longer schedule continues after the last epoch instead of starting over.
    longer = tiny_config(f"train.epochs={KILLED_EPOCHS + 1}")
    resumed = run_training(
        longer, str(tiny_shards / "train"), storage_path=storage, name="killed", resume=True
    )
    assert resumed.result.metrics["epoch"] == last + 1
    assert resumed.result.metrics["resumed_from"] == last
    local = resumed.local_checkpoint(tmp_path / "dl2")
    assert load_training_checkpoint(local.parent)["epoch"] == last + 1


def test_storage_probe_fails_fast_on_unshared_path(ray_session, tmp_path):
    token = write_storage_probe(str(tmp_path / "shared"), "run")
    check_storage_probe(str(tmp_path / "shared"), "run", token, rank=0)  # same path: fine
    # A worker whose storage_path is not the driver's (node-local on another machine).
    with pytest.raises(StorageNotSharedError, match="shared by all nodes"):
        check_storage_probe(str(tmp_path / "elsewhere"), "run", token, rank=1)
