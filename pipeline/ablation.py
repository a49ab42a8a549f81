"""The paper's Table 2 as an experiment: Baseline, +excavating, +purifying and PEP.

`run_ablation` trains and evaluates every variant x seed with the same data, config and
schedule (only `model.excavate`, `model.purify` and `train.seed` differ), each as one Ray
task that calls `experiment.train_and_evaluate` (its own TorchTrainer, Ray Data evaluation
and MLflow child run). The data is resolved once, in the driver, before any run starts.
`format_table` turns the outcomes into the paper's table: segm AP columns as mean ± std over
seeds, plus training time and inference time per image; below it, what each module is for:
recall at mask IoU 0.5 by how much of each object is visible (generated scenes), and the
duplicates and false merges left per image.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pep_model import Config, config_from_dict, config_to_dict, save_config
from pipeline import cli, cluster, evaluate, experiment, storage, tracking
from pipeline.devices import resolve_use_gpu
from pipeline.train import RunExistsError, run_cpus, run_directory_exists

logger = logging.getLogger(__name__)

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # segm metrics, as in Table 2
# segm metrics of the second table: (metric key, header, scale, digits)
_THR = f"thr{evaluate.COUNT_SCORE_THRESHOLD:g}"
RECALL_COLUMNS = (
    ("segm/R50", "R50", 100.0, 1),
    *(
        (f"segm/R50_vis_{b}", evaluate.VISIBILITY_LABELS[b], 100.0, 1)
        for b in evaluate.VISIBILITY_BINS
    ),
    (f"segm/duplicates_per_img_{_THR}", "duplicates/img", 1.0, 2),
    (f"segm/false_merges_per_img_{_THR}", "false merges/img", 1.0, 2),
)
SYSTEM_RETRIES = 1  # extra attempts of a run that Ray (not the run's own code) stopped


class AblationError(ValueError):
    """Arguments that make the ablation ill-defined (e.g. overriding a variant's switch)."""


@dataclass(frozen=True)
class Variant:
    """One row of Table 2: its label, a slug for tags/metrics/run names, and the switches."""

    label: str
    key: str
    excavate: bool
    purify: bool


VARIANTS = (
    Variant("Baseline", "baseline", excavate=False, purify=False),
    Variant("+excavating", "excavating", excavate=True, purify=False),
    Variant("+purifying", "purifying", excavate=False, purify=True),
    Variant("PEP", "pep", excavate=True, purify=True),
)
# What the ablation sets per run; a --set of these would make the variants identical.
CONTROLLED_KEYS = ("model.excavate", "model.purify", "train.seed")


@dataclass
class RunOutcome:
    """One variant x seed: its MLflow run and numbers, or why it failed."""

    variant: str  # Variant.key
    seed: int
    run_name: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # scalar_metrics (segm/..., bbox/...)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    eval_images: int = 0
    error: str | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def eval_ms_per_image(self) -> float:
        return 1000 * self.eval_seconds / max(1, self.eval_images)


@dataclass
class AblationResult:
    """All outcomes plus where they were recorded."""

    name: str
    parent_run_id: str
    tracking_uri: str
    seeds: list[int]
    max_parallel: int
    outcomes: list[RunOutcome]
    wall_seconds: float

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def table(self) -> str:
        return format_table(self.outcomes)


# ----------------------------------------------------------------------------- configs


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse --set of what the ablation controls per run (switches and seed)."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in CONTROLLED_KEYS:
            raise AblationError(
                f"--set {override}: {key} is set by the ablation for each run "
                "(variants set model.excavate/model.purify; use --seeds for train.seed)"
            )


def variant_config(base: Config, variant: Variant, seed: int) -> Config:
    """A copy of `base` with the variant's switches and the seed (nothing else changes)."""
    cfg = config_from_dict(config_to_dict(base))
    cfg.model.excavate = variant.excavate
    cfg.model.purify = variant.purify
    cfg.train.seed = seed
    return cfg


def parallel_runs(
    resources: dict[str, float], cfg: Config, num_workers: int, use_gpu: bool, validate: bool
) -> int:
    """How many runs fit side by side in `resources` (Ray's cluster_resources), at least 1.

    A run that cannot get its CPUs does not fail, it waits; more runs than fit would just
    queue inside Ray Data/Train (or starve Ray Data's decode tasks: training then hangs).
    """
    fits = math.floor(resources.get("CPU", 0) / run_cpus(cfg, num_workers, validate))
    if use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / num_workers))
    return max(1, fits)


