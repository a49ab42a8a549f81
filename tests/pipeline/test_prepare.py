"""prepare(): shards, manifest, category map, mask round trip, reuse and atomic replacement."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.coco import decode_segmentation
from pipeline.prepare import (
    MANIFEST_NAME,
    SHARD_SCHEMA,
    PrepareConfig,
    PrepareError,
    prepare,
    read_manifest,
)
from pipeline.reader import category_map, image_sizes, shard_files

ROOT = Path(__file__).resolve().parents[2]
NUCLEI = ROOT / "tests" / "fixtures" / "nuclei_tiny"
MAX_SIZE = 72  # the generated images are 96 px: prepare resizes them


@pytest.fixture(scope="module")
def synth_prepared(ray_session, tiny_coco, tmp_path_factory):
    """The generated train split prepared with a resize (96 -> 72 px)."""
    out = tmp_path_factory.mktemp("prepare") / "shards"
    split = tiny_coco / "train"
    result = prepare(
        split / "annotations.json", split / "images", out, PrepareConfig(max_size=MAX_SIZE)
    )
    source = json.loads((split / "annotations.json").read_text())
    rows = [r for path in shard_files(out) for r in pq.read_table(path).to_pylist()]
    return result, source, rows


def _resized_reference(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent resize of a source mask: torch bilinear with antialiasing, threshold 0.5."""
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(mask)[None, None].float(),
        size=(height, width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return (resized[0, 0] >= 0.5).numpy()


def test_counts_reconcile_and_manifest_describes_the_shards(synth_prepared):
    result, source, rows = synth_prepared
    manifest = result.manifest
    counts = manifest["counts"]
    assert not result.reused
    assert counts["images_in"] == len(source["images"]) == counts["images_written"]
    assert counts["annotations_in"] == len(source["annotations"])
    assert counts["annotations_in"] == (
        counts["annotations_written"] + counts["annotations_rejected"]
    )
    # Generated data is clean; only objects too small for the 72 px size may be rejected.
    assert {r["code"] for r in manifest["rejected"]} <= {"vanished"}
    assert counts["annotations_written"] == sum(len(r["labels"]) for r in rows)
    assert counts["crowd_annotations_written"] == sum(a["iscrowd"] for a in source["annotations"])
    assert counts["negative_images_written"] == sum(not r["labels"] for r in rows) >= 1
    assert manifest["config"] == {"max_size": MAX_SIZE, "jpeg_quality": 95, "rows_per_shard": 256}
    assert len(manifest["source"]["fingerprint"]) == 64
    assert manifest["source"]["annotations"].endswith("train/annotations.json")
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows)
    assert pq.read_schema(shard_files(result.out_dir)[0]).remove_metadata() == SHARD_SCHEMA
    assert read_manifest(result.out_dir) == manifest
    assert [r["image_id"] for r in rows] == [i["id"] for i in source["images"]]  # input order


def test_category_map_is_contiguous_and_round_trips(synth_prepared):
    result, source, rows = synth_prepared
    cats = category_map(result.out_dir)
    coco_ids = sorted(c["id"] for c in source["categories"])
    assert cats.coco_ids == tuple(coco_ids) and cats.num_classes == len(coco_ids)
    assert [cats.to_coco(cats.to_contiguous(i)) for i in coco_ids] == coco_ids
    original = {a["id"]: a["category_id"] for a in source["annotations"]}
    for row in rows:
        assert all(1 <= label <= cats.num_classes for label in row["labels"])
        for ann_id, label in zip(row["ann_ids"], row["labels"]):
            assert cats.to_coco(label) == original[ann_id]


def test_masks_round_trip_at_the_resized_size(synth_prepared):
    """Shard RLE == source mask resized (independent torch resize) within resize tolerance;
    boxes and areas agree with the shard masks."""
    _, source, rows = synth_prepared
    anns = {a["id"]: a for a in source["annotations"]}
    images = {i["id"]: i for i in source["images"]}
    ious = []
    for row in rows:
        h, w = row["height"], row["width"]
        src = images[row["image_id"]]
        assert max(h, w) == MAX_SIZE and (row["orig_height"], row["orig_width"]) == (
            src["height"],
            src["width"],
        )
        for k, ann_id in enumerate(row["ann_ids"]):
            mask = mask_utils.decode({"size": [h, w], "counts": row["masks"][k].encode()})
            ann = anns[ann_id]
            full = decode_segmentation(ann["segmentation"], src["height"], src["width"])
            reference = _resized_reference(full, h, w)
            iou = (mask.astype(bool) & reference).sum() / (mask.astype(bool) | reference).sum()
            ious.append(iou)
            assert iou > (0.9 if reference.sum() >= 40 else 0.6), (ann_id, iou)
            ys, xs = np.nonzero(mask)
            assert row["boxes"][k] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert row["areas"][k] == mask.sum()
            assert row["iscrowd"][k] == bool(ann["iscrowd"])
    assert np.mean(ious) > 0.95


