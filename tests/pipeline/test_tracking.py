"""pipeline.tracking's logged PEP model: logged from code (nothing pickled), a plain checkpoint
artifact, loadable and predicting in a fresh process; models pickled by earlier versions."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
import yaml
from mlflow.models import ModelSignature

import pep_model
from pipeline import tracking
from pipeline.predict import resolve_model_source

ZERO_THRESHOLD = {"score_threshold": 0.0, "max_instances": 3}  # a random-init model scores ~0.01


@pytest.fixture(scope="module")
def logged(tiny_config, tiny_coco, tmp_path_factory):
    """One tiny random-init checkpoint logged twice in a SQLite store: from code (the current
    `log_pep_model`, registered as `pep@champion`) and as earlier versions logged it (a
    pickled `PEPPyfunc` instance)."""
    root = tmp_path_factory.mktemp("tracking")
    cfg = tiny_config("model.score_threshold=0.001", "model.max_instances=2")
    torch.manual_seed(0)
    checkpoint = root / "pep.pt"
    pep_model.save_checkpoint(checkpoint, pep_model.build_model(cfg.model), cfg)
    categories = {k: f"class{k}" for k in range(1, cfg.model.num_classes + 1)}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ambient = mlflow.get_tracking_uri()
    try:
        tracking.set_experiment("tracking-test", uri)
        with mlflow.start_run() as run:
            info = tracking.log_pep_model(checkpoint, categories)
            (root / "categories.json").write_text(json.dumps(categories))
            pickled = mlflow.pyfunc.log_model(
                name="pickled",
                python_model=tracking.PEPPyfunc(),
                artifacts={
                    "checkpoint": str(checkpoint),
                    "categories": str(root / "categories.json"),
                },
                signature=ModelSignature(tracking.INPUT_SCHEMA, tracking.OUTPUT_SCHEMA),
                code_paths=[str(tracking.PROJECT_ROOT / d) for d in ("pep_model", "pipeline")],
            )
        version = mlflow.register_model(info.model_uri, "pep").version
        mlflow.MlflowClient(uri).set_registered_model_alias("pep", "champion", version)
        model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=root / "dl"))
    finally:
        mlflow.set_tracking_uri(ambient)
    image = sorted((tiny_coco / "val" / "images").glob("*.jpg"))[0]
    return SimpleNamespace(
        uri=uri,
        checkpoint=checkpoint,
        categories=categories,
        model_uri=info.model_uri,
        pickled_uri=pickled.model_uri,
        run_id=run.info.run_id,
        model_dir=model_dir,
        image=image,
    )


def test_model_is_logged_as_code_with_a_plain_checkpoint(logged):
    files = {p.relative_to(logged.model_dir).as_posix() for p in logged.model_dir.rglob("*")}
    assert "python_model.pkl" not in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    assert {"pep_pyfunc.py", "code/pipeline/tracking.py", "code/pep_model/pep.py"} <= files
    flavor = yaml.safe_load((logged.model_dir / "MLmodel").read_text())["flavors"]
    pyfunc = flavor["python_function"]
    assert Path(pyfunc["model_code_path"]).name == "pep_pyfunc.py"
    assert "python_model" not in pyfunc  # the key of a pickled model
    checkpoint = logged.model_dir / pyfunc["artifacts"]["checkpoint"]["path"]
    assert filecmp.cmp(checkpoint, logged.checkpoint, shallow=False)
    # the signature's params default to the checkpoint's own post-processing settings
    params = mlflow.models.Model.load(logged.model_dir).signature.params
    assert {p.name: p.default for p in params.params} == {
        "score_threshold": 0.001,
        "max_instances": 2,
    }


def test_model_requirements_are_pinned_not_inferred(logged):
    """Explicit requirements (MLflow's inference loads the model in a subprocess, ~10 s, and
    missed torch): what the model imports, at the installed versions."""
    from importlib.metadata import version

    lines = (logged.model_dir / "requirements.txt").read_text().split()
    for name in ("torch", "torchvision", "pycocotools", "mlflow", "pillow"):
        assert f"{name}=={version(name)}" in lines


@pytest.fixture(scope="module")
def fresh_default_load(logged, load_pyfunc_fresh, tmp_path_factory):
    """The logged model loaded in a fresh process and run on one image without params."""
    return load_pyfunc_fresh(
        logged.uri, logged.model_uri, logged.image, cwd=tmp_path_factory.mktemp("fresh")
    )


def test_model_loads_in_a_fresh_process_without_unpickling(
    logged, load_pyfunc_fresh, fresh_default_load, tmp_path
):
    done, report = load_pyfunc_fresh(
        logged.uri, "models:/pep@champion", logged.image, ZERO_THRESHOLD, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["signature"] and report["run_id"] == logged.run_id
    # the wrapper's code comes from the model's own code/ folder, not from this checkout
    assert Path(report["code"]).parts[-3:] == ("code", "pipeline", "tracking.py")
    assert not Path(report["code"]).is_relative_to(tracking.PROJECT_ROOT)
    rows = report["rows"]
    assert len(rows) == 3  # max_instances from the params
    assert report["columns"] == [c.name for c in tracking.OUTPUT_SCHEMA.inputs]
    for row in rows:
        assert (row["height"], row["width"]) == (96, 96)
        assert row["category"] == logged.categories[row["label"]]
        assert 0 <= row["x0"] <= row["x1"] < 96 and 0 <= row["y0"] <= row["y1"] < 96
        assert row["mask_rle"] and row["score"] > 0
    # without params: the checkpoint's own settings (max_instances 2)
    done, report = fresh_default_load
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(report["rows"]) == 2
    assert all(row["score"] >= 0.001 for row in report["rows"])


def test_model_pickled_by_earlier_versions_still_loads(
    logged, load_pyfunc_fresh, fresh_default_load, tmp_path
):
    """Models logged before models-from-code keep working: MLflow unpickles their wrapper
    (by default; `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false` refuses with its own message),
    predict_pep/evaluate_pep read only their checkpoint. Their signature has no params, so
    they predict with the checkpoint's settings."""
    done, report = load_pyfunc_fresh(
        logged.uri, logged.pickled_uri, logged.image, refuse_pickle=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, current = fresh_default_load
    assert report["rows"] == current["rows"] and len(report["rows"]) == 2  # same checkpoint
    # the fresh-process check above does catch unpickling: it refuses the pickled model
    done, _ = load_pyfunc_fresh(logged.uri, logged.pickled_uri, logged.image)
    assert done.returncode != 0 and "unpickling refused by the test" in done.stderr
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done, _ = load_pyfunc_fresh(
        logged.uri, logged.pickled_uri, logged.image, refuse_pickle=False, env=env
    )
    assert done.returncode != 0
    assert "Deserializing model using pickle is disallowed" in done.stderr
    assert "models-from-code" in done.stderr
    checkpoint, categories = resolve_model_source(logged.pickled_uri, logged.uri, tmp_path)
    assert filecmp.cmp(checkpoint, logged.checkpoint, shallow=False)
    assert categories == logged.categories
