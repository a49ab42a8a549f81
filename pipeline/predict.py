"""Images in, instance masks out: COCO results (JSON) and overlay PNGs per image.

    checkpoint, categories = resolve_model_source("models:/pep@champion")
    records = predict_images(["photos/"], checkpoint, score_threshold=0.3, max_instances=100,
                             out_dir="predictions", categories=categories)

A model source is a checkpoint file or a Ray Train checkpoint directory (holding
`checkpoint.pt`), local or on cloud storage (`s3://...`, read with pyarrow, which takes the
endpoint from `AWS_ENDPOINT_URL`), a local MLflow model directory, or an MLflow model URI
(`models:/m-<id>`, `models:/pep@champion`, `models:/pep/3`, `runs:/<run_id>/model`). MLflow
models are the pyfunc models of `pipeline.tracking.log_pep_model`: their `checkpoint` and
`categories` artifacts are stored under `artifacts/` in the model directory and named in its
`MLmodel`.

Each image is resized as `prepare` resizes training images (longer side at most the
checkpoint's `data.max_size`, never upscaled); masks and boxes come back at the image's
original size (`pipeline.single_image`, as in the logged MLflow model). The run is local
(one process, no Ray): one model, images one at a time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import storage
from pipeline.coco import CategoryMap, decode_rles, to_rgb
from pipeline.devices import DeviceError, local_device
from pipeline.inference import Checkpoint, InferenceError, load_model
from pipeline.single_image import predict_image
from pipeline.train import CHECKPOINT_FILE
from pipeline.visualize import draw_overlay

logger = logging.getLogger(__name__)

MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
DEFAULT_STORE = Path("work") / "mlflow.db"  # where jobs/train_pep.py logs by default
SOURCE_FORMS = (
    "a checkpoint file (.pt) or a Ray Train checkpoint directory (with checkpoint.pt), local or "
    "a URI (s3://...), an MLflow "
    "model directory, or an MLflow model URI (models:/m-<id>, models:/<name>@<alias>, "
    "models:/<name>/<version>, runs:/<run_id>/model)"
)


class ModelSourceError(InferenceError):
    """A model source cannot be resolved to a checkpoint (missing, not a PEP model, MLflow)."""


# ------------------------------------------------------------------------------- model source


def is_mlflow_uri(source: str | os.PathLike) -> bool:
    """True for `models:/...`, `runs:/...` and `mlflow-artifacts:/...` URIs."""
    return str(source).startswith(MLFLOW_URI_PREFIXES)


def resolve_model_source(
    source: str | os.PathLike,
    tracking_uri: str | None = None,
    dst_dir: str | os.PathLike | None = None,
) -> tuple[Path, dict[int, str] | None]:
    """(local checkpoint file, contiguous class id -> name or None) of a model source.

    MLflow URIs are downloaded (into `dst_dir`, else a new temporary directory; a local
    artifact store is read in place) from `tracking_uri`, else `MLFLOW_TRACKING_URI`, else
    the default store `work/mlflow.db` when it exists. Raises ModelSourceError naming the
    source and what is missing.
    """
    if is_mlflow_uri(source):
        local = _download(str(source), tracking_uri, dst_dir)
        return _local_source(local, str(source))
    if storage.is_uri(source):  # s3://..., gs://...: a checkpoint file or directory
        try:
            local = storage.fetch_checkpoint(str(source), dst_dir or tempfile.mkdtemp())
        except storage.StorageError as e:
            raise ModelSourceError(f"{e} (expected {SOURCE_FORMS})") from e
        return _local_source(local, str(source))
    path = Path(source)
    if not path.exists():
        raise ModelSourceError(f"{source}: checkpoint not found (expected {SOURCE_FORMS})")
    return _local_source(path, str(source))


def _tracking_uri(tracking_uri: str | None, source: str) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not DEFAULT_STORE.is_file():
            raise ModelSourceError(
                f"{source}: no MLflow tracking URI (pass --tracking-uri or set "
                f"MLFLOW_TRACKING_URI; the default store {DEFAULT_STORE} does not exist here)"
            )
        uri = f"sqlite:///{DEFAULT_STORE.resolve()}"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():  # SQLAlchemy would create an empty store
            raise ModelSourceError(f"{source}: MLflow store {uri}: no such SQLite file {db}")
        uri = f"sqlite:///{db.resolve()}"
    return uri


def _download(source: str, tracking_uri: str | None, dst_dir: str | os.PathLike | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = _tracking_uri(tracking_uri, source)
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    try:
        client = mlflow.MlflowClient(uri, registry_uri)
        artifact_uri = source
        if source.startswith("models:/"):
            artifact_uri = _models_artifact_uri(source, client)
        elif source.startswith("runs:/"):
            artifact_uri = _runs_artifact_uri(source, client)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri,
            dst_path=None if dst_dir is None else str(dst_dir),
            tracking_uri=uri,
            registry_uri=registry_uri,
        )
    except (MlflowException, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        raise ModelSourceError(
            f"{source}: cannot download the model from MLflow ({uri}): {message}"
        ) from e
    logger.info("MLflow model %s -> %s", source, local)
    return Path(local)


def _models_artifact_uri(source: str, client: Any) -> str:
    """Where the artifacts of `models:/m-<id>`, `models:/<name>@<alias>`, `models:/<name>/<n>`
    or `models:/<name>/latest` (each optionally followed by `/<path>`) are stored.

    Resolved with our client: MLflow's own `models:/` resolution (also behind `runs:/` URIs of
    logged models) reads the process-wide tracking/registry URIs, not the ones passed to
    `download_artifacts` (MLflow 3.17).
    """
    head, _, rest = source[len("models:/") :].strip("/").partition("/")
    first, _, tail = rest.partition("/")
    if "@" in head:
        name, alias = head.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
        location = client.get_model_version_download_uri(name, version)
    elif first.isdigit() or first.lower() == "latest":
        version = first
        if version.lower() == "latest":
            version = str(max(int(mv.version) for mv in client.get_latest_versions(head)))
        location = client.get_model_version_download_uri(head, version)
        rest = tail
    elif head.startswith("m-"):  # a logged model id
        location = client.get_logged_model(head).artifact_location
    else:
        raise ModelSourceError(
            f"{source}: expected models:/m-<id>, models:/<name>@<alias>, "
            "models:/<name>/<version number> or models:/<name>/latest"
        )
    if location.startswith("models:/m-"):  # a version's source given as its logged model
        location = client.get_logged_model(location[len("models:/") :]).artifact_location
    return f"{location.rstrip('/')}/{rest}" if rest else location


def _runs_artifact_uri(source: str, client: Any) -> str:
    """`runs:/<run_id>/<name>[/<path>]`: the artifacts of the model `<name>` logged by that run
    (MLflow 3 stores them outside the run's artifacts), else the run's own artifact path."""
    run_id, _, rel_path = source[len("runs:/") :].strip("/").partition("/")
    name, _, rest = rel_path.partition("/")
    experiment_id = client.get_run(run_id).info.experiment_id
    if name:
        page_token = None
        while True:
            page = client.search_logged_models(
                experiment_ids=[experiment_id],
                filter_string=f"name = '{name}'",
                page_token=page_token,
            )
            for model in page:
                if model.source_run_id == run_id:
                    location = model.artifact_location.rstrip("/")
                    return f"{location}/{rest}" if rest else location
            page_token = page.token
            if not page_token:
                break
    return source


def _local_source(path: Path, source: str) -> tuple[Path, dict[int, str] | None]:
    if path.is_file():
        return path, None
    if (path / "MLmodel").is_file():
        return _mlflow_model_dir(path, source)
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE, None
    raise ModelSourceError(
        f"{source}: the directory {path} has neither {CHECKPOINT_FILE} (a Ray Train "
        "checkpoint) nor MLmodel (an MLflow model)"
    )


def _mlflow_model_dir(model_dir: Path, source: str) -> tuple[Path, dict[int, str] | None]:
    """The `checkpoint` and `categories` artifacts named in an MLflow model's MLmodel file."""
    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelSourceError(f"{source}: unreadable MLmodel file in {model_dir}: {e}") from e
    artifacts = (mlmodel.get("flavors", {}).get("python_function") or {}).get("artifacts") or {}
    if "checkpoint" not in artifacts:
        raise ModelSourceError(
            f"{source}: the MLflow model has no 'checkpoint' artifact (artifacts: "
            f"{sorted(artifacts) or 'none'}); PEP models are logged by "
            "pipeline.tracking.log_pep_model"
        )
    checkpoint = model_dir / artifacts["checkpoint"]["path"]
    if not checkpoint.is_file():
        raise ModelSourceError(f"{source}: the 'checkpoint' artifact {checkpoint} is missing")
    if "categories" not in artifacts:
        logger.warning("%s: no 'categories' artifact; classes are named by their ids", source)
        return checkpoint, None
    categories_path = model_dir / artifacts["categories"]["path"]
    try:
        categories = {int(k): str(v) for k, v in json.loads(categories_path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as e:
        raise ModelSourceError(
            f"{source}: the 'categories' artifact {categories_path} is not a JSON object of "
            f"class id -> name: {e}"
        ) from e
    return checkpoint, categories


def read_category_file(path: str | os.PathLike) -> tuple[CategoryMap, dict[str, int]]:
    """(category map with COCO ids, file name -> COCO image id) from a COCO annotation JSON
    or a shards `manifest.json` (which has no images: the second item is then empty)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        entries = data["categories"]
        if entries and "contiguous_id" in entries[0]:  # shards manifest
            category_map = CategoryMap.from_dict(entries)
        else:
            category_map = CategoryMap.from_categories(entries)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InferenceError(
            f"{path}: not a COCO annotation JSON or shards manifest with categories: {e}"
        ) from e
    image_ids = {
        str(im["file_name"]): int(im["id"])
        for im in data.get("images", [])
        if isinstance(im, dict) and "file_name" in im and "id" in im
    }
    return category_map, image_ids


# ------------------------------------------------------------------------------- images


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded to their image files (by extension), sorted."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions
            )
        else:
            files.append(path)  # a missing or unreadable file is reported when read
    return files


def read_image(path: Path) -> Image.Image:
    """The image as RGB; InferenceError naming the file when it cannot be read or decoded."""
    try:
        with Image.open(path) as image:
            image.load()  # raises on truncated data
            return to_rgb(image).copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types; re-raised with the file
        raise InferenceError(f"{path}: cannot read the image: {type(e).__name__}: {e}") from e


def _output_stems(files: list[Path]) -> list[str]:
    """A distinct `<stem>` per file: `x`, then `x_2`, `x_3`... where inputs share a stem."""
    used: set[str] = set()
    stems = []
    for path in files:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}_{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def _category_tables(
    categories: Mapping[int, str] | CategoryMap | None, num_classes: int
) -> tuple[dict[int, int], dict[int, str]]:
    """(contiguous id -> result category_id, contiguous id -> name) for the model's classes."""
    if isinstance(categories, CategoryMap):
        if categories.num_classes != num_classes:
            raise InferenceError(
                f"the category map has {categories.num_classes} classes, the model {num_classes}"
            )
        labels = range(1, num_classes + 1)
        return {k: categories.to_coco(k) for k in labels}, {k: categories.name(k) for k in labels}
    names = {int(k): str(v) for k, v in (categories or {}).items()}
    extra = sorted(set(names) - set(range(1, num_classes + 1)))
    if extra:
        raise InferenceError(
            f"category ids {extra} are outside the model's classes 1..{num_classes}"
        )
    return {k: k for k in range(1, num_classes + 1)}, names


# ------------------------------------------------------------------------------- prediction


def predict_images(
    paths: Iterable[str | os.PathLike],
    checkpoint: Checkpoint,
    score_threshold: float | None = 0.3,
    max_instances: int | None = 100,
    out_dir: str | os.PathLike = "predictions",
    categories: Mapping[int, str] | CategoryMap | None = None,
    *,
    use_gpu: bool | str = "auto",
    image_ids: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Predict every image; write `out_dir/<stem>.json` and `out_dir/<stem>.png` for each.

    The JSON is the image's COCO results: {image_id, category_id, segmentation (compressed
    RLE, counts as str), bbox (xywh), score, category_name}, at the original image size.
    `category_id` is the COCO id when `categories` is a `CategoryMap`, else the contiguous
    label; `image_id` comes from `image_ids` (file name -> id), else the image's position
    (1-based) among the expanded inputs. The PNG: the image with coloured masks, boxes and
    `class score` captions.

    Returns one record per input image: {image, json, png, width, height, instances}, or
    {image, skipped: reason} for a file that cannot be read (logged, never fatal).
    """
    paths = [str(p) for p in paths]
    files = expand_inputs(paths)
    if not files:
        raise InferenceError(f"no image files in {paths}")
    try:
        device = local_device(use_gpu, "prediction")
    except DeviceError as e:
        raise InferenceError(str(e)) from e
    logger.info("predicting %d image(s) on %s", len(files), device.type)
    model, config = load_model(checkpoint, device=device)
    params = {}
    if score_threshold is not None:
        params["score_threshold"] = float(score_threshold)
    if max_instances is not None:
        params["max_instances"] = int(max_instances)
    model.set_inference_params(**params)
    to_category, names = _category_tables(categories, config.model.num_classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    with logging_redirect_tqdm():
        progress = tqdm(list(zip(files, _output_stems(files))), desc="predict", unit="image")
        for index, (path, stem) in enumerate(progress, start=1):
            try:
                image = read_image(path)
            except InferenceError as e:
                logger.warning("skipped %s", e)
                records.append({"image": str(path), "skipped": str(e)})
                continue
            image_id = (image_ids or {}).get(path.name, index)
            results, labels = predict_image(
                model, image, config.data.max_size, image_id, to_category, device
            )
            for result, label in zip(results, labels):
                result["category_name"] = names.get(label, str(label))
            json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
            json_path.write_text(json.dumps(results))
            _overlay(image, results, labels, names).save(png_path)
            records.append(
                {
                    "image": str(path),
                    "json": str(json_path),
                    "png": str(png_path),
                    "width": image.width,
                    "height": image.height,
                    "instances": len(results),
                }
            )
    return records


def _overlay(
    image: Image.Image, results: list[dict[str, Any]], labels: list[int], names: dict[int, str]
) -> Image.Image:
    masks = decode_rles(
        [r["segmentation"]["counts"] for r in results], image.height, image.width
    ).astype(bool)  # K x H x W
    boxes = np.array(
        [
            [x, y, max(x, x + w - 1), max(y, y + h - 1)]  # inclusive pixel corners
            for x, y, w, h in (r["bbox"] for r in results)
        ],
        dtype=np.float64,
    ).reshape(-1, 4)
    scores = [r["score"] for r in results]
    return draw_overlay(np.asarray(image), masks, labels, scores, boxes, names)