def test_images_are_resized_rgb_jpeg_and_sizes_are_recoverable(synth_prepared):
    result, source, rows = synth_prepared
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (row["width"], row["height"])
    sizes = image_sizes(result.out_dir)
    assert sizes == {i["id"]: (i["height"], i["width"]) for i in source["images"]}


def test_real_nuclei_rles_survive_prepare(ray_session, tmp_path):
    """Real compressed RLE (another encoder) kept byte for byte at size, resized below it."""
    source = json.loads((NUCLEI / "annotations.json").read_text())
    anns = {a["id"]: a for a in source["annotations"]}
    for max_size in (512, 128):
        out = tmp_path / f"shards{max_size}"
        result = prepare(
            NUCLEI / "annotations.json", NUCLEI / "images", out, PrepareConfig(max_size=max_size)
        )
        counts = result.manifest["counts"]
        assert counts["images_written"] == 3
        assert (
            counts["annotations_in"]
            == 227
            == (counts["annotations_written"] + counts["annotations_rejected"])
        )
        rows = [r for path in shard_files(out) for r in pq.read_table(path).to_pylist()]
        if max_size == 512:  # no resize: the RLE strings and the JPEG bytes are copied
            assert counts["annotations_written"] == 227
            for row in rows:
                assert row["image"] == (NUCLEI / "images" / row["file_name"]).read_bytes()
                for ann_id, counts_str in zip(row["ann_ids"], row["masks"]):
                    assert counts_str == anns[ann_id]["segmentation"]["counts"]
        else:  # tiny nuclei may vanish at 128 px; each is listed with its reason
            for rejection in result.manifest["rejected"]:
                assert rejection["code"] == "vanished" and "vanishes" in rejection["reason"]
            assert all(max(r["height"], r["width"]) == 128 for r in rows)


def _shard_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def ray_data_warnings():
    """The warnings Ray Data logs in this process (e.g. "[SaveMode=overwrite] Replacing
    contents ..." when a write replaces a folder)."""
    handler = _Records()
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def test_reuse_force_and_rebuild_on_changes(
    ray_session, tiny_coco, tmp_path, capsys, ray_data_warnings
):
    """Same input+config: reused, nothing rewritten (CLI says so); --force: rebuilt with
    identical bytes (deterministic); a changed config or input: rebuilt. No build replaces a
    folder through Ray Data (which warns on every overwrite)."""
    from jobs.prepare_coco import get_args_parser, main

    split = tmp_path / "coco"
    shutil.copytree(tiny_coco / "train", split)
    out = tmp_path / "shards"
    argv = ["--annotations", str(split / "annotations.json"), "--images", str(split / "images")]
    argv += ["--out", str(out), "--max-size", "64"]
    first = main(get_args_parser().parse_args(argv))
    assert not first.reused
    before = _shard_state(out)

    again = main(get_args_parser().parse_args(argv))
    assert again.reused
    assert _shard_state(out) == before  # same files, same mtimes
    printed = capsys.readouterr().out
    assert "Reused the existing shards" in printed and "images in" in printed

    forced = main(get_args_parser().parse_args(argv + ["--force"]))
    assert not forced.reused and forced.rebuild_reason == "--force given"
    after = _shard_state(out)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    assert all(after[k][0] != before[k][0] for k in after)  # rewritten

    resized = prepare(split / "annotations.json", split / "images", out, PrepareConfig(56))
    assert not resized.reused and resized.rebuild_reason.startswith("config changed")

    data = json.loads((split / "annotations.json").read_text())
    data["annotations"] = data["annotations"][1:]
    (split / "annotations.json").write_text(json.dumps(data))
    changed = prepare(split / "annotations.json", split / "images", out, PrepareConfig(56))
    assert not changed.reused and changed.rebuild_reason.startswith("input changed")
    assert changed.manifest["counts"]["annotations_in"] == len(data["annotations"])
    assert not list(tmp_path.glob(".shards.*"))  # no temporary folders left behind
    assert [r.getMessage() for r in ray_data_warnings] == []


def test_refuses_to_replace_a_folder_that_is_not_shards(tiny_coco, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    split = tiny_coco / "train"
    with pytest.raises(PrepareError, match="refusing to replace"):
        prepare(split / "annotations.json", split / "images", out)
    assert (out / "thesis.txt").exists()


def test_interrupted_prepare_keeps_the_previous_shards(synth_prepared, tiny_coco, monkeypatch):
    result, _, _ = synth_prepared
    before = _shard_state(result.out_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.prepare._build", crash)
    split = tiny_coco / "train"
    with pytest.raises(KeyboardInterrupt):
        prepare(split / "annotations.json", split / "images", result.out_dir, force=True)
    assert _shard_state(result.out_dir) == before
    assert (result.out_dir / MANIFEST_NAME).exists()
    assert not list(result.out_dir.parent.glob(".shards.tmp-*"))
