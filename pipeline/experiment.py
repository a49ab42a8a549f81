"""One PEP experiment end to end: data -> shards -> Ray Train -> COCO AP -> MLflow.

`train_and_evaluate` is what `jobs/train_pep.py` runs (and what the sweep and ablation jobs
call per trial): it resolves the data (generating the crowded-scenes default when needed),
prepares or reuses shards, opens an MLflow run, trains with validation beside training,
evaluates the last checkpoint on the val split, and logs the AP table, artifacts and a
loadable model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import ray
import torch
from PIL import Image

from pep_model import Config, config_to_dict, load_checkpoint, save_config
from pipeline import (
    cluster,
    evaluate,
    inference,
    progress,
    reader,
    storage,
    synth,
    tracking,
    visualize,
)
from pipeline.coco import CategoryMap, decode_rles
from pipeline.devices import resolve_use_gpu
from pipeline.prepare import PrepareConfig, PrepareError, ground_truth, prepare, read_manifest
from pipeline.train import CHECKPOINT_FILE, VALIDATION_CPUS, run_cpus, run_training

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """--data points at something that is neither shards nor a COCO folder."""


@dataclass
class DataSplits:
    """Prepared train/val shards plus what evaluation needs."""

    train_shards: str
    val_shards: str
    val_annotations: str  # the val split's COCO JSON (ground truth; a URI beside cloud shards)
    categories: CategoryMap
    fingerprint: str  # identifies the evaluation set (val source fingerprint)
    source: str


# ----------------------------------------------------------------------------- data


def _prepare_split(annotations: Path, images: Path, out: Path, max_size: int) -> str:
    result = prepare(annotations, images, out, PrepareConfig(max_size=max_size))
    counts = result.manifest["counts"]
    logger.info(
        "%s shards %s: %d images (%d rejected), %d annotations (%d rejected)",
        "reused" if result.reused else "built",
        out,
        counts["images_written"],
        counts["images_rejected"],
        counts["annotations_written"],
        counts["annotations_rejected"],
    )
    return str(out)


def resolve_data(data: str | None, cfg: Config, work_dir: str | Path) -> DataSplits:
    """Shards for train/val from `--data` (shards root or COCO folder) or the generated default.

    - None: the crowded-scenes generator writes `work_dir/data/crowded-...` once.
    - a folder with `train/manifest.json` and `val/manifest.json`: used as is; also a URI
      (`s3://bucket/shards`, shards written there by `prepare_coco.py --out s3://...`).
    - a COCO folder with `train/annotations.json` + `train/images` (and `val/`): prepared
      into `work_dir/shards/<name>-<max_size>/{train,val}` (reused when unchanged).
    """
    work_dir = Path(work_dir).resolve()
    if data is None:
        d = cfg.data
        scene = "".join(
            [
                f"-objects{d.generated_max_objects}"
                if d.generated_max_objects != synth.MAX_OBJECTS
                else "",
                f"-scale{d.generated_object_scale:g}" if d.generated_object_scale != 1.0 else "",
                f"-{d.generated_scene}" if d.generated_scene != "shapes" else "",
            ]
        )
        name = f"crowded-{d.generated_images}x{d.generated_size}{scene}-seed{cfg.train.seed}"
        root = work_dir / "data" / name
        if not synth.is_current(root):  # absent, or from an older generator version
            logger.info("generating the crowded-scenes dataset in %s", root)
            synth.make_dataset(
                root,
                images=d.generated_images,
                size=d.generated_size,
                seed=cfg.train.seed,
                val_fraction=d.val_fraction,
                object_scale=d.generated_object_scale,
                max_objects=d.generated_max_objects,
                scene=d.generated_scene,
            )
        data_path = root
    elif storage.is_uri(data):
        return _remote_splits(data.rstrip("/"))
    else:
        data_path = Path(data).resolve()
    if (data_path / "train" / "manifest.json").is_file():
        train, val = data_path / "train", data_path / "val"
        if not (val / "manifest.json").is_file():
            raise DataError(f"{data_path}: has train/ shards but no val/ shards (manifest.json)")
    elif (data_path / "train" / "annotations.json").is_file():
        out = work_dir / "shards" / f"{data_path.name}-{cfg.data.max_size}"
        for split in ("train", "val"):
            if not (data_path / split / "annotations.json").is_file():
                raise DataError(f"{data_path / split}: no annotations.json")
            _prepare_split(
                data_path / split / "annotations.json",
                data_path / split / "images",
                out / split,
                cfg.data.max_size,
            )
        train, val = out / "train", out / "val"
    else:
        raise DataError(
            f"{data_path}: expected shards (train/manifest.json, val/manifest.json) or a COCO "
            "folder (train/annotations.json + train/images, val/...)"
        )
    return _splits(str(train), str(val), str(data_path))


def _splits(train: str, val: str, source: str) -> DataSplits:
    val_manifest = read_manifest(val)
    return DataSplits(
        train_shards=train,
        val_shards=val,
        val_annotations=ground_truth(val, val_manifest),
        categories=CategoryMap.from_dict(val_manifest["categories"]),
        fingerprint=val_manifest["source"]["fingerprint"],
        source=source,
    )


def _remote_splits(data: str) -> DataSplits:
    """train/ and val/ shards under a URI; a COCO folder there is refused (prepare it)."""
    train, val = storage.join(data, "train"), storage.join(data, "val")
    for split in (train, val):
        try:
            read_manifest(split)
        except PrepareError as e:
            raise DataError(
                f"{data}: expected train/ and val/ shards there ({e}); a COCO folder on cloud "
                "storage is not read directly: shard it with `jobs/prepare_coco.py --out "
                f"{split}`"
            ) from None
    return _splits(train, val, data)


# ----------------------------------------------------------------------------- validation


def validate_checkpoint(
    checkpoint: ray.train.Checkpoint,
    val_shards: str,
    val_annotations: str,
    max_dets: int,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    use_gpu: bool = False,
    max_images: int = 0,
) -> dict[str, float]:
    """Ray Train validation function: segm/bbox AP of one checkpoint on the val split.

    Runs as a separate Ray task beside the training workers (Ray Train's ValidationConfig),
    so training does not wait for it; logs `val/...` metrics at the checkpoint's epoch.
    `use_gpu`: the task was given a GPU (it asks for one when training runs on GPUs); else it
    runs on its CPU on purpose. `max_images`: validate on the first that many val images.
    A failure is recorded before it is re-raised (`record_validation_failure`).
    """
    epoch = checkpoint_epoch(checkpoint.path)
    try:
        with checkpoint.as_directory() as ckpt_dir:
            path = Path(ckpt_dir) / CHECKPOINT_FILE
            if epoch < 0:  # not a checkpoint_epoch_<i> directory: read it (the whole file)
                epoch = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
            metrics = inference.evaluate_checkpoint_local(
                path,
                val_shards,
                val_annotations,
                max_dets=max_dets,
                use_gpu=use_gpu,
                max_images=max_images or None,
            )
    except Exception as e:
        record_validation_failure(run_id, tracking_uri, epoch, f"{type(e).__name__}: {e}")
        raise
    scalars = validation_scalars(metrics, epoch)
    if run_id and tracking_uri:
        tracking.log_metrics_safely(run_id, scalars, step=epoch, tracking_uri=tracking_uri)
    return scalars


VALIDATION_FAILED = progress.VAL_FAILED


def checkpoint_epoch(path: str) -> int:
    """The epoch (0-based) in a `checkpoint_epoch_0003`-style directory name, else -1."""
    digits = Path(path).name.rpartition("_")[2]
    return int(digits) if digits.isdigit() else -1


def record_validation_failure(
    run_id: str | None, tracking_uri: str | None, epoch: int, reason: str
) -> None:
    """Say that a validation failed: an error line, and on the MLflow run `val/failed` = 1 at
    the epoch plus a `validation_failed.epoch_<i>` tag with the reason (epochs from 1), which
    the driver's progress lines show."""
    logger.error("validation of epoch %d failed: %s", epoch + 1, reason)
    if not (run_id and tracking_uri):
        return
    tracking.log_metrics_safely(
        run_id, {VALIDATION_FAILED: 1}, step=epoch, tracking_uri=tracking_uri
    )
    try:
        mlflow.MlflowClient(tracking_uri).set_tag(
            run_id, f"validation_failed.epoch_{epoch + 1}", reason[:4000]
        )
    except Exception as e:  # noqa: BLE001 - tracking must not hide the failure itself
        logger.warning("could not tag MLflow run %s: %s", run_id, e)


def expected_validation_epochs(cfg: Config, validate_last: bool) -> list[int]:
    """The epochs (0-based) whose checkpoints a validation task scores."""
    every = max(cfg.eval.every_epochs, 1)
    last = cfg.train.epochs - 1
    epochs = [e for e in range(cfg.train.epochs) if (e + 1) % every == 0 or e == last]
    return [e for e in epochs if e != last or validate_last]


def validation_scalars(metrics: dict[str, Any], epoch: int) -> dict[str, float]:
    """The `val/...` metrics of one checkpoint's evaluation, logged at its epoch."""
    scalars = {f"val/{k}": v for k, v in evaluate.scalar_metrics(metrics).items()}
    scalars["val/epoch"] = epoch
    return scalars


def validation_config(
    cfg: Config, splits: DataSplits, gpu: bool, mlflow_run: tuple[str, str]
) -> ray.train.v2.api.validation_config.ValidationConfig:
    """Ray Train's validation beside training: `validate_checkpoint` as a task holding a GPU
    of its own when training uses GPUs (`gpu`), else the CPU on purpose."""
    run_id, tracking_uri = mlflow_run
    return ray.train.v2.api.validation_config.ValidationConfig(
        fn=validate_checkpoint,
        task_config=ray.train.v2.api.validation_config.ValidationTaskConfig(
            fn_kwargs={
                "val_shards": splits.val_shards,
                "val_annotations": splits.val_annotations,
                "max_dets": cfg.eval.max_dets,
                "run_id": run_id,
                "tracking_uri": tracking_uri,
                "use_gpu": gpu,
                "max_images": cfg.eval.val_images,
            }
        ),
        # "DEFAULT": outside any placement group; inside a Tune trial (whose placement group
        # captures child tasks) the task would not fit the trial's bundle.
        ray_remote_kwargs={
            "num_cpus": VALIDATION_CPUS,
            "num_gpus": 1 if gpu else 0,
            "scheduling_strategy": "DEFAULT",
        },
    )


def final_evaluation_validates(cfg: Config) -> bool:
    """True when the final evaluation of the last checkpoint gives exactly what a validation
    of it would: validation predicts at the model's `score_threshold`, the final evaluation at
    the lowest of `eval.score_thresholds` (same `max_dets`, val split and checkpoint). Then
    the last epoch needs no validation task; its `val/...` metrics come from the final
    evaluation."""
    thresholds = cfg.eval.score_thresholds
    same_threshold = not thresholds or min(thresholds) == cfg.model.score_threshold
    return same_threshold and not cfg.eval.val_images  # validation on a subset differs


# ----------------------------------------------------------------------------- experiment


@dataclass
class ExperimentSummary:
    """What a finished experiment produced (printed by the job)."""

    run_id: str
    tracking_uri: str
    checkpoint: str
    metrics: dict[str, Any]
    thresholds: dict[float, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0  # whole experiment, data preparation included
    train_seconds: float = 0.0  # Ray Train fit (validation beside it included)
    eval_seconds: float = 0.0  # final distributed inference + COCOeval on the val split
    eval_images: int = 0
    model_uri: str | None = None
    unvalidated_epochs: list[int] = field(default_factory=list)  # failed or missing, from 1

    def report(self) -> str:
        lines = [
            "",
            evaluate.format_ap_table(self.metrics),
        ]
        recall = evaluate.format_recall_table(self.metrics)
        if recall:
            lines += ["", "Recall (%) at mask IoU 0.5 by visibility:", "", recall]
        if self.thresholds:
            lines += ["", "AP per score threshold (one inference pass):", ""]
            lines.append(evaluate.format_threshold_table(self.thresholds))
        ui = self.tracking_uri
        lines += [
            "",
            f"MLflow run:  {self.run_id}",
            f"model:       {self.model_uri}",
            f"checkpoint:  {self.checkpoint}",
        ]
        if self.unvalidated_epochs:
            lines.append(
                "NOT VALIDATED: epoch(s) "
                + ", ".join(str(e) for e in self.unvalidated_epochs)
                + " (their validation failed; reasons in the log and the run's tags)"
            )
        lines += [
            f"took:        {self.seconds:.0f} s (training {self.train_seconds:.0f} s, "
            f"evaluation {self.eval_seconds:.0f} s)",
            f"look:        mlflow ui --backend-store-uri {ui}",
        ]
        return "\n".join(lines)


OVERLAY_MIN_SIZE = 384  # small images are drawn upscaled to this longer side
# Val splits up to this many images are evaluated in the driver's process: starting Ray Data
# and a model replica costs more than their inference (issue 17: 8 images, 15.2 s through a
# replica, ~2 s here). Larger ones go to `eval.num_replicas` Ray Data replicas.
EVAL_IN_PROCESS_MAX_IMAGES = 100


def display_threshold(metrics: dict[str, Any], model_threshold: float) -> tuple[float, str]:
    """The score threshold overlays are drawn at, and how it was chosen: the one that
    maximised F1 on val (`evaluate.best_f1_threshold`), else the model's own."""
    if "segm/F1_threshold" in metrics:
        return float(metrics["segm/F1_threshold"]), "best F1 on val"
    return float(model_threshold), "model.score_threshold"


def _overlays(
    checkpoint: str,
    val_shards: str,
    categories: CategoryMap,
    out_dir: Path,
    n: int,
    metrics: dict[str, Any],
) -> list[Path]:
    """Ground truth beside the predictions on the first `n` val images (PNG files in
    `out_dir`), upscaled by an integer factor when small so that the captions are readable.

    The drawing keeps the predictions scoring >= `display_threshold` of the final
    evaluation's `metrics` (its value and origin are in the panel's title); every prediction,
    down to the model's own threshold, goes to `overlay_<image_id>.json` beside it (COCO
    results: category, score, bbox, RLE)."""
    model, cfg = load_checkpoint(checkpoint)
    score_min, origin = display_threshold(metrics, cfg.model.score_threshold)
    to_coco = {k + 1: categories.to_coco(k + 1) for k in range(categories.num_classes)}
    model.eval()
    names = {k + 1: name for k, name in enumerate(categories.names)}
    columns = ["image_id", "image", "height", "width", "labels", "boxes", "iscrowd", "masks"]
    first = storage.open_parquet(reader.shard_files(val_shards)[0])
    table = first.read_row_group(0, columns=columns).slice(0, n)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in table.to_pylist():
        image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        scale = visualize.upscale_factor(row["height"], row["width"], OVERLAY_MIN_SIZE)
        keep = [k for k, crowd in enumerate(row["iscrowd"]) if not crowd]
        truth = visualize.draw_overlay(
            image,
            decode_rles([row["masks"][k] for k in keep], row["height"], row["width"]) > 0,
            [row["labels"][k] for k in keep],
            None,
            np.array([row["boxes"][k] for k in keep], dtype=np.float64).reshape(-1, 4),
            names,
            scale=scale,
        )
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            (pred,) = model([tensor])
        shown = (pred["scores"] >= score_min).numpy()
        predicted = visualize.draw_overlay(
            image,
            pred["masks"].numpy()[shown],
            pred["labels"].numpy()[shown].tolist(),
            pred["scores"].numpy()[shown].tolist(),
            pred["boxes"].numpy()[shown],
            names,
            scale=scale,
        )
        panels = {
            f"ground truth ({len(keep)})": truth,
            f"prediction ({int(shown.sum())}), score >= {score_min:.2f}, {origin}": predicted,
        }
        path = out_dir / f"overlay_{row['image_id']}.png"
        visualize.side_by_side(panels).save(path)
        everything = evaluate.predictions_to_coco_results(
            [pred], [row["image_id"]], [(row["height"], row["width"])], to_coco
        )
        record = {"display_threshold": score_min, "from": origin, "predictions": everything}
        path.with_suffix(".json").write_text(json.dumps(record))
        paths += [path, path.with_suffix(".json")]
    return paths


def _input_example(val_shards: str) -> pd.DataFrame:
    """One encoded val image, the logged model's input example."""
    first = storage.open_parquet(reader.shard_files(val_shards)[0])
    row = first.read_row_group(0, columns=["image"]).slice(0, 1).to_pylist()[0]
    return pd.DataFrame({"image": [row["image"]]})


VAL_CURVES = ("val/segm/AP", "val/segm/AP50", "val/bbox/AP")


def training_curves(
    client: mlflow.MlflowClient, run_id: str
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The run's per-epoch curves from its MLflow metric history (every epoch, also those
    whose checkpoints Ray Train no longer keeps): {"losses": {loss term: [(epoch, value)]},
    "val": {val metric: [(epoch, value)]}}, epochs counted from 1."""
    logged = client.get_run(run_id).data.metrics
    groups = {
        "losses": [key for key in logged if key.startswith("loss")],
        "val": [key for key in VAL_CURVES if key in logged],
    }
    return {
        group: {
            key: [(step + 1, value) for step, value in points]
            for key, points in tracking.metric_histories(client, run_id, keys).items()
        }
        for group, keys in groups.items()
    }


def _plot_training_curves(client: mlflow.MlflowClient, run_id: str, out_dir: Path) -> list[Path]:
    """losses.png, val_ap.png (when validation ran) and curves.json, the data they show."""
    curves = training_curves(client, run_id)
    titles = {
        "losses": ("losses.png", "training losses per epoch"),
        "val": ("val_ap.png", "validation AP per epoch (beside training)"),
    }
    paths = [out_dir / "curves.json"]
    paths[0].write_text(json.dumps(curves, indent=1))
    for group, (file_name, title) in titles.items():
        if any(curves[group].values()):
            paths.append(visualize.plot_curves(curves[group], out_dir / file_name, title, "epoch"))
    return paths


def _run_tags(
    splits: DataSplits, name: str, storage_path: str, parent_run_id: str | None
) -> dict[str, str]:
    """The MLflow tags that tie a run to its code, data and Ray Train run (and its parent)."""
    tags = {
        "git_commit": tracking.git_commit(),
        "data_fingerprint": splits.fingerprint,
        "data_source": splits.source,
        "ray_run_name": name,
        "storage_path": storage_path,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def _evaluate(
    cfg: Config, checkpoint: str, splits: DataSplits, gpu: bool, in_process_max_images: int
) -> tuple[dict[str, Any], dict[float, dict[str, Any]]]:
    """The final evaluation of a run's checkpoint on the val split (`evaluate_checkpoint`)."""
    return inference.evaluate_checkpoint(
        checkpoint,
        splits.val_shards,
        splits.val_annotations,
        max_dets=cfg.eval.max_dets,
        score_thresholds=cfg.eval.score_thresholds,
        num_replicas=cfg.eval.num_replicas,
        batch_size=cfg.eval.batch_size,
        use_gpu=gpu,
        in_process_max_images=in_process_max_images,
    )


def train_and_evaluate(
    cfg: Config,
    *,
    data: str | None = None,
    work_dir: str | Path = "work",
    storage_path: str | None = None,
    name: str | None = None,
    resume: bool = False,
    num_workers: int | None = None,
    use_gpu: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "pep",
    parent_run_id: str | None = None,
    validate: bool = True,
    log_model: bool = True,
    overlays: int = 4,
    callbacks: list | None = None,
    quiet: bool = False,
    eval_in_process_max_images: int = EVAL_IN_PROCESS_MAX_IMAGES,
) -> ExperimentSummary:
    """Data, training (Ray Train), evaluation (Ray Data + COCOeval) and MLflow for one run.

    `callbacks` go to the TorchTrainer's RunConfig (the sweep passes Tune's
    `TuneReportCallback` here); `parent_run_id` nests the MLflow run under a sweep/ablation.
    With `validate`, the checkpoints of every `eval.every_epochs` epochs are validated beside
    training; the last one is validated by the final evaluation when that gives the same
    numbers (`final_evaluation_validates`), else by a validation task too. Val splits of at
    most `eval_in_process_max_images` images are evaluated in this process.
    A line per epoch is logged (`pipeline.progress`); `quiet` keeps only the warnings and
    errors of Ray Train (`run_training`) and, in a local Ray started here, of Ray Data and
    MLflow (`cluster.init_ray`).
    """
    start = time.perf_counter()
    work_dir = Path(work_dir).resolve()
    # Joins RAY_ADDRESS (e.g. under `ray job submit`), else starts a local Ray sized for the run.
    cluster.init_ray(
        num_cpus=cluster.local_cpus(run_cpus(cfg, num_workers or cfg.train.num_workers, validate)),
        quiet=quiet,
    )
    splits = data_splits(data, cfg, work_dir)
    # Whether the stages ask Ray for GPUs; each task then picks the device it holds.
    gpu = resolve_use_gpu(cfg.train.use_gpu if use_gpu is None else use_gpu)
    logger.info(
        "devices: training workers %s, validation %s",
        "1 GPU each" if gpu else "CPU",
        "on its own GPU" if gpu else "on CPU",
    )
    storage_path = storage_path or str(work_dir / "runs")
    name = name or time.strftime("pep-%Y%m%d-%H%M%S")
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri, default_dir=work_dir)
    tracking.set_experiment(experiment_name, tracking_uri)
    tags = _run_tags(splits, name, storage_path, parent_run_id)
    with _mlflow_run(cfg, experiment_name, name, tags, resume) as run_id:
        validation = (
            validation_config(cfg, splits, gpu, (run_id, tracking_uri)) if validate else None
        )
        validate_last = validation is not None and not final_evaluation_validates(cfg)
        train_start = time.perf_counter()
        trained = _train(
            cfg,
            splits,
            (run_id, tracking_uri),
            storage_path=storage_path,
            name=name,
            resume=resume,
            num_workers=num_workers,
            gpu=gpu,
            validation=validation,
            validate_last=validate_last,
            callbacks=callbacks,
            quiet=quiet,
        )
        train_seconds = time.perf_counter() - train_start
        checkpoint = str(trained.local_checkpoint(work_dir / "checkpoints" / name))
        unvalidated = unvalidated_epochs(
            mlflow.MlflowClient(tracking_uri),
            run_id,
            expected_validation_epochs(cfg, validate_last) if validation is not None else [],
        )

        eval_start = time.perf_counter()
        metrics, per_threshold = _evaluate(cfg, checkpoint, splits, gpu, eval_in_process_max_images)
        eval_seconds = time.perf_counter() - eval_start
        if validation is not None and not validate_last:
            epoch = int(trained.result.metrics.get("epoch", cfg.train.epochs - 1))
            _final_evaluation_validates_last(cfg, metrics, epoch, (run_id, tracking_uri))
        eval_images = read_manifest(splits.val_shards)["counts"]["images_written"]
        mlflow.log_metrics(
            {
                "time/train_s": train_seconds,
                "time/eval_s": eval_seconds,
                "time/eval_ms_per_image": 1000 * eval_seconds / max(1, eval_images),
            }
        )
        model_uri = _track_results(
            metrics,
            per_threshold,
            trained.checkpoint_path,
            checkpoint,
            splits,
            (run_id, tracking_uri),
            overlays=overlays,
            log_model=log_model,
        )

    return ExperimentSummary(
        run_id=run_id,
        tracking_uri=tracking_uri,
        checkpoint=trained.checkpoint_path,
        unvalidated_epochs=unvalidated,
        metrics=metrics,
        thresholds=per_threshold,
        seconds=time.perf_counter() - start,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        eval_images=eval_images,
        model_uri=model_uri,
    )


@contextlib.contextmanager
def _mlflow_run(
    cfg: Config, experiment_name: str, name: str, tags: dict[str, str], resume: bool
) -> Iterator[str]:
    """The active MLflow run of the experiment (its id): a new one with the config's params
    and config.yaml, or with `resume` the earlier attempt's run, continued."""
    run = _find_run(experiment_name, name) if resume else None
    with mlflow.start_run(
        run_id=run.info.run_id if run else None,
        run_name=None if run else name,
        tags=tags,
    ) as active:
        if run is None:
            mlflow.log_params(tracking.flatten(config_to_dict(cfg)))
        with tempfile.TemporaryDirectory() as tmp_name:
            save_config(cfg, Path(tmp_name) / "config.yaml")
            mlflow.log_artifact(str(Path(tmp_name) / "config.yaml"))
        yield active.info.run_id


def data_splits(data: str | None, cfg: Config, work_dir: str | Path) -> DataSplits:
    """The data step: `resolve_data`, and the model's classes set to the data's."""
    splits = resolve_data(data, cfg, work_dir)
    if cfg.model.num_classes != splits.categories.num_classes:
        logger.warning(
            "model.num_classes=%d but the data has %d classes; using the data's",
            cfg.model.num_classes,
            splits.categories.num_classes,
        )
        cfg.model.num_classes = splits.categories.num_classes
    return splits


def _train(
    cfg: Config,
    splits: DataSplits,
    mlflow_run: tuple[str, str],
    validation: ray.train.v2.api.validation_config.ValidationConfig | None,
    validate_last: bool,
    gpu: bool,
    **run_kwargs: Any,
):
    """The train step: Ray Train (`run_training`), a progress line per epoch meanwhile."""
    run_id, tracking_uri = mlflow_run
    with progress.EpochReporter(mlflow.MlflowClient(tracking_uri), run_id, cfg.train.epochs):
        return run_training(
            cfg,
            splits.train_shards,
            use_gpu=gpu,
            validation_config=validation,
            mlflow_run=mlflow_run,
            validate_last=validate_last,
            **run_kwargs,
        )


def _final_evaluation_validates_last(
    cfg: Config, metrics: dict[str, Any], epoch: int, mlflow_run: tuple[str, str]
) -> None:
    """The final evaluation stands for the last epoch's validation: its `val/...` metrics."""
    run_id, tracking_uri = mlflow_run
    tracking.log_metrics_safely(
        run_id, validation_scalars(metrics, epoch), step=epoch, tracking_uri=tracking_uri
    )
    logger.info(
        "validation after epoch %d/%d (the final evaluation): segm AP %.3f",
        epoch + 1,
        cfg.train.epochs,
        metrics["segm/AP"],
    )


def _track_results(
    metrics: dict[str, Any],
    per_threshold: dict[float, dict[str, Any]],
    checkpoint_uri: str,
    checkpoint: str,
    splits: DataSplits,
    mlflow_run: tuple[str, str],
    overlays: int,
    log_model: bool,
) -> str | None:
    """The track step, in the active MLflow run: the final metrics, results.json, the AP
    table, plots, overlays and (with `log_model`) the pyfunc model; returns its URI."""
    run_id, tracking_uri = mlflow_run
    mlflow.log_metrics(
        {k.replace("@", "_at_"): v for k, v in evaluate.scalar_metrics(metrics).items()}
    )
    for t, m in per_threshold.items():
        mlflow.log_metric(
            f"segm/AP_thr_{t:g}".replace(".", "_"), evaluate.scalar_metrics(m)["segm/AP"]
        )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "results.json").write_text(
            json.dumps(
                {
                    "metrics": evaluate.scalar_metrics(metrics),
                    "per_threshold": {
                        str(t): evaluate.scalar_metrics(m) for t, m in per_threshold.items()
                    },
                    "params": metrics.get("params"),
                    "checkpoint": checkpoint_uri,
                },
                indent=1,
            )
        )
        (tmp / "ap_table.md").write_text(
            evaluate.format_ap_table(metrics)
            + "\n\n"
            + evaluate.format_recall_table(metrics)
            + "\n"
        )
        mlflow.log_artifact(str(tmp / "results.json"))
        mlflow.log_artifact(str(tmp / "ap_table.md"))
        if metrics.get("pr_curve"):
            evaluate.plot_pr_curve(metrics["pr_curve"], tmp / "segm_pr_curve.png")
            mlflow.log_artifact(str(tmp / "segm_pr_curve.png"), "plots")
        for path in _plot_training_curves(mlflow.MlflowClient(tracking_uri), run_id, tmp):
            mlflow.log_artifact(str(path), "plots")
        if overlays:
            for path in _overlays(
                checkpoint,
                splits.val_shards,
                splits.categories,
                tmp / "overlays",
                overlays,
                metrics,
            ):
                mlflow.log_artifact(str(path), "overlays")
    if not log_model:
        return None
    info = tracking.log_pep_model(
        checkpoint,
        {k + 1: n for k, n in enumerate(splits.categories.names)},
        input_example=_input_example(splits.val_shards),
    )
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri


def unvalidated_epochs(client: mlflow.MlflowClient, run_id: str, expected: list[int]) -> list[int]:
    """The expected validation epochs (0-based) with no `val/segm/AP` logged, from 1; each is
    logged as a warning and recorded in the run's `validation_missing` tag."""
    logged = {
        step
        for step, _ in tracking.metric_histories(client, run_id, [progress.VAL_AP])[progress.VAL_AP]
    }
    missing = [e + 1 for e in expected if e not in logged]
    if missing:
        text = ",".join(str(e) for e in missing)
        logger.warning("no validation result for epoch(s) %s", text)
        client.set_tag(run_id, "validation_missing", text)
    return missing


def _find_run(experiment_name: str, name: str):
    """The MLflow run of an earlier attempt of run `name` (to continue it on --resume)."""
    runs = mlflow.search_runs(
        experiment_names=[experiment_name],
        filter_string=f"tags.ray_run_name = '{name}'",
        output_format="list",
        max_results=1,
    )
    return runs[0] if runs else None
