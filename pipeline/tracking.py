"""MLflow helpers: where runs go, what a run records, and the logged PEP model.

The logged model is an `mlflow.pyfunc` model logged from code (`pipeline/pep_pyfunc.py`,
MLflow's models-from-code) whose artifact is a plain checkpoint (state_dict + config, read
with `weights_only=True`): nothing is pickled, so a fresh process loads it with
`mlflow.pyfunc.load_model(uri)` without unpickling any Python object and predicts on encoded
images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

logger = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "work"


def default_tracking_uri(base_dir: str | Path | None = None) -> str:
    """The local default store: `work/mlflow.db` (SQLite) under the working directory."""
    base = Path(base_dir or Path.cwd() / DEFAULT_STORE_DIR).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None, default_dir: str | Path | None = None) -> str:
    """`--tracking-uri` flag, else `MLFLOW_TRACKING_URI`, else SQLite in `default_dir`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # Make relative SQLite paths absolute: Ray workers run in other directories.
            uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
        return uri
    return default_tracking_uri(default_dir)


def set_experiment(name: str, tracking_uri: str) -> str:
    """Select (creating if needed) an experiment; local SQLite stores keep artifacts beside."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri[len("sqlite:///") :])
            location = (db.parent / "mlartifacts").resolve().as_uri()
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit() -> str:
    """The current git commit of the project, or 'unknown' outside a checkout."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_metrics_safely(run_id: str, metrics: dict[str, float], step: int, tracking_uri: str):
    """Log numeric metrics to a run from anywhere (workers, validation tasks).

    Tracking problems are logged as warnings and never stop training.
    """
    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float | np.floating | np.integer) and np.isfinite(v)
    }
    try:
        client = mlflow.MlflowClient(tracking_uri)
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(k.replace("@", "_at_"), v, int(_now_ms()), step)
                for k, v in numeric.items()
            ],
        )
    except Exception as e:  # noqa: BLE001 - tracking must not kill training
        logger.warning("could not log metrics to MLflow run %s: %s", run_id, e)


def _now_ms() -> int:
    return int(time.time() * 1000)


def metric_histories(
    client: mlflow.MlflowClient, run_id: str, keys: list[str]
) -> dict[str, list[tuple[int, float]]]:
    """Every step of each metric of a run as sorted (step, value); where a step was logged
    twice (an epoch repeated after a resume) the later value counts."""
    histories = {}
    for key in keys:
        by_step = {}
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            by_step[int(metric.step)] = float(metric.value)
        histories[key] = sorted(by_step.items())
    return histories


# ----------------------------------------------------------------------------- model


INPUT_SCHEMA = Schema([ColSpec("binary", "image")])
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("long", "image_index"),
        ColSpec("long", "label"),
        ColSpec("string", "category"),
        ColSpec("double", "score"),
        ColSpec("double", "x0"),
        ColSpec("double", "y0"),
        ColSpec("double", "x1"),
        ColSpec("double", "y1"),
        ColSpec("long", "height"),
        ColSpec("long", "width"),
        ColSpec("string", "mask_rle"),
    ]
)
# Post-processing settings a caller may pass as `predict(frame, params={...})`; their
# defaults are the checkpoint's own.
PARAMS = (("score_threshold", "double"), ("max_instances", "long"))

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_CODE = Path(__file__).resolve().with_name("pep_pyfunc.py")  # the models-from-code file


class PEPPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: a DataFrame of encoded images in, one row per instance out.

    Input: column `image` with encoded image bytes (JPEG/PNG). Output columns: image_index,
    label (contiguous class id), category (name), score, box x0 y0 x1 y1 (the mask's, inclusive
    pixel corners), the
    image's height/width and the binary mask as COCO compressed RLE (`mask_rle`), all at the
    image's original size; the model sees it resized as in training, as in
    `jobs/predict_pep.py` (`pipeline.single_image`). Params (`PARAMS`): `score_threshold`,
    `max_instances`.

    `pep_pyfunc.py` instantiates it for models logged from code. Models logged before that
    hold a pickled instance that names this class (`pipeline.tracking.PEPPyfunc`): MLflow
    still loads them by unpickling, so the class keeps its name and has no state of its own
    beyond what `load_context` sets.
    """

    def load_context(self, context) -> None:
        from pep_model import load_checkpoint

        self.model, self.config = load_checkpoint(context.artifacts["checkpoint"])
        self.model.eval()
        self.defaults = {name: getattr(self.config.model, name) for name, _ in PARAMS}
        with open(context.artifacts["categories"]) as f:
            self.categories = {int(k): v for k, v in json.load(f).items()}

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from PIL import Image

        from pipeline.coco import to_rgb
        from pipeline.single_image import predict_image

        params = params or {}
        self.model.set_inference_params(
            **{name: params.get(name, default) for name, default in self.defaults.items()}
        )
        rows = []
        for index, data in enumerate(model_input["image"]):
            image = to_rgb(Image.open(io.BytesIO(data)))
            # resized as in training (data.max_size), results at the original size: the same
            # as jobs/predict_pep.py
            results, labels = predict_image(self.model, image, self.config.data.max_size)
            for result, label in zip(results, labels):
                x, y, w, h = result["bbox"]
                rows.append(
                    {
                        "image_index": index,
                        "label": label,
                        "category": self.categories.get(label, str(label)),
                        "score": float(result["score"]),
                        "x0": float(x),
                        "y0": float(y),
                        "x1": float(max(x, x + w - 1)),  # inclusive, as the model's boxes
                        "y1": float(max(y, y + h - 1)),
                        "height": image.height,
                        "width": image.width,
                        "mask_rle": result["segmentation"]["counts"],
                    }
                )
        columns = [c.name for c in OUTPUT_SCHEMA.inputs]
        return pd.DataFrame(rows, columns=columns)


# What the logged model imports (pep_model/, the pyfunc wrapper), as pip distributions.
MODEL_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "pycocotools",
    "pyyaml",
)


def model_requirements() -> list[str]:
    """The logged model's pip requirements: `MODEL_DISTRIBUTIONS` pinned to the installed
    versions. Given explicitly, MLflow does not infer them, which loads the model in a
    subprocess to see what it imports (~10 s per logged model) and found neither torch nor
    pycocotools here (the pyfunc imports them inside its methods)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in MODEL_DISTRIBUTIONS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def log_pep_model(
    checkpoint_path: str | Path,
    categories: dict[int, str],
    name: str = "model",
    input_example: pd.DataFrame | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the checkpoint as a pyfunc model (with signature) in the active run.

    The model is logged from code (`MODEL_CODE`) with the pep_model and pipeline packages
    beside it (`code_paths`), so it loads without this project installed and without pickle.
    """
    with tempfile.TemporaryDirectory() as tmp:
        categories_path = Path(tmp) / "categories.json"
        categories_path.write_text(json.dumps({str(k): v for k, v in categories.items()}))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint_path), "categories": str(categories_path)},
            signature=ModelSignature(
                inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=_param_schema(checkpoint_path)
            ),
            input_example=input_example,
            code_paths=[str(PROJECT_ROOT / d) for d in ("pep_model", "pipeline")],
            pip_requirements=model_requirements(),
        )


def _param_schema(checkpoint_path: str | Path) -> ParamSchema:
    """`PARAMS` with the checkpoint's own values as defaults."""
    from pep_model import checkpoint_config, read_checkpoint

    model_config = checkpoint_config(read_checkpoint(checkpoint_path)["config"]).model
    return ParamSchema(
        [ParamSpec(name, dtype, getattr(model_config, name)) for name, dtype in PARAMS]
    )
