"""jobs/predict_pep.py and pipeline.predict: model sources (files, Ray Train dirs, MLflow
URIs), per-image COCO results and overlays, skipped images, bad sources."""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import io
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

import pep_model
from pipeline import cli, tracking
from pipeline.coco import decode_rle
from pipeline.predict import (
    ModelSourceError,
    predict_images,
    read_category_file,
    resolve_model_source,
)
from pipeline.synth import CATEGORIES

JOBS = Path(__file__).resolve().parents[2] / "jobs"
NAMES = {k: c["name"] for k, c in enumerate(CATEGORIES, start=1)}
# A random-init model scores ~0.01: threshold 0 and a small cap give a few instances per image.
PREDICT_FLAGS = ["--score-threshold", "0", "--max-instances", "4", "--use-gpu", "false"]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv: list[str]) -> tuple[int, str, str]:
    """jobs/predict_pep.py main(argv) -> (exit status, stdout, stderr); the logger levels and
    environment the job sets for its own process are restored afterwards."""
    job = _job("predict_pep")
    out, err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(name) for name in cli.CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    env = dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = job.main(job.get_args_parser().parse_args(argv))
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        os.environ.clear()
        os.environ.update(env)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def logged_model(tiny_config, tmp_path_factory):
    """A tiny random-init checkpoint, logged as the pyfunc model of a run in a SQLite store
    and registered as `pep` version 1 with alias `champion`."""
    root = tmp_path_factory.mktemp("predict_model")
    cfg = tiny_config()
    torch.manual_seed(0)
    checkpoint = root / "pep.pt"
    pep_model.save_checkpoint(checkpoint, pep_model.build_model(cfg.model), cfg)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ambient = mlflow.get_tracking_uri()
    try:
        tracking.set_experiment("predict-test", uri)
        with mlflow.start_run() as run:
            info = tracking.log_pep_model(checkpoint, NAMES)
        version = mlflow.register_model(info.model_uri, "pep").version
        mlflow.MlflowClient(uri).set_registered_model_alias("pep", "champion", version)
    finally:
        mlflow.set_tracking_uri(ambient)  # resolution must use the URI it is given
    return SimpleNamespace(
        checkpoint=checkpoint,
        uri=uri,
        model_uri=info.model_uri,
        run_id=run.info.run_id,
        version=version,
    )