def init_ray(
    cfg: Config,
    num_workers: int,
    validate: bool,
    max_parallel: int | None,
    num_runs: int,
    quiet: bool = False,
) -> tuple[int | None, bool]:
    """Join RAY_ADDRESS's cluster, or start a local Ray that holds `max_parallel` runs.

    Locally the default is one run per `num_workers x train.cpus_per_worker` cores: a run's
    workers use that many cores (torch threads) while the run holds a little more in
    logical CPUs (see `pipeline.train.run_cpus`); on 2 cores, two 1-CPU runs side by side
    finished in 177 s against 254 s one after the other (measured under load).
    Returns the parallelism to use and whether the local Ray is quiet (`cluster.init_ray`).
    """
    if os.environ.get("RAY_ADDRESS"):
        cluster.init_ray()  # e.g. under `ray job submit`
        return max_parallel, False
    parallel, logical = local_ray_size(
        cfg, num_workers, validate, max_parallel, num_runs, os.cpu_count() or 1
    )
    return parallel, cluster.init_ray(num_cpus=logical, quiet=quiet)


def local_ray_size(
    cfg: Config,
    num_workers: int,
    validate: bool,
    max_parallel: int | None,
    num_runs: int,
    cores: int,
) -> tuple[int, int]:
    """(runs side by side, logical CPUs) for a local Ray on `cores` cores (see `init_ray`)."""
    parallel = min(
        max_parallel or max(1, cores // (num_workers * cfg.train.cpus_per_worker)), num_runs
    )
    return parallel, max(cores, math.ceil(parallel * run_cpus(cfg, num_workers, validate)))


# ----------------------------------------------------------------------------- one run


def is_system_failure(error: BaseException) -> bool:
    """True when Ray stopped the run (controller, node or process death), not the run's code.

    Such runs are worth one more attempt (e.g. a training worker killed because Ray Train's
    placement-group cleaner took its live controller for dead, see `run_ablation`).
    """
    cause = getattr(error, "cause", None) or error
    system = (ray.train.ControllerError, ray.exceptions.RayActorError)
    return isinstance(cause, system) or isinstance(
        error, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
    )


def _error_text(error: BaseException) -> str:
    """`Type: message` of the exception that ended a run (unwrapping Ray's task error)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


@ray.remote(num_cpus=0, max_retries=0)
def _run_variant(config: dict[str, Any], run_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ray task: one variant x seed through `train_and_evaluate` (it reserves its own CPUs).

    num_cpus=0: the task only waits on its TorchTrainer and evaluation, which hold the
    resources; max_retries=0: `_run_all` retries itself, resuming the run (a plain task
    retry would start over and collide with the run's own storage directory).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if kwargs.get("quiet"):
        cli.quiet_library_logs()
    summary = experiment.train_and_evaluate(config_from_dict(config), name=run_name, **kwargs)
    return {
        "run_id": summary.run_id,
        "metrics": evaluate.scalar_metrics(summary.metrics),
        "train_seconds": summary.train_seconds,
        "eval_seconds": summary.eval_seconds,
        "eval_images": summary.eval_images,
    }


def run_name(name: str, variant: Variant, seed: int) -> str:
    """The Ray Train run name (and MLflow child run name) of one variant x seed."""
    return f"{name}-{variant.key}-s{seed}"


def _child_run_id(client: mlflow.MlflowClient, experiment_id: str, parent: str, name: str):
    runs = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.ray_run_name = '{name}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# ----------------------------------------------------------------------------- the matrix


def _check_arguments(seeds: Sequence[int], max_parallel: int | None) -> None:
    if not seeds:
        raise AblationError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise AblationError(f"--seeds {list(seeds)}: seeds repeat")
    if max_parallel is not None and max_parallel < 1:
        raise AblationError(f"--max-parallel {max_parallel}: must be at least 1")


def _runs_at_a_time(
    base: Config,
    num_workers: int,
    gpu: bool,
    validate: bool,
    max_parallel: int | None,
    num_runs: int,
) -> int:
    """`max_parallel`, or as many runs as the cluster holds (`parallel_runs`), never more."""
    fits = parallel_runs(ray.cluster_resources(), base, num_workers, gpu, validate)
    if max_parallel and max_parallel > fits:
        logger.warning(
            "--max-parallel %d: the cluster holds %d run(s) of %g CPUs at a time; running %d "
            "(more would take the CPUs Ray Data needs to feed the trainers: they would hang)",
            max_parallel,
            fits,
            run_cpus(base, num_workers, validate),
            fits,
        )
    return min(max_parallel or fits, fits, num_runs)


def _refuse_taken_names(storage_path: str, name: str, runs: list[tuple[Variant, int]]) -> None:
    taken = [
        run_name(name, v, s)
        for v, s in runs
        if run_directory_exists(storage_path, run_name(name, v, s))
    ]
    if taken:
        raise RunExistsError(
            f"ablation {name!r}: run(s) {taken} already exist in {storage_path}; choose another "
            "--name"
        )


def _collect(
    outcomes: list[RunOutcome], client: mlflow.MlflowClient, experiment_id: str, parent_id: str
) -> None:
    """Each outcome's child run (found by name when the run died before reporting it),
    tagged with its variant, seed and error."""
    for outcome in outcomes:
        outcome.run_id = outcome.run_id or _child_run_id(
            client, experiment_id, parent_id, outcome.run_name
        )
        if outcome.run_id:
            client.set_tag(outcome.run_id, "variant", outcome.variant)
            client.set_tag(outcome.run_id, "seed", str(outcome.seed))
            if outcome.error:
                client.set_tag(outcome.run_id, "error", outcome.error[:5000])


def run_ablation(
    base: Config,
    *,
    seeds: Sequence[int] = (0,),
    data: str | None = None,
    work_dir: str | Path = "work",
    storage_path: str | None = None,
    name: str | None = None,
    num_workers: int | None = None,
    use_gpu: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "pep-ablation",
    max_parallel: int | None = None,
    variants: Sequence[Variant] = VARIANTS,
    validate: bool = True,
    log_model: bool = False,
    overlays: int = 4,
    quiet: bool = False,
) -> AblationResult:
    """Train and evaluate every variant x seed; one MLflow parent run with a child per run.

    `max_parallel=None` runs as many side by side as the cluster's CPUs/GPUs hold (see
    `parallel_runs`; a local Ray started here is sized for one run per `num_workers` cores,
    see `init_ray`). A failed run is recorded (table, JSON, its child run tagged `error`)
    and the others go on. `quiet`, in a local Ray started here: a line per started and ended
    run and the libraries' warnings, not Ray Train's and Ray Data's INFO logs.
    """
    start = time.perf_counter()
    _check_arguments(seeds, max_parallel)
    work_dir = Path(work_dir).resolve()
    num_workers = num_workers or base.train.num_workers
    runs = [(v, s) for v in variants for s in seeds]
    if not ray.is_initialized():
        max_parallel, quiet = init_ray(base, num_workers, validate, max_parallel, len(runs), quiet)
    else:
        quiet = False  # a Ray started elsewhere keeps its own logging
    splits, shards_root = _shared_data(data, base, work_dir)  # once, before any run
    base = config_from_dict(config_to_dict(base))  # a copy: the caller's config stays as it is
    base.model.num_classes = splits.categories.num_classes  # as every run will (from the data)
    gpu = resolve_use_gpu(base.train.use_gpu if use_gpu is None else use_gpu)
    max_parallel = _runs_at_a_time(base, num_workers, gpu, validate, max_parallel, len(runs))
    name = name or time.strftime("ablation-%Y%m%d-%H%M%S")
    storage_path = storage_path or str(work_dir / "runs")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    _refuse_taken_names(storage_path, name, runs)
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri, default_dir=work_dir)
    experiment_id = tracking.set_experiment(experiment_name, tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)

    parent = mlflow.start_run(
        run_name=name,
        tags={
            "ablation": "table2",
            "git_commit": tracking.git_commit(),
            "data_fingerprint": splits.fingerprint,
            "data_source": splits.source,
        },
    )
    parent_id = parent.info.run_id
    status = "FAILED"
    try:
        _log_setup(base, seeds, variants, max_parallel, num_workers, gpu, shards_root)
        logger.info(
            "ablation %s: %d variants x %d seeds on %s, %d at a time",
            name,
            len(variants),
            len(seeds),
            shards_root,
            max_parallel,
        )
        kwargs = {
            "data": str(shards_root),
            "work_dir": str(work_dir),
            "storage_path": storage_path,
            "num_workers": num_workers,
            "use_gpu": use_gpu,
            "tracking_uri": tracking_uri,
            "experiment_name": experiment_name,
            "parent_run_id": parent_id,
            "validate": validate,
            "log_model": log_model,
            "overlays": overlays,
            "quiet": quiet,
        }
        outcomes = _run_all(runs, base, name, kwargs, max_parallel, options=_run_options())
        _collect(outcomes, client, experiment_id, parent_id)
        result = AblationResult(
            name=name,
            parent_run_id=parent_id,
            tracking_uri=tracking_uri,
            seeds=list(seeds),
            max_parallel=max_parallel,
            outcomes=outcomes,
            wall_seconds=time.perf_counter() - start,
        )
        _log_parent(result, variants)
        status = "FINISHED" if not result.failed else "FAILED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def _shared_data(
    data: str | None, base: Config, work_dir: Path
) -> tuple[experiment.DataSplits, str]:
    """The data every run trains on (prepared once), and the shards root passed to them."""
    splits = experiment.resolve_data(data, base, work_dir)
    shards_root = storage.parent(splits.train_shards)
    if storage.parent(splits.val_shards) != shards_root:
        raise experiment.DataError(
            f"{splits.train_shards} and {splits.val_shards}: train/ and val/ shards must share "
            "one root to be passed to the runs"
        )
    return splits, shards_root


def _log_setup(
    base: Config,
    seeds: Sequence[int],
    variants: Sequence[Variant],
    max_parallel: int,
    num_workers: int,
    gpu: bool,
    shards_root: str,
) -> None:
    """The parent run's params and the base config (as `config.yaml`)."""
    mlflow.log_params(
        {
            "seeds": " ".join(map(str, seeds)),
            "variants": " ".join(v.key for v in variants),
            "max_parallel": max_parallel,
            "num_workers": num_workers,
            "use_gpu": gpu,
            "data": str(shards_root),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_config(base, Path(tmp) / "config.yaml")
        mlflow.log_artifact(str(Path(tmp) / "config.yaml"))


def _run_options() -> dict[str, Any]:
    """Ray options of the runs' tasks.

    Ray Train's placement-group cleaner finds "its" cluster through RAY_ADDRESS or, when
    unset, by scanning this machine for Ray instances: with several on one machine it may ask
    another cluster, miss its live controller and remove the run's placement group. Runs (and
    the actors they start) get the address of this cluster. The runs' drivers stay on this
    node, like train_pep's: local paths (work dir, SQLite store) mean the same to them as to
    this process; their training workers go anywhere.
    """
    context = ray.get_runtime_context()
    return {
        "runtime_env": {"env_vars": {"RAY_ADDRESS": context.gcs_address}},
        "scheduling_strategy": NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False),
    }


def _run_all(
    runs: list[tuple[Variant, int]],
    base: Config,
    name: str,
    kwargs: dict[str, Any],
    max_parallel: int,
    task: Any = _run_variant,
    options: dict[str, Any] | None = None,
) -> list[RunOutcome]:
    """Run `task` (a Ray remote function, with Ray `options`), `max_parallel` at a time.

    Every run ends with numbers or with the error that stopped it. A run that Ray stopped
    (`is_system_failure`) is tried again, continuing its MLflow run and last checkpoint.
    """
    outcomes = [RunOutcome(v.key, s, run_name(name, v, s)) for v, s in runs]
    pending = list(range(len(runs)))
    running: dict[ray.ObjectRef, int] = {}
    try:
        while pending or running:
            while pending and len(running) < max_parallel:
                index = pending.pop(0)
                variant, seed = runs[index]
                outcome = outcomes[index]
                cfg = variant_config(base, variant, seed)
                resume = {"resume": True} if outcome.attempts else {}
                ref = task.options(**(options or {})).remote(
                    config_to_dict(cfg), outcome.run_name, kwargs | resume
                )
                outcome.attempts += 1
                running[ref] = index
                logger.info("started %s (attempt %d)", outcome.run_name, outcome.attempts)
            (done,), _ = ray.wait(list(running), num_returns=1)
            index = running.pop(done)
            outcome = outcomes[index]
            try:
                values = ray.get(done)
            except Exception as e:  # noqa: BLE001 - any failure of a run is reported, not raised
                if is_system_failure(e) and outcome.attempts <= SYSTEM_RETRIES:
                    logger.warning("%s stopped by Ray, trying again: %s", outcome.run_name, e)
                    pending.insert(0, index)
                    continue
                outcome.error = _error_text(e)
                logger.error("%s failed: %s", outcome.run_name, outcome.error)
                continue
            outcome.error = None
            outcome.run_id = values["run_id"]
            outcome.metrics = values["metrics"]
            outcome.train_seconds = values["train_seconds"]
            outcome.eval_seconds = values["eval_seconds"]
            outcome.eval_images = values["eval_images"]
            ended = [o for o in outcomes if o.run_id is not None and o.ok]
            best = max(ended, key=lambda o: o.metrics.get("segm/AP", -1))
            logger.info(
                "finished %s: segm AP %.3f (%d/%d runs done; best so far %s %.3f)",
                outcome.run_name,
                outcome.metrics.get("segm/AP", -1),
                len(ended),
                len(outcomes),
                best.run_name,
                best.metrics.get("segm/AP", -1),
            )
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    return outcomes


# ----------------------------------------------------------------------------- reporting


def _valid(values: Sequence[float]) -> list[float]:
    """COCOeval's -1 (no ground truth in that area range) is not a value to average."""
    return [v for v in values if v is not None and v >= 0]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std None for fewer than 2 values."""
    if not values:
        return None, None
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def variant_summary(outcomes: Sequence[RunOutcome]) -> dict[str, dict[str, float | None]]:
    """Mean/std over the successful seeds of one variant, per metric (segm in [0,1], seconds)."""
    ok = [o for o in outcomes if o.ok]
    keys = [f"segm/{c}" for c in COLUMNS] + [key for key, *_ in RECALL_COLUMNS]
    values = {key: _valid([o.metrics.get(key, -1) for o in ok]) for key in keys}
    values["train_s"] = [o.train_seconds for o in ok]
    values["eval_ms_per_image"] = [o.eval_ms_per_image for o in ok]
    out = {}
    for key, vals in values.items():
        mean, std = mean_std(vals)
        out[key] = {"mean": mean, "std": std, "n": len(vals)}
    return out


def format_table(outcomes: Sequence[RunOutcome], variants: Sequence[Variant] = VARIANTS) -> str:
    """Markdown table like the paper's Table 2 (segm, %), mean ± std over seeds, with times.

    A variant whose runs all failed shows `failed: <reason>`; a partly failed one is
    averaged over the seeds that finished and says how many did. Failures are listed below.
    """
    header = ["", "segm AP", "AP50", "AP75", "APs", "APm", "APl", "train s", "infer ms/img"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    failures = []
    seeds = sorted({o.seed for o in outcomes})
    for variant in variants:
        mine = [o for o in outcomes if o.variant == variant.key]
        if not mine:
            continue
        ok = [o for o in mine if o.ok]
        failures += [o for o in mine if not o.ok]
        label = variant.label
        if not ok:
            reason = mine[0].error or ""
            cells = [f"failed: {reason[:120]}"] + [""] * (len(header) - 2)
            lines.append("| " + " | ".join([label] + cells) + " |")
            continue
        if len(ok) < len(mine):
            label += f" ({len(ok)}/{len(mine)} seeds)"
        cells = [_cell(_valid([o.metrics.get(f"segm/{c}", -1) for o in ok])) for c in COLUMNS]
        cells.append(_cell([o.train_seconds for o in ok], scale=1.0, digits=0))
        cells.append(_cell([o.eval_ms_per_image for o in ok], scale=1.0, digits=1))
        lines.append("| " + " | ".join([label] + cells) + " |")
    seeds_text = ", ".join(map(str, seeds))
    lines += [
        "",
        f"segm mask AP in % on the val split; seeds {seeds_text}"
        + (" (mean ± sample std)" if len(seeds) > 1 else "")
        + "; train s = Ray Train fit wall time (validation beside it included); "
        "infer ms/img = final evaluation wall time (Ray Data inference + COCOeval) per val "
        "image, model replica start-up included (it dominates on small val sets). Runs that "
        "share a machine slow each other down: compare times only between runs made with the "
        "same --max-parallel.",
        "",
        *_recall_table(outcomes, variants),
    ]
    if failures:
        lines += ["", "Failed runs:"]
        lines += [f"- {o.run_name} (seed {o.seed}): {o.error}" for o in failures]
    return "\n".join(lines)


def _recall_table(outcomes: Sequence[RunOutcome], variants: Sequence[Variant]) -> list[str]:
    """What each module is for: recall at mask IoU 0.5 (%) by visibility, and the duplicates
    and false merges per image (`evaluate.recall_by_visibility`, `count_duplicates_and_merges`).
    """
    ok_all = [o for o in outcomes if o.ok]
    header = [""]
    for key, label, *_ in RECALL_COLUMNS:
        counts = {o.metrics.get(key.replace("/R50_vis_", "/n_vis_")) for o in ok_all}
        if "/R50_vis_" in key and len(counts) == 1 and None not in counts:
            label += f" (n={counts.pop():.0f})"  # objects in the bin (one val set for all)
        header.append(label)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for variant in variants:
        mine = [o for o in outcomes if o.variant == variant.key]
        ok = [o for o in mine if o.ok]
        if not mine:
            continue
        cells = [
            _cell(_valid([o.metrics.get(key, -1) for o in ok]), scale, digits) if ok else "failed"
            for key, _, scale, digits in RECALL_COLUMNS
        ]
        lines.append("| " + " | ".join([variant.label] + cells) + " |")
    lines += [
        "",
        "R50: % of the val objects that COCOeval matches at mask IoU 0.5 (maxDets 100); vis: "
        "by the share of each object left visible by the objects drawn over it (the generated "
        "scenes' `visible_fraction`, n objects per bin; '-' for data without it). "
        f"duplicates / false merges per val image among predictions scored >= "
        f"{evaluate.COUNT_SCORE_THRESHOLD:g}: a second prediction on an object already found, "
        "one prediction covering half or more of each of two or more objects.",
    ]
    return lines


def _log_parent(result: AblationResult, variants: Sequence[Variant]) -> None:
    """The table (`ablation.md`), all numbers (`ablation.json`) and summary metrics."""
    summary = {}
    metrics: dict[str, float] = {
        "failed_runs": len(result.failed),
        "wall_s": result.wall_seconds,
    }
    for variant in variants:
        mine = [o for o in result.outcomes if o.variant == variant.key]
        summary[variant.key] = variant_summary(mine)
        for key, stats in summary[variant.key].items():
            name = key.replace("/", "_")
            if stats["mean"] is not None:
                metrics[f"{variant.key}/{name}"] = stats["mean"]
            if stats["std"] is not None:
                metrics[f"{variant.key}/{name}_std"] = stats["std"]
    document = {
        "name": result.name,
        "seeds": result.seeds,
        "max_parallel": result.max_parallel,
        "wall_seconds": result.wall_seconds,
        "variants": [asdict(v) for v in variants],
        "summary": summary,
        "runs": [asdict(o) | {"eval_ms_per_image": o.eval_ms_per_image} for o in result.outcomes],
    }
    mlflow.log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ablation.md").write_text(result.table() + "\n")
        (Path(tmp) / "ablation.json").write_text(json.dumps(document, indent=1))
        mlflow.log_artifact(str(Path(tmp) / "ablation.md"))
        mlflow.log_artifact(str(Path(tmp) / "ablation.json"))
