"""Distributed inference with Ray Data and COCO evaluation of a PEP checkpoint.

    results = predict_dataset(open_shards(shards), checkpoint, category_map(shards), num_replicas=2)
    metrics, per_threshold = evaluate_checkpoint(checkpoint, shards, max_dets=400,
                                                 score_thresholds=[0.05, 0.1, 0.3])

`predict_dataset` runs `map_batches` over an actor pool of model replicas (`PEPPredictor`:
the checkpoint is loaded once per replica, with `torch.load(weights_only=True)`; one GPU per
replica when `use_gpu`). Each batch of shard rows is decoded, run through the model and
converted to COCO results at the image's ORIGINAL size (`pipeline.evaluate`), returned as
one row per image (`image_id`, `results` as a JSON string) and gathered on the driver, so
COCOeval sees every worker's results before it accumulates.

The checkpoint is shipped to the replicas through the Ray object store (the driver reads
the file once), so replicas on other nodes need no shared filesystem.

`evaluate_checkpoint_local` does the same in the calling process without Ray Data (for a
validation task that already runs inside Ray, and for small evaluation sets, where starting
Ray Data and its model replicas costs more than the inference: `evaluate_checkpoint`'s
`in_process_max_images`). Both paths give the same COCO results, hence the same AP.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

import pep_model
from pep_model import Config, ModelConfig
from pipeline import storage
from pipeline.coco import CategoryMap
from pipeline.devices import holds_gpu, local_device, resolve_use_gpu
from pipeline.evaluate import (
    COCO_MAX_DETS,
    coco_from_annotations,
    evaluate_coco,
    evaluate_thresholds,
    predictions_to_coco_results,
)
from pipeline.prepare import PrepareError, ground_truth, read_manifest
from pipeline.reader import open_shards, shard_files

logger = logging.getLogger(__name__)

# Shard columns inference needs (the training columns such as masks are not read).
INFERENCE_COLUMNS = ["image_id", "image", "orig_height", "orig_width", "height", "width"]

Checkpoint = str | os.PathLike | bytes | Mapping[str, Any] | ray.ObjectRef
"""A checkpoint file path, its bytes, its loaded payload ({"model", "config"}), or an
ObjectRef to bytes/payload (what `predict_dataset` ships to the replicas)."""


class InferenceError(RuntimeError):
    """Inference cannot run: bad checkpoint, undecodable image, inconsistent shards."""


# ------------------------------------------------------------------------------- model


def _payload_model(payload: Mapping[str, Any], config: Config | ModelConfig | None, where: str):
    """Build the model from a checkpoint payload (or a bare state dict plus `config`)."""
    if "model" in payload and "config" in payload:
        state = payload["model"]
        full = pep_model.checkpoint_config(payload["config"])
        model_cfg = config.model if isinstance(config, Config) else (config or full.model)
    else:
        if config is None:
            raise InferenceError(f"{where}: a bare state dict needs `config` to build the model")
        state, full = payload, config if isinstance(config, Config) else Config(model=config)
        model_cfg = full.model
    model = pep_model.build_model(dataclasses.replace(model_cfg, pretrained_path=None))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InferenceError(f"{where}: weights do not match the model config: {e}") from e
    return model, dataclasses.replace(full, model=model_cfg)


def load_model(
    checkpoint: Checkpoint,
    config: Config | ModelConfig | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Config]:
    """The PEP model in eval mode on `device`, and its config, from any `Checkpoint` form.

    Files and bytes are read with `pep_model.load_checkpoint` (`weights_only=True`). `config`
    replaces the checkpoint's model config (it must fit the weights); needed only for a bare
    state dict.
    """
    if isinstance(checkpoint, ray.ObjectRef):
        checkpoint = ray.get(checkpoint)
    if isinstance(checkpoint, bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint.pt"
            path.write_bytes(checkpoint)
            payload = pep_model.read_checkpoint(path)
        model, full = _payload_model(payload, config, "<checkpoint bytes>")
    elif isinstance(checkpoint, Mapping):
        model, full = _payload_model(checkpoint, config, "<checkpoint payload>")
    elif config is None:
        model, full = pep_model.load_checkpoint(checkpoint)
    else:
        model, full = _payload_model(pep_model.read_checkpoint(checkpoint), config, checkpoint)
    return model.to(device).eval(), full


def checkpoint_ref(checkpoint: Checkpoint) -> ray.ObjectRef:
    """Put a checkpoint in the Ray object store once (file -> its bytes) for the replicas."""
    if isinstance(checkpoint, ray.ObjectRef):
        return checkpoint
    if isinstance(checkpoint, str | os.PathLike):
        path = Path(checkpoint)
        if not path.is_file():
            raise InferenceError(f"{path}: checkpoint not found")
        return ray.put(path.read_bytes())
    return ray.put(checkpoint)


def _set_inference_params(
    model: torch.nn.Module, score_threshold: float | None, max_instances: int | None
) -> None:
    params = {}
    if score_threshold is not None:
        params["score_threshold"] = float(score_threshold)
    if max_instances is not None:
        params["max_instances"] = int(max_instances)
    if params:
        model.set_inference_params(**params)


# ------------------------------------------------------------------------------- batches


def decode_image(data: bytes, image_id: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Encoded image bytes -> float [3,H,W] in 0..1; checks (H, W) against the shard row."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types; re-raised with the image id
        raise InferenceError(f"image {image_id}: cannot decode the image bytes: {e}") from e
    if size is not None and array.shape[:2] != tuple(size):
        raise InferenceError(
            f"image {image_id}: decoded size {array.shape[:2]} differs from the row's "
            f"height x width {tuple(size)}"
        )
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def predict_rows(
    model: torch.nn.Module,
    batch: Mapping[str, Sequence[Any]],
    contiguous_to_coco: Mapping[int, int],
    device: str | torch.device = "cpu",
) -> list[tuple[int, list[dict[str, Any]]]]:
    """Shard rows (columns as in `INFERENCE_COLUMNS`) -> [(image_id, COCO results)] per image."""
    image_ids = [int(i) for i in batch["image_id"]]
    images = [
        decode_image(data, image_id, (int(h), int(w))).to(device)
        for data, image_id, h, w in zip(batch["image"], image_ids, batch["height"], batch["width"])
    ]
    orig_sizes = [(int(h), int(w)) for h, w in zip(batch["orig_height"], batch["orig_width"])]
    with torch.inference_mode():
        predictions = model(images)
    per_image = []
    for prediction, image_id, orig_size in zip(predictions, image_ids, orig_sizes):
        prediction = {k: v.cpu() for k, v in prediction.items()}
        results = predictions_to_coco_results(
            [prediction], [image_id], [orig_size], contiguous_to_coco
        )
        per_image.append((image_id, results))
    return per_image


class PEPPredictor:
    """One model replica for `Dataset.map_batches` (a Ray Data callable class).

    Args:
        checkpoint: any `Checkpoint` form; an ObjectRef is fetched from the object store.
        contiguous_to_coco: contiguous class id (1..C) -> COCO category id (a dict or a
            `pipeline.coco.CategoryMap`).
        config: optional model config replacing the checkpoint's (see `load_model`).
        score_threshold, max_instances: the model's inference params (None: keep config's).
        use_gpu: run on this replica's GPU.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        contiguous_to_coco: Mapping[int, int],
        config: Config | ModelConfig | None = None,
        score_threshold: float | None = None,
        max_instances: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        self.device = local_device(use_gpu, "inference replica")
        self.model, self.config = load_model(checkpoint, config, self.device)
        _set_inference_params(self.model, score_threshold, max_instances)
        self.to_coco = as_coco_map(contiguous_to_coco)
        _check_classes(self.config.model, self.to_coco)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        per_image = predict_rows(self.model, batch, self.to_coco, self.device)
        return {
            "image_id": np.array([image_id for image_id, _ in per_image], dtype=np.int64),
            "num_instances": np.array([len(r) for _, r in per_image], dtype=np.int64),
            "results": np.array([json.dumps(r) for _, r in per_image], dtype=object),
        }


