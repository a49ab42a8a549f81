"""Ray Tune sweep of PEP's loss weights (Eq. 8: alpha..delta) and its score threshold.

Each Tune trial is a function trainable that runs one `experiment.train_and_evaluate`
(a nested Ray Train `TorchTrainer`, the Ray Train V2 pattern): the trainer's per-epoch
reports reach Tune through `TuneReportCallback`, so ASHA can stop a weak trial between
epochs. The score threshold is not a Tune dimension that retrains anything: every trial
predicts once at the lowest candidate of `eval.score_thresholds`, scores every candidate
from those predictions, and reports the best threshold and its AP as its last result.
OptunaSearch (TPE) proposes the weights from those final results.

MLflow: one parent run for the sweep and one child run per trial (the child is the normal
run of `train_and_evaluate`, nested with `parent_run_id`); the parent gets the leaderboard
and the best config (a YAML that `jobs/train_pep.py --config` accepts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from pep_model import Config, config_from_dict, config_to_dict, save_config
from pipeline import cli, cluster, experiment, storage, tracking
from pipeline.cli import DEFAULT_WEIGHT_RANGE, LOSS_WEIGHTS
from pipeline.devices import resolve_use_gpu
from pipeline.train import run_cpus, run_directory_exists

logger = logging.getLogger(__name__)

OBJECTIVE = "best_segm_AP"  # segm AP at the trial's best score threshold (final result only)
EARLY_STOP_METRIC = "loss_unweighted"  # per-epoch: the loss terms without the Eq. 8 weights
EPOCHS_DONE = "epochs_done"  # per-epoch: 1-based epoch count (ASHA's time axis)
SPEC_FILE = "sweep_spec.json"
TRAIN_RUNS_DIR = "train_runs"
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes; the trial process runs COCOeval and MLflow logging


class SweepExistsError(RuntimeError):
    """A sweep of that name already exists in the storage path and --resume was not given."""


class SweepNotFoundError(RuntimeError):
    """--resume was given but there is no restorable sweep of that name."""


@dataclass
class SweepSpec:
    """Everything a trial needs besides its sampled values; saved beside the Tune experiment
    (`sweep_spec.json`) so that --resume continues with exactly the same settings."""

    name: str
    base_config: dict[str, Any]  # resolved Config as a dict (num_classes from the data)
    data_root: str  # absolute shards root (train/ and val/), resolved once by the driver
    work_dir: str  # absolute
    storage_path: str  # absolute path or URI; the Tune experiment is storage_path/name
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    num_samples: int = 4
    workers_per_trial: int = 1
    max_concurrent: int = 1
    use_gpu: bool = False
    early_stop: bool = True  # ASHA on the per-epoch unweighted loss; False: every trial runs out
    grace_period: int = 1
    reduction_factor: float = 2.0
    log_model: bool = True
    overlays: int = 2
    seed: int = 0
    quiet: bool = False  # trials keep only the libraries' warnings (set by each invocation)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def train_storage(self) -> str:
        return f"{self.experiment_path}/{TRAIN_RUNS_DIR}"


@dataclass
class TrialRow:
    """One line of the leaderboard."""

    trial_id: str
    weights: dict[str, float]
    status: str  # completed | stopped early (epoch N) | error
    best_threshold: float | None = None
    best_ap: float | None = None
    ap_at_thresholds: dict[float, float] = field(default_factory=dict)
    epochs: int = 0
    run_id: str | None = None


@dataclass
class SweepSummary:
    """What a finished (or resumed and finished) sweep produced."""

    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_config_path: str | None
    leaderboard: str

    def report(self) -> str:
        lines = ["", self.leaderboard, ""]
        if self.best is not None:
            weights = ", ".join(f"{k}={v:.3g}" for k, v in self.best.weights.items())
            lines.append(
                f"best trial:   {self.best.trial_id} ({weights}, score threshold "
                f"{self.best.best_threshold:g}): segm AP {100 * self.best.best_ap:.1f}"
            )
            lines.append(f"best config:  {self.best_config_path}")
            lines.append(f"train it:     python jobs/train_pep.py --config {self.best_config_path}")
        else:
            lines.append("no trial finished with an AP; see the errors above")
        unfinished = sum(r.status.startswith("unfinished") for r in self.rows)
        if unfinished:
            lines.append(
                f"unfinished:   {unfinished} trial(s); continue with --resume --name {self.name}"
            )
        lines += [
            f"sweep:        {self.experiment_path}",
            f"MLflow run:   {self.parent_run_id} (one child run per trial)",
            f"look:         mlflow ui --backend-store-uri {self.tracking_uri}",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- storage


def absolute_storage(storage_path: str) -> str:
    """Absolute local path (Tune trials run in other directories) or the URI unchanged."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def write_spec(spec: SweepSpec) -> None:
    """Save the spec as `storage_path/name/sweep_spec.json`."""
    fs, root = storage.filesystem(spec.experiment_path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{SPEC_FILE}") as f:
        f.write(json.dumps(asdict(spec), indent=1).encode())


def read_spec(experiment_path: str) -> SweepSpec:
    """The spec a sweep was started with (for --resume)."""
    fs, root = storage.filesystem(experiment_path)
    try:
        with fs.open_input_stream(f"{root}/{SPEC_FILE}") as f:
            values = json.loads(f.read().decode())
    except (OSError, FileNotFoundError) as e:
        raise SweepNotFoundError(
            f"{experiment_path}: no {SPEC_FILE}; was this sweep started by jobs/sweep_pep.py?"
        ) from e
    values["ranges"] = {k: tuple(v) for k, v in values["ranges"].items()}
    return SweepSpec(**values)


# ----------------------------------------------------------------------------- trials


def apply_trial_values(base_config: dict[str, Any], values: dict[str, float]) -> Config:
    """The base config with a trial's sampled loss weights."""
    cfg = config_from_dict(base_config)
    for name in LOSS_WEIGHTS:
        if name in values:
            setattr(cfg.model, name, float(values[name]))
    return cfg


def best_threshold(per_threshold: dict[float, dict[str, Any]]) -> tuple[float, float]:
    """(threshold, segm AP) with the highest segm AP; ties go to the higher threshold.

    Higher thresholds drop low-score detections, which can only end the precision-recall
    curve earlier, so with equal AP the higher threshold gives the same AP with fewer
    false positives.
    """
    if not per_threshold:
        raise ValueError("no per-threshold metrics: is eval.score_thresholds empty?")
    threshold, metrics = max(per_threshold.items(), key=lambda item: (item[1]["segm/AP"], item[0]))
    return float(threshold), float(metrics["segm/AP"])


def threshold_key(threshold: float) -> str:
    """Metric name of the segm AP at one score threshold (as train_and_evaluate logs it)."""
    return f"segm/AP_thr_{threshold:g}".replace(".", "_")


class EpochReportCallback(TuneReportCallback):
    """TuneReportCallback plus two per-epoch keys ASHA uses.

    - `epochs_done`: 1-based epoch count (the trainer's `epoch` is 0-based and survives a
      resumed Ray Train run, unlike Tune's `training_iteration`).
    - `loss_unweighted`: the sum of the loss terms divided by their Eq. 8 weights, so trials
      with different weights compare on the same scale (the weighted total would favour small
      weights).
    """

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = dict(weights)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = dict(metrics[0])
        if "epoch" in first:
            first[EPOCHS_DONE] = int(first["epoch"]) + 1
        if "loss_perceive" in first:
            first[EARLY_STOP_METRIC] = float(first["loss_perceive"]) + sum(
                float(first[term]) / self.weights[name]
                for name, term in LOSS_WEIGHTS.items()
                if term in first and self.weights.get(name)
            )
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run name (and MLflow `ray_run_name` tag) of one trial."""
    return f"{sweep_name}-{trial_id}"


def pep_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """Tune function trainable: one PEP training + evaluation for the sampled weights."""
    trial_id = ray.tune.get_context().get_trial_id()
    weights = {name: float(config[name]) for name in LOSS_WEIGHTS if name in config}
    cfg = apply_trial_values(spec.base_config, weights)
    name = trial_run_name(spec.name, trial_id)
    # A restored (resumed) trial continues its own Ray Train run from the last checkpoint.
    resume = run_directory_exists(spec.train_storage, name)
    if spec.quiet:
        cli.quiet_library_logs()
    summary = experiment.train_and_evaluate(
        cfg,
        data=spec.data_root,
        work_dir=spec.work_dir,
        storage_path=spec.train_storage,
        name=name,
        resume=resume,
        num_workers=spec.workers_per_trial,
        use_gpu="true" if spec.use_gpu else "false",
        tracking_uri=spec.tracking_uri,
        experiment_name=spec.experiment_name,
        parent_run_id=spec.parent_run_id,
        log_model=spec.log_model,
        overlays=spec.overlays,
        callbacks=[EpochReportCallback(weights)],
        quiet=spec.quiet,
    )
    threshold, ap = best_threshold(summary.thresholds)
    final = {
        OBJECTIVE: ap,
        "best_threshold": threshold,
        "segm/AP": float(summary.metrics["segm/AP"]),
        "bbox/AP": float(summary.metrics["bbox/AP"]),
        "mlflow_run_id": summary.run_id,
        "checkpoint": summary.checkpoint,
        **{threshold_key(t): float(m["segm/AP"]) for t, m in summary.thresholds.items()},
    }
    client = mlflow.MlflowClient(spec.tracking_uri)
    client.log_metric(summary.run_id, OBJECTIVE, ap)
    client.log_metric(summary.run_id, "best_threshold", threshold)
    client.set_tag(summary.run_id, "tune_trial_id", trial_id)
    for key, value in weights.items():
        client.set_tag(summary.run_id, f"search.{key}", f"{value:.6g}")
    ray.tune.report(final)


# ----------------------------------------------------------------------------- driver


def default_max_concurrent(workers_per_trial: int, use_gpu: bool, cfg: Config) -> int:
    """Trials that fit on the cluster at once: CPUs for workers + data reading + validation
    (and one GPU per worker with `use_gpu`)."""
    resources = ray.cluster_resources()
    per_trial_cpus = run_cpus(cfg, workers_per_trial)
    fit = math.floor(resources.get("CPU", 1) / per_trial_cpus)
    if use_gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0) / workers_per_trial))
    return max(1, fit)


def _find_parent_run(client: mlflow.MlflowClient, experiment_id: str, name: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        f"tags.sweep_name = '{name}' and tags.sweep_role = 'parent'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class _FinalResultOptuna(OptunaSearch):
    """OptunaSearch that learns only from a trial's final result.

    The per-epoch results carry the training losses, not the objective (AP is computed once,
    after training); OptunaSearch would fail on them (it reports every result to Optuna as an
    intermediate value). TPE needs only the final values; ASHA does the early stopping.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class TrialProgress(ray.tune.Callback):
    """One console line per ended trial: its result, how many ended, the best so far."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.ended = 0
        self.best: tuple[float, str] | None = None

    def _line(self, trial, outcome: str) -> None:
        self.ended += 1
        logger.info(
            "trial %s %s (%d/%d ended); best so far: %s", trial.trial_id, outcome, self.ended,
            self.num_samples,
            "none" if self.best is None else f"{OBJECTIVE} {self.best[0]:.3f} ({self.best[1]})",
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if OBJECTIVE not in result:  # stopped early by ASHA: no evaluation
            self._line(trial, f"stopped early after {result.get(EPOCHS_DONE, '?')} epochs")
            return
        value = float(result[OBJECTIVE])
        if self.best is None or value > self.best[0]:
            self.best = (value, trial.trial_id)
        self._line(trial, f"finished: {OBJECTIVE} {value:.3f}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "failed (see its error above)")


def _make_tuner(spec: SweepSpec, restore: bool) -> ray.tune.Tuner:
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(pep_trial, spec=spec),
        # The trial function only drives the nested TorchTrainer, whose workers reserve their
        # own CPUs/GPUs (and Ray Data its own); a CPU held here would be missing for them (on
        # 2 CPUs: 1 training worker + 1 for Ray Data's ListFiles task). Tune refuses an empty
        # request, so the trial declares only the memory of its driver process;
        # max_concurrent_trials bounds how many trials start.
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if restore:
        return ray.tune.Tuner.restore(
            spec.experiment_path, trainable, resume_unfinished=True, resume_errored=True
        )
    space = {name: ray.tune.loguniform(low, high) for name, (low, high) in spec.ranges.items()}
    paper = {name: 1.0 for name in space}
    start = [paper] if all(low <= 1.0 <= high for low, high in spec.ranges.values()) else None
    epochs = config_from_dict(spec.base_config).train.epochs
    scheduler = FIFOScheduler()
    if spec.early_stop:
        scheduler = ASHAScheduler(
            time_attr=EPOCHS_DONE,
            metric=EARLY_STOP_METRIC,
            mode="min",
            # No rung at the last epoch: a trial that trained to the end is always evaluated.
            max_t=max(1, epochs - 1),
            grace_period=min(spec.grace_period, max(1, epochs - 1)),
            reduction_factor=spec.reduction_factor,
            stop_last_trials=False,
        )
    searcher = _FinalResultOptuna(
        metric=OBJECTIVE, mode="max", points_to_evaluate=start, seed=spec.seed
    )
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent,
        ),
        run_config=ray.tune.RunConfig(
            name=spec.name, storage_path=spec.storage_path,
            callbacks=[TrialProgress(spec.num_samples)],
            verbose=0 if spec.quiet else None,  # 0: no status tables, TrialProgress's lines only
        ),
    )


def _resumed_spec(experiment_path: str, name: str, quiet: bool) -> SweepSpec:
    """The saved settings of the sweep at `experiment_path` (SweepNotFoundError if none)."""
    if not ray.tune.Tuner.can_restore(experiment_path):
        raise SweepNotFoundError(
            f"nothing to resume: {experiment_path} holds no Tune experiment (check --name "
            "and --storage-path)"
        )
    spec = read_spec(experiment_path)
    spec.quiet = quiet
    logger.info("resuming sweep %s from %s (its saved settings)", name, experiment_path)
    return spec


def _start_parent(
    client: mlflow.MlflowClient, experiment_id: str, spec: SweepSpec, experiment_path: str
) -> None:
    """A new sweep's MLflow parent run (its id goes into `spec`), then the spec is saved."""
    parent = client.create_run(
        experiment_id,
        run_name=spec.name,
        tags={
            "sweep_name": spec.name,
            "sweep_role": "parent",
            "sweep_path": experiment_path,
            "git_commit": tracking.git_commit(),
            "data_source": spec.data_root,
        },
    )
    spec.parent_run_id = parent.info.run_id
    _log_parent_setup(client, spec)
    write_spec(spec)


def run_sweep(
    cfg: Config,
    *,
    data: str | None = None,
    work_dir: str | Path = "work",
    storage_path: str | None = None,
    name: str = "sweep",
    resume: bool = False,
    ranges: dict[str, tuple[float, float]] | None = None,
    num_samples: int = 4,
    workers_per_trial: int | None = None,
    max_concurrent: int | None = None,
    use_gpu: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "pep",
    early_stop: bool = True,
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    log_model: bool = True,
    overlays: int = 2,
    quiet: bool = False,
) -> SweepSummary:
    """Run (or with `resume`, continue) a Tune sweep; returns the leaderboard and best config.

    The data is resolved (generated / prepared into shards) once here, before Tune starts,
    so trials never prepare shards concurrently. `quiet`, in a local Ray started here: the
    console shows TrialProgress's line per ended trial and the libraries' warnings, not Tune's
    status tables or Ray Train's and Ray Data's INFO logs (see `cluster.init_ray`).
    """
    work_dir = Path(work_dir).resolve()
    workers = workers_per_trial or cfg.train.num_workers
    quiet = cluster.init_ray(num_cpus=cluster.local_cpus(run_cpus(cfg, workers)), quiet=quiet)
    storage_path = absolute_storage(storage_path or str(work_dir / "sweeps"))
    experiment_path = f"{storage_path.rstrip('/')}/{name}"

    if resume:
        spec = _resumed_spec(experiment_path, name, quiet)
    else:
        if run_directory_exists(storage_path, name):
            raise SweepExistsError(
                f"a sweep named {name!r} already exists in {storage_path}; pass --resume to "
                "continue it, or choose another --name"
            )
        splits = experiment.data_splits(data, cfg, work_dir)
        gpu = resolve_use_gpu(cfg.train.use_gpu if use_gpu is None else use_gpu)
        ranges = {k: tuple(map(float, v)) for k, v in (ranges or {}).items()}
        for weight in LOSS_WEIGHTS:
            ranges.setdefault(weight, DEFAULT_WEIGHT_RANGE)
        spec = SweepSpec(
            name=name,
            base_config=config_to_dict(cfg),
            data_root=storage.parent(splits.train_shards),
            work_dir=str(work_dir),
            storage_path=storage_path,
            tracking_uri=tracking.resolve_tracking_uri(tracking_uri, default_dir=work_dir),
            experiment_name=experiment_name,
            parent_run_id="",
            ranges=ranges,
            num_samples=num_samples,
            workers_per_trial=workers,
            max_concurrent=max_concurrent or default_max_concurrent(workers, gpu, cfg),
            use_gpu=gpu,
            early_stop=early_stop,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            log_model=log_model,
            overlays=overlays,
            seed=cfg.train.seed,
            quiet=quiet,
        )

    experiment_id = tracking.set_experiment(spec.experiment_name, spec.tracking_uri)
    client = mlflow.MlflowClient(spec.tracking_uri)
    if resume:
        spec.parent_run_id = spec.parent_run_id or (
            _find_parent_run(client, experiment_id, name) or ""
        )
    else:
        _start_parent(client, experiment_id, spec, experiment_path)
    logger.info(
        "sweep %s: %d trials, %d worker(s) each (gpu=%s), at most %d at once; MLflow parent %s",
        name,
        spec.num_samples,
        spec.workers_per_trial,
        spec.use_gpu,
        spec.max_concurrent,
        spec.parent_run_id,
    )

    # Per-epoch results carry the early-stopping metric and only the final result carries the
    # objective; Tune's strict check would reject the per-epoch ones for lacking the objective.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    status = "FAILED"
    client.update_run(spec.parent_run_id, status="RUNNING")
    try:
        results = _make_tuner(spec, restore=resume).fit()
        rows = collect_rows(results, spec, client)
        summary = _finish(spec, rows, client, work_dir)
        interrupted = any(r.status.startswith("unfinished") for r in rows)
        status = "KILLED" if interrupted else "FINISHED"
        return summary
    finally:
        client.set_terminated(spec.parent_run_id, status)


def _log_parent_setup(client: mlflow.MlflowClient, spec: SweepSpec) -> None:
    params = {
        "sweep.num_samples": spec.num_samples,
        "sweep.workers_per_trial": spec.workers_per_trial,
        "sweep.max_concurrent": spec.max_concurrent,
        "sweep.use_gpu": spec.use_gpu,
        "sweep.search_alg": "optuna-tpe",
        "sweep.scheduler": (
            f"asha({EARLY_STOP_METRIC}, grace={spec.grace_period}, rf={spec.reduction_factor:g})"
            if spec.early_stop
            else "fifo"
        ),
        "sweep.objective": OBJECTIVE,
        "sweep.score_thresholds": str(spec.base_config["eval"]["score_thresholds"]),
    }
    for weight, (low, high) in spec.ranges.items():
        params[f"sweep.range.{weight}"] = f"loguniform({low:g}, {high:g})"
    params.update(tracking.flatten(spec.base_config))
    for key, value in params.items():
        client.log_param(spec.parent_run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base_config.yaml"
        save_config(config_from_dict(spec.base_config), path)
        client.log_artifact(spec.parent_run_id, str(path))


def collect_rows(
    results: ray.tune.ResultGrid, spec: SweepSpec, client: mlflow.MlflowClient
) -> list[TrialRow]:
    """One leaderboard row per trial (best AP first; stopped and failed trials last)."""
    experiment = client.get_experiment_by_name(spec.experiment_name)
    children = {
        run.data.tags.get("ray_run_name"): run
        for run in client.search_runs(
            [experiment.experiment_id], f"tags.mlflow.parentRunId = '{spec.parent_run_id}'"
        )
    }
    # Tune's trial status tells an ASHA stop (TERMINATED without the objective) from a trial
    # that an interrupted sweep left unfinished.
    statuses = {t.path: t.status for t in ray.tune.ExperimentAnalysis(spec.experiment_path).trials}
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        final = result.metrics or {}
        if OBJECTIVE not in final and frame is not None and OBJECTIVE in frame:
            # the final report is normally the last result; fall back to the history
            done = frame.dropna(subset=[OBJECTIVE])
            final = done.iloc[-1].to_dict() if len(done) else final
        trial_id = final.get("trial_id")
        if not trial_id and frame is not None and "trial_id" in frame and len(frame):
            trial_id = str(frame["trial_id"].iloc[-1])
        trial_id = trial_id or Path(result.path).name  # a trial that never reported
        weights = {k: float(result.config[k]) for k in LOSS_WEIGHTS if k in result.config}
        epochs = 0
        if frame is not None and EPOCHS_DONE in frame:
            epochs = int(frame[EPOCHS_DONE].max())
        child = children.get(trial_run_name(spec.name, trial_id))
        row = TrialRow(trial_id, weights, "completed", epochs=epochs)
        row.run_id = child.info.run_id if child else None
        status = statuses.get(result.path, "TERMINATED")
        if result.error is not None or status == "ERROR":
            row.status = "error"
        elif status != "TERMINATED":
            row.status = f"unfinished ({status.lower()})"
        elif OBJECTIVE in final and final[OBJECTIVE] == final[OBJECTIVE]:
            row.best_ap = float(final[OBJECTIVE])
            row.best_threshold = float(final["best_threshold"])
            for t in spec.base_config["eval"]["score_thresholds"]:
                if threshold_key(t) in final:
                    row.ap_at_thresholds[float(t)] = float(final[threshold_key(t)])
        else:
            row.status = f"stopped early (epoch {epochs})"
        rows.append(row)
    rows.sort(key=lambda r: (r.best_ap is None, -(r.best_ap or 0.0), r.trial_id))
    return rows


def format_leaderboard(rows: list[TrialRow]) -> str:
    """Markdown table: trial, alpha..delta, best threshold, its segm AP (in %), status."""
    header = ["rank", "trial", *LOSS_WEIGHTS, "score thr", "segm AP", "epochs", "status"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for rank, row in enumerate(rows, 1):
        cells = [
            str(rank) if row.best_ap is not None else "-",
            row.trial_id,
            *(f"{row.weights.get(k, float('nan')):.3g}" for k in LOSS_WEIGHTS),
            "-" if row.best_threshold is None else f"{row.best_threshold:g}",
            "-" if row.best_ap is None else f"{100 * row.best_ap:.1f}",
            str(row.epochs),
            row.status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_config(spec: SweepSpec, row: TrialRow) -> Config:
    """The base config with the best trial's weights and score threshold."""
    cfg = apply_trial_values(spec.base_config, row.weights)
    cfg.model.score_threshold = float(row.best_threshold)
    return cfg


def _finish(
    spec: SweepSpec, rows: list[TrialRow], client: mlflow.MlflowClient, work_dir: Path
) -> SweepSummary:
    """Leaderboard, best config, parent-run artifacts; close the runs of stopped trials."""
    for row in rows:
        if row.run_id:  # also the runs of stopped trials, which never reached pep_trial's end
            client.set_tag(row.run_id, "tune_trial_id", row.trial_id)
            for key, value in row.weights.items():
                client.set_tag(row.run_id, f"search.{key}", f"{value:.6g}")
        if row.run_id and row.best_ap is None and not row.status.startswith("unfinished"):
            run = client.get_run(row.run_id)
            if run.info.status == "RUNNING":  # its trial actor was stopped or died
                client.set_tag(row.run_id, "sweep_status", row.status)
                client.set_terminated(row.run_id, "KILLED" if row.status != "error" else "FAILED")
    leaderboard = format_leaderboard(rows)
    out_dir = work_dir / "sweeps" / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "leaderboard.md").write_text(leaderboard + "\n")
    client.log_artifact(spec.parent_run_id, str(out_dir / "leaderboard.md"))
    best = rows[0] if rows and rows[0].best_ap is not None else None
    best_path = None
    if best is not None:
        best_path = out_dir / "best_config.yaml"
        save_config(best_config(spec, best), best_path)
        client.log_artifact(spec.parent_run_id, str(best_path))
        client.log_metric(spec.parent_run_id, OBJECTIVE, best.best_ap)
        client.log_metric(spec.parent_run_id, "best_threshold", best.best_threshold)
        for key, value in best.weights.items():
            client.set_tag(spec.parent_run_id, f"best.{key}", f"{value:.6g}")
        client.set_tag(spec.parent_run_id, "best_trial_id", best.trial_id)
        if best.run_id:
            client.set_tag(spec.parent_run_id, "best_run_id", best.run_id)
    counts = {
        "trials_completed": sum(r.best_ap is not None for r in rows),
        "trials_stopped": sum(r.status.startswith("stopped") for r in rows),
        "trials_failed": sum(r.status == "error" for r in rows),
        "trials_unfinished": sum(r.status.startswith("unfinished") for r in rows),
    }
    for key, value in counts.items():
        client.log_metric(spec.parent_run_id, key, value)
    return SweepSummary(
        name=spec.name,
        parent_run_id=spec.parent_run_id,
        tracking_uri=spec.tracking_uri,
        experiment_path=spec.experiment_path,
        rows=rows,
        best=best,
        best_config_path=str(best_path) if best_path else None,
        leaderboard=leaderboard,
    )
