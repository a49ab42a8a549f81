"""Shards on cloud storage: `prepare_coco.py --out s3://...` on the S3 stand-in (moto on
loopback), then every reader of shards on those URIs: Ray Data, the in-process readers,
the ground truth that travels with them, `--data s3://...` and evaluate_pep.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pep_model
from pipeline import experiment, storage
from pipeline.inference import _shards_setup
from pipeline.prepare import MANIFEST_NAME, PrepareConfig, PrepareError, prepare, read_manifest
from pipeline.reader import image_sizes, local_batches, open_shards, shard_files

ROOT = Path(__file__).resolve().parents[2]


def _object_state(s3_server, prefix: str) -> dict[str, tuple[str, str]]:
    """key -> (ETag, LastModified) of every object under `prefix` (pyarrow's folder markers,
    empty keys ending in "/", left out)."""
    pages = s3_server.client.get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix=prefix
    )
    return {
        item["Key"]: (item["ETag"], str(item["LastModified"]))
        for page in pages
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    }


def test_prepare_to_s3_writes_the_same_shards_as_on_disk_with_their_ground_truth(
    s3_shards, s3_server, tiny_coco, tiny_shards
):
    """The job's output on S3: the shards byte for byte as a local prepare of the same input
    writes them, the manifest last, the val ground truth beside them, nothing temporary."""
    val = f"{s3_shards.root}/val"
    result = s3_shards.results["val"]
    assert not result.reused and result.out_dir == val
    keys = s3_server.keys("shards/tiny/")
    manifest = read_manifest(val)
    local = read_manifest(tiny_shards / "val")
    assert manifest["counts"] == local["counts"] and manifest["shards"] == local["shards"]
    for shard in manifest["shards"]:
        remote = storage.open_parquet(f"{val}/{shard['file']}").read()
        assert remote.equals(pq.read_table(tiny_shards / "val" / shard["file"]))
    assert manifest["source"]["annotations_copy"] == "annotations.json"
    copied = storage.read_text(f"{val}/annotations.json")
    assert copied == (tiny_coco / "val" / "annotations.json").read_text()
    expected = {f"shards/tiny/{split}/{MANIFEST_NAME}" for split in ("train", "val")}
    assert expected <= set(keys)
    assert not [key for key in keys if ".tmp-" in key]  # the temporary prefix is gone


def test_prepare_on_s3_reuses_rebuilds_and_refuses_foreign_prefixes(
    s3_shards, s3_server, tiny_coco, monkeypatch
):
    split = tiny_coco / "val"
    out = f"{s3_shards.root}/val"
    before = _object_state(s3_server, "shards/tiny/val/")
    again = prepare(split / "annotations.json", split / "images", out, PrepareConfig(max_size=96))
    assert again.reused and _object_state(s3_server, "shards/tiny/val/") == before

    # A build that dies leaves the shards it was to replace as they were.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("pipeline.prepare._build", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare(split / "annotations.json", split / "images", out, force=True)
    assert _object_state(s3_server, "shards/tiny/val/") == before

    # A lost shard is found, and the rebuild puts the same bytes back.
    s3_server.client.delete_object(Bucket=s3_server.bucket, Key="shards/tiny/val/annotations.json")
    rebuilt = prepare(split / "annotations.json", split / "images", out, PrepareConfig(max_size=96))
    assert rebuilt.rebuild_reason == "annotations.json missing or modified"
    assert {k: v[0] for k, v in _object_state(s3_server, "shards/tiny/val/").items()} == {
        k: v[0] for k, v in before.items()
    }

    s3_server.client.put_object(Bucket=s3_server.bucket, Key="precious/thesis.txt", Body=b"x")
    with pytest.raises(PrepareError, match="refusing to replace"):
        prepare(split / "annotations.json", split / "images", f"s3://{s3_server.bucket}/precious")
    assert s3_server.keys("precious/") == ["precious/thesis.txt"]
    with pytest.raises(PrepareError, match=r"s3://pep-test/nowhere/manifest.json: no manifest"):
        read_manifest(f"s3://{s3_server.bucket}/nowhere")


def test_readers_take_shards_on_s3(s3_shards, tiny_shards, tiny_config):
    """Ray Data, the in-process batches, the image sizes and the ground truth (downloaded
    once) read the shards behind the URI as they read the same shards on disk."""
    train, val = f"{s3_shards.root}/train", f"{s3_shards.root}/val"
    assert shard_files(train)[0].startswith("s3://pep-test/shards/tiny/train/shard-")
    rows = open_shards(train).select_columns(["image_id"]).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(image_sizes(tiny_shards / "train"))
    assert image_sizes(val) == image_sizes(tiny_shards / "val")
    data_cfg = tiny_config().data
    (images, targets), *_ = local_batches(val, data_cfg, batch_size=2)
    (local_images, local_targets), *_ = local_batches(tiny_shards / "val", data_cfg, 2)
    assert all((a == b).all() for a, b in zip(images, local_images))
    assert [t["image_id"] for t in targets] == [t["image_id"] for t in local_targets]

    _, gt_path, _ = _shards_setup(val, None)
    assert gt_path.read_text() == storage.read_text(f"{val}/annotations.json")
    assert _shards_setup(val, None)[1] == gt_path  # cached: the same file, not a new download

    splits = experiment.resolve_data(s3_shards.root, tiny_config(), "/unused")
    assert (splits.train_shards, splits.val_shards) == (train, val)
    assert storage.parent(train) == s3_shards.root  # the root sweeps and ablations pass on
    assert splits.val_annotations == f"{val}/annotations.json"
    assert splits.fingerprint == read_manifest(tiny_shards / "val")["source"]["fingerprint"]
    with pytest.raises(experiment.DataError, match="prepare_coco.py --out s3://pep-test/coco/"):
        experiment.resolve_data("s3://pep-test/coco", tiny_config(), "/unused")


def test_evaluate_job_scores_shards_on_s3_as_on_disk(s3_shards, tiny_shards, tiny_config, tmp_path):
    """jobs/evaluate_pep.py `--data s3://...`: Ray Data inference over the bucket's shards,
    scored against the ground truth stored beside them; the same results as from disk."""
    spec = importlib.util.spec_from_file_location("evaluate_pep", ROOT / "jobs/evaluate_pep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = tiny_config()
    checkpoint = tmp_path / "pep.pt"
    pep_model.save_checkpoint(checkpoint, pep_model.build_model(cfg.model), cfg)
    outputs = {}
    for name, data in (("s3", f"{s3_shards.root}/val"), ("disk", str(tiny_shards / "val"))):
        argv = ["--checkpoint", str(checkpoint), "--data", data, "--use-gpu", "false"]
        argv += ["--score-thresholds", "0"]  # a random model: keep every candidate
        argv += ["--num-cpus-per-replica", "0.5", "--out", str(tmp_path / f"{name}.json")]
        metrics, _ = job.main(job.get_args_parser().parse_args(argv))
        results = json.loads((tmp_path / f"{name}.json").read_text())
        outputs[name] = (metrics, sorted((r["image_id"], r["score"]) for r in results))
    assert outputs["s3"][1] and outputs["s3"][1] == outputs["disk"][1]
    assert outputs["s3"][0]["segm/AP"] == outputs["disk"][0]["segm/AP"]