@pytest.fixture(scope="module")
def inputs(tiny_coco, tmp_path_factory):
    """Two generated 96 px JPEGs, a 150x100 RGBA PNG (resized for the model), a corrupt
    JPEG and a text file, in one folder."""
    folder = tmp_path_factory.mktemp("predict_inputs")
    val_images = sorted((tiny_coco / "val" / "images").glob("*.jpg"))
    for path in val_images[:2]:
        shutil.copy(path, folder / path.name)
    Image.open(val_images[2]).convert("RGBA").resize((150, 100)).save(folder / "wide.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def predicted(logged_model, inputs, tmp_path_factory):
    """The job run twice on `inputs`: from the checkpoint file and from its models:/ URI."""
    out = tmp_path_factory.mktemp("predict_out")
    runs = {}
    sources = {"file": str(logged_model.checkpoint), "mlflow": logged_model.model_uri}
    for name, source in sources.items():
        argv = ["--model", source, "--tracking-uri", logged_model.uri, "--out", str(out / name)]
        runs[name] = (out / name, *_run(argv + PREDICT_FLAGS + [str(inputs)]))
    return runs


def test_checkpoint_file_and_models_uri_give_identical_json(predicted):
    (file_out, status_file, _, _), (uri_out, status_uri, _, _) = predicted.values()
    assert status_file == status_uri == 0
    names = sorted(p.name for p in file_out.glob("*.json"))
    assert names == ["000004.json", "000008.json", "wide.json"]
    assert names == sorted(p.name for p in uri_out.glob("*.json"))
    total = 0
    for name in names:
        from_file = json.loads((file_out / name).read_text())
        from_uri = json.loads((uri_out / name).read_text())
        total += len(from_file)
        for a, b in zip(from_file, from_uri, strict=True):
            assert set(a) == {
                "image_id", "category_id", "segmentation", "bbox", "score", "category_name"
            }  # fmt: skip
            assert isinstance(a["segmentation"]["counts"], str) and len(a["bbox"]) == 4
            # no COCO id map given: category_id is the contiguous label; only the MLflow model
            # knows the class names (a bare checkpoint has none)
            assert a["category_name"] == str(a["category_id"])
            assert b["category_name"] == NAMES[b["category_id"]]
            assert {**a, "category_name": None} == {**b, "category_name": None}
    assert total > 0


def test_overlays_and_masks_have_the_original_image_size(predicted, inputs):
    out, _, stdout, _ = predicted["file"]
    for stem, source in (("000004", "000004.jpg"), ("wide", "wide.png")):
        with Image.open(inputs / source) as image:
            size = image.size  # (width, height)
        with Image.open(out / f"{stem}.png") as overlay:
            assert overlay.size == size and overlay.mode == "RGB"
        for r in json.loads((out / f"{stem}.json").read_text()):
            assert r["segmentation"]["size"] == [size[1], size[0]]
            mask = decode_rle(r["segmentation"]["counts"], size[1], size[0])
            x, y, w, h = r["bbox"]
            assert x + w <= size[0] and y + h <= size[1] and mask.any()
    # the overlay differs from the image where masks are drawn
    with Image.open(inputs / "000004.jpg") as image, Image.open(out / "000004.png") as overlay:
        assert np.abs(np.asarray(overlay, int) - np.asarray(image.convert("RGB"), int)).max() > 30
    assert "images:    3 predicted, 1 skipped" in stdout


def test_logged_model_predicts_what_the_job_writes(
    predicted, logged_model, inputs, load_pyfunc_fresh
):
    """The MLflow pyfunc and jobs/predict_pep.py resize alike (wide.png, 150x100, goes in at
    the checkpoint's data.max_size 96) and give the same instances at the original size."""
    out, *_ = predicted["file"]
    expected = json.loads((out / "wide.json").read_text())
    params = {"score_threshold": 0.0, "max_instances": 4}
    done, report = load_pyfunc_fresh(
        logged_model.uri, logged_model.model_uri, inputs / "wide.png", params
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = report["rows"]
    assert len(rows) == len(expected) > 0
    for row, result in zip(rows, expected):
        assert (row["height"], row["width"]) == (100, 150)
        assert (
            row["label"] == result["category_id"]
            and row["mask_rle"] == result["segmentation"]["counts"]
        )
        assert row["score"] == pytest.approx(result["score"])
        x, y, w, h = result["bbox"]
        assert [row["x0"], row["y0"], row["x1"], row["y1"]] == pytest.approx(
            [x, y, x + w - 1, y + h - 1]
        )


def test_unreadable_image_is_skipped_and_named(predicted, inputs):
    out, status, stdout, _ = predicted["file"]
    assert status == 0
    assert f"skipped:   {inputs / 'broken.jpg'}: cannot read the image" in stdout
    assert not (out / "broken.json").exists() and not (out / "broken.png").exists()
    assert "notes.txt" not in stdout  # folders expand to image files only


def test_mlflow_download_progress_only_with_verbose(logged_model, inputs, tmp_path):
    argv = ["--model", logged_model.model_uri, "--tracking-uri", logged_model.uri]
    argv += PREDICT_FLAGS + [str(inputs)]
    status, _, err = _run(argv + ["--out", str(tmp_path / "quiet")])
    assert status == 0 and "Downloading artifacts" not in err
    status, _, err = _run(argv + ["--out", str(tmp_path / "verbose"), "--verbose"])
    assert status == 0 and "Downloading artifacts" in err


def test_every_source_form_resolves_to_the_logged_checkpoint(logged_model, tmp_path):
    m = logged_model
    ray_train_dir = tmp_path / "checkpoint_000001"
    ray_train_dir.mkdir()
    shutil.copy(m.checkpoint, ray_train_dir / "checkpoint.pt")
    assert resolve_model_source(m.checkpoint) == (m.checkpoint, None)
    assert resolve_model_source(ray_train_dir) == (ray_train_dir / "checkpoint.pt", None)
    for uri in (
        m.model_uri,
        "models:/pep@champion",
        f"models:/pep/{m.version}",
        f"runs:/{m.run_id}/model",
    ):
        checkpoint, categories = resolve_model_source(uri, m.uri, dst_dir=tmp_path / "dl")
        assert filecmp.cmp(checkpoint, m.checkpoint, shallow=False), uri
        assert checkpoint.parent.name == "artifacts"  # pyfunc artifacts live under artifacts/
        assert categories == NAMES, uri
    # a downloaded MLflow model directory works as a local source too
    assert resolve_model_source(checkpoint.parent.parent)[1] == NAMES


def test_checkpoints_on_s3_resolve_to_a_download(logged_model, s3_server, tmp_path):
    """A checkpoint file or a Ray Train checkpoint directory on S3 (the endpoint from
    AWS_ENDPOINT_URL, as pyarrow and Ray Train read it)."""
    m = logged_model
    s3_server.client.upload_file(str(m.checkpoint), s3_server.bucket, "ckpt/one.pt")
    s3_server.client.upload_file(
        str(m.checkpoint), s3_server.bucket, "runs/r/checkpoint_epoch_0003/checkpoint.pt"
    )
    for uri in (
        f"s3://{s3_server.bucket}/ckpt/one.pt",
        f"s3://{s3_server.bucket}/runs/r/checkpoint_epoch_0003",
    ):
        checkpoint, categories = resolve_model_source(uri, dst_dir=tmp_path / "s3")
        assert filecmp.cmp(checkpoint, m.checkpoint, shallow=False), uri
        assert categories is None
    with pytest.raises(ModelSourceError, match="nope.pt: checkpoint not found"):
        resolve_model_source(f"s3://{s3_server.bucket}/ckpt/nope.pt", dst_dir=tmp_path)


def test_evaluate_job_accepts_mlflow_uris(logged_model):
    job = _job("evaluate_pep")
    checkpoint = job.resolve_checkpoint("models:/pep@champion", logged_model.uri)
    assert filecmp.cmp(checkpoint, logged_model.checkpoint, shallow=False)


def test_category_file_gives_coco_category_and_image_ids(logged_model, tiny_coco, tmp_path):
    annotations = tiny_coco / "val" / "annotations.json"
    category_map, image_ids = read_category_file(annotations)
    image = sorted((tiny_coco / "val" / "images").glob("*.jpg"))[0]
    (record,) = predict_images(
        [image], logged_model.checkpoint, 0.0, 3, tmp_path, category_map,
        use_gpu=False, image_ids=image_ids,
    )  # fmt: skip
    results = json.loads(Path(record["json"]).read_text())
    assert record["instances"] == len(results) > 0
    coco_names = {c["id"]: c["name"] for c in CATEGORIES}
    for r in results:
        assert r["image_id"] == image_ids[image.name]
        assert r["category_name"] == coco_names[r["category_id"]]  # COCO ids, with gaps


@pytest.mark.parametrize(
    "source, message",
    [
        ("missing.pt", "missing.pt: checkpoint not found"),
        ("empty_dir", "neither checkpoint.pt (a Ray Train checkpoint) nor MLmodel"),
        ("notes.pt", "notes.pt: cannot read checkpoint"),
        ("models:/nope@champion", "models:/nope@champion: cannot download the model from MLflow"),
        ("runs:/0123456789abcdef/model", "runs:/0123456789abcdef/model: cannot download"),
    ],
)
def test_bad_source_exits_2_with_a_message(
    source, message, logged_model, inputs, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    argv = ["--model", source, "--tracking-uri", logged_model.uri, "--out", "out"]
    status, stdout, stderr = _run(argv + PREDICT_FLAGS + [str(inputs / "000004.jpg")])
    assert status == 2, stdout + stderr
    assert stderr.startswith("error: ") and message in stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mlflow_uri_without_a_tracking_uri_is_refused(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no work/mlflow.db here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelSourceError, match="models:/pep@champion: no MLflow tracking URI"):
        resolve_model_source("models:/pep@champion")
    with pytest.raises(ModelSourceError, match="no such SQLite file"):
        resolve_model_source("models:/pep@champion", f"sqlite:///{tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()


def test_no_image_files_exits_2(logged_model, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    argv = ["--model", str(logged_model.checkpoint), "--out", str(tmp_path / "out")]
    status, _, stderr = _run(argv + PREDICT_FLAGS + [str(tmp_path)])
    assert status == 2 and f"error: no image files in ['{tmp_path}']" in stderr