def as_coco_map(category_map: Any) -> dict[int, int]:
    """Contiguous id -> COCO id from a dict or a `pipeline.coco.CategoryMap`."""
    if hasattr(category_map, "coco_ids"):
        return {k + 1: int(coco_id) for k, coco_id in enumerate(category_map.coco_ids)}
    return {int(k): int(v) for k, v in dict(category_map).items()}


def _check_classes(model_cfg: ModelConfig, to_coco: Mapping[int, int]) -> None:
    if sorted(to_coco) != list(range(1, model_cfg.num_classes + 1)):
        raise InferenceError(
            f"the category map has contiguous ids {sorted(to_coco)} but the model predicts "
            f"classes 1..{model_cfg.num_classes}: checkpoint and data do not match"
        )


def _gather(rows: Iterable[tuple[int, list[dict[str, Any]]]]) -> tuple[list[dict], list[int]]:
    """Per-image results -> (all results sorted by image id, image ids); rejects duplicates."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for image_id, results in rows:
        if image_id in by_image:
            raise InferenceError(f"image {image_id}: predicted twice (duplicate shard rows)")
        by_image[image_id] = results
    image_ids = sorted(by_image)
    return [r for i in image_ids for r in by_image[i]], image_ids


def predict_dataset(
    dataset: ray.data.Dataset,
    checkpoint: Checkpoint,
    contiguous_to_coco: Mapping[int, int] | Any,
    config: Config | ModelConfig | None = None,
    batch_size: int = 4,
    num_replicas: int = 1,
    use_gpu: bool | str = "auto",
    score_threshold: float | None = None,
    max_instances: int | None = None,
    num_cpus_per_replica: float = 1.0,
    return_image_ids: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[int]]:
    """COCO results of every image in `dataset` (shard rows), from `num_replicas` replicas.

    Results are sorted by image id (then score, as the model orders them). With
    `return_image_ids` also returns the ids of all predicted images, including those
    without any instance (what COCOeval must evaluate).
    """
    gpu = resolve_use_gpu(use_gpu)
    start = time.perf_counter()
    ref = checkpoint_ref(checkpoint)
    columns = [c for c in INFERENCE_COLUMNS if c in dataset.columns()]
    missing = sorted(set(INFERENCE_COLUMNS) - set(columns))
    if missing:
        raise InferenceError(f"the dataset lacks the shard column(s) {missing}")
    # Blocks of at most one batch (streaming, no shuffle): a shard is often a single block,
    # which would otherwise go to one replica.
    blocks = dataset.select_columns(columns).repartition(target_num_rows_per_block=batch_size)
    predicted = blocks.map_batches(
        PEPPredictor,
        fn_constructor_kwargs={
            "checkpoint": ref,
            "contiguous_to_coco": as_coco_map(contiguous_to_coco),
            "config": config,
            "score_threshold": score_threshold,
            "max_instances": max_instances,
            "use_gpu": gpu,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_replicas),
        num_gpus=1 if gpu else 0,
        num_cpus=num_cpus_per_replica,
    )
    rows = predicted.take_all()  # gathered on the driver before any COCOeval step
    results, image_ids = _gather((int(r["image_id"]), json.loads(r["results"])) for r in rows)
    logger.info(
        "Predicted %d instances on %d images with %d replica(s)%s in %.1f s",
        len(results),
        len(image_ids),
        num_replicas,
        " (GPU)" if gpu else "",
        time.perf_counter() - start,
    )
    return (results, image_ids) if return_image_ids else results


# ------------------------------------------------------------------------------- evaluation


def _shards_setup(
    shards_dir: str | os.PathLike, gt_annotations: str | os.PathLike | None
) -> tuple[dict[int, int], Path, dict[str, Any]]:
    """(contiguous -> COCO id map, ground-truth annotation file, manifest) of a shards folder."""
    manifest = read_manifest(shards_dir)
    to_coco = as_coco_map(CategoryMap.from_dict(manifest["categories"]))
    if gt_annotations is None:
        try:
            gt_annotations = ground_truth(shards_dir, manifest)
        except PrepareError as e:
            raise InferenceError(str(e)) from None
    try:
        gt_path = storage.local_file(gt_annotations)  # a URI: downloaded once per machine
    except (OSError, ValueError) as e:
        raise InferenceError(f"{gt_annotations}: ground-truth annotation file: {e}") from None
    if not gt_path.is_file():
        raise InferenceError(
            f"{gt_path}: ground-truth annotation file not found (pass it explicitly when the "
            f"shards in {shards_dir} were prepared elsewhere)"
        )
    rejected = manifest.get("counts", {}).get("images_rejected", 0)
    if rejected:
        logger.warning(
            "%s: %d image(s) were rejected by prepare (see the manifest); they are not evaluated",
            shards_dir,
            rejected,
        )
    return to_coco, gt_path, manifest


def _prediction_settings(
    max_instances: int | None,
    max_dets: int,
    score_threshold: float | None,
    score_thresholds: Sequence[float] | None,
) -> tuple[float | None, int]:
    """Predict at the lowest swept threshold, with the output cap at `max_dets` by default."""
    if score_thresholds:
        lowest = min(score_thresholds)
        if score_threshold is None:
            score_threshold = lowest
        elif score_threshold > lowest:
            raise ValueError(
                f"score_threshold {score_threshold} is above the lowest swept threshold "
                f"{lowest}: predict at or below every threshold to be scored"
            )
    if max_instances is None:
        max_instances = max_dets
    elif max_instances < max_dets:
        logger.warning(
            "max_instances %d < max_dets %d: the model's output cap limits recall at maxDets %d",
            max_instances,
            max_dets,
            max_dets,
        )
    return score_threshold, max_instances


def _score(
    gt_path: Path,
    results: list[dict[str, Any]],
    image_ids: list[int],
    max_dets: int,
    score_thresholds: Sequence[float] | None,
    backend: str,
    results_path: str | os.PathLike | None,
) -> tuple[dict[str, Any], dict[float, dict[str, Any]]]:
    gt = coco_from_annotations(gt_path)
    unknown = sorted(set(image_ids) - set(gt.getImgIds()))
    if unknown:
        raise InferenceError(
            f"{gt_path}: image id(s) {unknown[:10]} of the shards are not in the ground truth"
        )
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(results))
        logger.info("Wrote %d COCO results to %s", len(results), results_path)
    metrics = evaluate_coco(gt, results, max_dets=max_dets, img_ids=image_ids, backend=backend)
    per_threshold = {}
    if score_thresholds:
        per_threshold = evaluate_thresholds(
            gt, results, score_thresholds, max_dets=max_dets, img_ids=image_ids, backend=backend
        )
    return metrics, per_threshold


def evaluate_checkpoint(
    checkpoint: Checkpoint,
    shards_dir: str | os.PathLike,
    gt_annotations: str | os.PathLike | None = None,
    *,
    max_dets: int = COCO_MAX_DETS,
    score_thresholds: Sequence[float] | None = None,
    batch_size: int = 4,
    num_replicas: int = 1,
    use_gpu: bool | str = "auto",
    score_threshold: float | None = None,
    max_instances: int | None = None,
    num_cpus_per_replica: float = 1.0,
    backend: str = "auto",
    results_path: str | os.PathLike | None = None,
    in_process_max_images: int = 0,
) -> tuple[dict[str, Any], dict[float, dict[str, Any]]]:
    """COCO metrics of a checkpoint on a shards folder: (metrics, AP per score threshold).

    One Ray Data inference pass at the lowest of `score_thresholds` (or `score_threshold`,
    or the model's own), with the model's output cap raised to `max_dets`; then COCOeval on
    the original annotation file (`gt_annotations`, default: the manifest's source) over
    the images in the shards. `results_path` also writes the COCO results JSON.

    Shards of at most `in_process_max_images` images are predicted in this process instead
    (`evaluate_checkpoint_local`, on this machine's GPU only if it has one): the same
    results, without starting Ray Data and `num_replicas` model replicas.
    """
    images = read_manifest(shards_dir).get("counts", {}).get("images_written")
    if images is not None and images <= in_process_max_images:
        # the driver (a CPU head node on a cluster) uses its own GPU only if it has one
        gpu = resolve_use_gpu(use_gpu) and holds_gpu()
        metrics = evaluate_checkpoint_local(
            checkpoint,
            shards_dir,
            gt_annotations,
            max_dets=max_dets,
            score_thresholds=score_thresholds,
            batch_size=batch_size,
            use_gpu=gpu,
            score_threshold=score_threshold,
            max_instances=max_instances,
            backend=backend,
            results_path=results_path,
        )
        return metrics, metrics.pop("thresholds", {})
    to_coco, gt_path, _ = _shards_setup(shards_dir, gt_annotations)
    score_threshold, cap = _prediction_settings(
        max_instances, max_dets, score_threshold, score_thresholds
    )
    results, image_ids = predict_dataset(
        open_shards(shards_dir),
        checkpoint,
        to_coco,
        batch_size=batch_size,
        num_replicas=num_replicas,
        use_gpu=use_gpu,
        score_threshold=score_threshold,
        max_instances=cap,
        num_cpus_per_replica=num_cpus_per_replica,
        return_image_ids=True,
    )
    return _score(gt_path, results, image_ids, max_dets, score_thresholds, backend, results_path)


def _local_rows(
    shards_dir: str | os.PathLike, batch_size: int, max_images: int | None = None
) -> Iterator[dict[str, list]]:
    """Shard rows in batches, in shard order; only the first `max_images` when given."""
    left = max_images if max_images else None
    for path in shard_files(shards_dir):
        parquet = storage.open_parquet(path)
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=INFERENCE_COLUMNS):
            if left is not None:
                record_batch = record_batch.slice(0, left)
                left -= record_batch.num_rows
            yield record_batch.to_pydict()
            if left is not None and left <= 0:
                return


def evaluate_checkpoint_local(
    checkpoint: Checkpoint,
    shards_dir: str | os.PathLike,
    gt_annotations: str | os.PathLike | None = None,
    *,
    max_dets: int = COCO_MAX_DETS,
    score_thresholds: Sequence[float] | None = None,
    batch_size: int = 4,
    use_gpu: bool | str = "auto",
    score_threshold: float | None = None,
    max_instances: int | None = None,
    backend: str = "auto",
    results_path: str | os.PathLike | None = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """`evaluate_checkpoint` in this process (no Ray Data): for a task already inside Ray.

    The device is this process's (`pipeline.devices.local_device`). `max_images`: only the
    first that many images of the shards (a fixed subset), scored over those images.
    Returns the metrics, with the per-threshold ones under `thresholds` when requested.
    """
    to_coco, gt_path, _ = _shards_setup(shards_dir, gt_annotations)
    device = local_device(use_gpu, "evaluation")
    model, config = load_model(checkpoint, device=device)
    _check_classes(config.model, to_coco)
    score_threshold, cap = _prediction_settings(
        max_instances, max_dets, score_threshold, score_thresholds
    )
    _set_inference_params(model, score_threshold, cap)
    start = time.perf_counter()
    per_image = (
        item
        for rows in _local_rows(shards_dir, batch_size, max_images)
        for item in predict_rows(model, rows, to_coco, device)
    )
    results, image_ids = _gather(per_image)
    logger.info(
        "Predicted %d instances on %d images in this process (%s) in %.1f s",
        len(results),
        len(image_ids),
        device.type,
        time.perf_counter() - start,
    )
    metrics, per_threshold = _score(
        gt_path, results, image_ids, max_dets, score_thresholds, backend, results_path
    )
    if per_threshold:
        metrics["thresholds"] = per_threshold
    return metrics
