"""Bad COCO input: every broken record is rejected with its reason or repaired, never lost."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.coco import CocoFormatError, load_coco_json
from pipeline.prepare import PrepareConfig, prepare
from pipeline.reader import category_map, shard_files

ROOT = Path(__file__).resolve().parents[2]
W, H = 64, 48
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]  # ids with gaps


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _write_images(images: Path) -> None:
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    rgb.save(images / "ok.jpg", quality=95)
    rgb.save(images / "empty.jpg", quality=95)
    rgb.resize((W + 16, H + 12)).save(images / "mismatch.jpg")
    data = (images / "ok.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "text.jpg").write_text("this is not an image\n")
    gray16 = np.full((H, W), 65535, np.uint16)
    gray16[:, : W // 2] = 32896  # 32896 / 257 = 128
    Image.fromarray(gray16).save(images / "gray16.png")  # mode I;16
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png")
    rgb.convert("RGBA").save(images / "rgba.png")
    rgb.convert("L").save(images / "gray.png")


def _image(image_id: int, file_name: str, width: int = W, height: int = H) -> dict:
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def _ann(ann_id: int, image_id: int, segmentation, category_id: int = 3, **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": 0,
        "bbox": [0, 0, 1, 1],
        "area": 1.0,
        **extra,
    }


def _crowd_rle() -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[30:45, 2:30] = 1
    counts, value, run = [], 0, 0  # uncompressed, column-major, starting with zeros
    for pixel in mask.flatten(order="F"):
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


ANNOTATIONS = {
    # id: (annotation, expected rejection code or None when kept)
    1: (_ann(1, 1, _square(10, 10, 30, 20)), None),
    2: (_ann(2, 1, [[5, 5, 20, 5]]), "short_polygon"),
    3: (_ann(3, 1, [[5, 5, float("nan"), 9, 20, 20]]), "non_finite"),
    4: (_ann(4, 1, {"size": [H, W], "counts": [H * W]}), "zero_area"),
    5: (_ann(5, 1, _square(1, 1, 9, 9), category_id=5), "unknown_category"),
    6: (_ann(6, 99, _square(1, 1, 9, 9)), "unknown_image"),
    7: (_ann(7, 1, _square(50, 30, 90, 70), bbox=[50, 30, 40, 40]), None),  # partly outside
    8: (_ann(8, 1, _crowd_rle(), category_id=17, iscrowd=1), None),
    9: (_ann(9, 2, _square(1, 1, 9, 9)), "image_rejected"),  # on the missing image
    10: (_ann(10, 2, _square(2, 2, 9, 9)), "image_rejected"),
    11: (_ann(11, 3, _square(1, 1, 9, 9)), "image_rejected"),  # on the truncated image
    12: (_ann(12, 5, _square(1, 1, 9, 9)), "image_rejected"),  # on the size mismatch
    13: (_ann(13, 6, _square(1, 1, 20, 20), category_id=17), None),  # on the 16-bit image
}
IMAGES = {
    # id: (record, expected rejection code or None when kept)
    1: (_image(1, "ok.jpg"), None),
    2: (_image(2, "missing.jpg"), "missing_file"),
    3: (_image(3, "truncated.jpg"), "undecodable_image"),
    4: (_image(4, "text.jpg"), "undecodable_image"),
    5: (_image(5, "mismatch.jpg"), "size_mismatch"),
    6: (_image(6, "gray16.png"), None),
    7: (_image(7, "palette.png"), None),
    8: (_image(8, "rgba.png"), None),
    9: (_image(9, "gray.png"), None),
    10: (_image(10, "empty.jpg"), None),  # no annotations: a negative example
}


@pytest.fixture(scope="module")
def broken(ray_session, tmp_path_factory):
    """A COCO folder with one broken record of each kind, prepared once."""
    root = tmp_path_factory.mktemp("broken_coco")
    _write_images(root / "images")
    data = {
        "images": [rec for rec, _ in IMAGES.values()],
        "annotations": [ann for ann, _ in ANNOTATIONS.values()],
        "categories": CATEGORIES,
    }
    # json.dumps writes NaN as a bare `NaN`, which Python's json (like COCO's tools) accepts.
    (root / "annotations.json").write_text(json.dumps(data))
    result = prepare(
        root / "annotations.json", root / "images", root / "shards", PrepareConfig(max_size=64)
    )
    table = pq.read_table(shard_files(root / "shards")[0])
    rows = {r["image_id"]: r for r in table.to_pylist()}
    rejected = {(r["kind"], r["id"]): r for r in result.manifest["rejected"]}
    return result.manifest, rows, rejected


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "prepare_coco.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_invalid_json_exits_nonzero_naming_file_line_and_column(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [\n  {"id": 1,}\n]}\n')
    (tmp_path / "images").mkdir()
    proc = _run_cli("--annotations", str(bad), "--images", str(tmp_path / "images"),
                    "--out", str(tmp_path / "shards"))  # fmt: skip
    assert proc.returncode != 0
    assert str(bad) in proc.stderr
    assert "line 2, column 12" in proc.stderr, proc.stderr
    assert not (tmp_path / "shards").exists()


def test_json_without_images_exits_nonzero(tmp_path):
    bad = tmp_path / "no_images.json"
    bad.write_text(json.dumps({"annotations": [], "categories": CATEGORIES}))
    (tmp_path / "images").mkdir()
    proc = _run_cli("--annotations", str(bad), "--images", str(tmp_path / "images"),
                    "--out", str(tmp_path / "shards"))  # fmt: skip
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "'images'" in proc.stderr, proc.stderr


def test_non_utf8_and_non_object_json_raise_format_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CocoFormatError, match="not UTF-8"):
        load_coco_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(CocoFormatError, match="JSON object"):
        load_coco_json(path)


def test_counts_reconcile(broken):
    manifest, rows, rejected = broken
    counts = manifest["counts"]
    assert counts["images_in"] == len(IMAGES)
    assert counts["annotations_in"] == len(ANNOTATIONS)
    assert counts["images_in"] == counts["images_written"] + counts["images_rejected"]
    assert counts["annotations_in"] == (
        counts["annotations_written"] + counts["annotations_rejected"]
    )


def test_nothing_silently_lost(broken):
    """Every record is either in a shard row or listed as rejected, with the expected code."""
    manifest, rows, rejected = broken
    written_anns = {a for r in rows.values() for a in r["ann_ids"]}
    for image_id, (_, code) in IMAGES.items():
        if code is None:
            assert image_id in rows, image_id
        else:
            assert image_id not in rows and rejected[("image", image_id)]["code"] == code
    for ann_id, (_, code) in ANNOTATIONS.items():
        if code is None:
            assert ann_id in written_anns, ann_id
        else:
            assert ann_id not in written_anns
            assert rejected[("annotation", ann_id)]["code"] == code, rejected[
                ("annotation", ann_id)
            ]


def test_missing_file_rejects_image_and_its_annotations(broken):
    _, _, rejected = broken
    assert rejected[("image", 2)]["reason"] == "missing file"
    for ann_id in (9, 10):
        assert rejected[("annotation", ann_id)]["reason"] == "image rejected: missing file"


def test_truncated_and_non_image_files_are_undecodable(broken):
    _, _, rejected = broken
    for image_id in (3, 4):
        assert rejected[("image", image_id)]["reason"].startswith("undecodable image: ")
    assert rejected[("annotation", 11)]["reason"].startswith("image rejected: undecodable image")


def test_size_mismatch_names_both_sizes(broken):
    _, _, rejected = broken
    reason = rejected[("image", 5)]["reason"]
    assert f"{W + 16}x{H + 12}" in reason and f"{W}x{H}" in reason


def test_bad_polygons_and_zero_area_masks_are_rejected(broken):
    _, _, rejected = broken
    assert "2 points (< 3)" in rejected[("annotation", 2)]["reason"]
    assert "NaN" in rejected[("annotation", 3)]["reason"]
    assert rejected[("annotation", 4)]["reason"] == "zero-area mask"


def test_unknown_category_and_image_ids_are_rejected(broken):
    _, _, rejected = broken
    assert rejected[("annotation", 5)]["reason"] == "unknown category id 5"
    assert rejected[("annotation", 6)]["reason"] == "unknown image id 99"
    assert rejected[("annotation", 6)]["image_id"] == 99


def test_box_partly_outside_is_clipped_and_kept(broken):
    _, rows, _ = broken
    row = rows[1]
    box = row["boxes"][row["ann_ids"].index(7)]
    assert box == [50.0, 30.0, float(W), float(H)]


def test_image_modes_become_rgb(broken):
    _, rows, _ = broken
    for image_id in (6, 7, 8, 9):
        image = Image.open(io.BytesIO(rows[image_id]["image"]))
        assert image.mode == "RGB" and image.size == (W, H)
    gray16 = np.asarray(Image.open(io.BytesIO(rows[6]["image"])), np.int16)
    assert abs(gray16[:, : W // 2 - 4].mean() - 128) < 3  # 16-bit scaled by 255/65535
    assert abs(gray16[:, W // 2 + 4 :].mean() - 255) < 3


def test_image_without_annotations_is_kept_as_negative(broken):
    manifest, rows, _ = broken
    assert rows[10]["labels"] == [] and rows[10]["masks"] == []
    assert manifest["counts"]["negative_images_written"] == 4  # palette, rgba, gray, empty


def test_crowd_rle_is_kept_and_flagged(broken):
    _, rows, _ = broken
    row = rows[1]
    k = row["ann_ids"].index(8)
    assert row["iscrowd"][k] is True and row["iscrowd"][row["ann_ids"].index(1)] is False
    mask = mask_utils.decode({"size": [H, W], "counts": row["masks"][k].encode()})
    assert mask.sum() == 15 * 28 and row["boxes"][k] == [2.0, 30.0, 30.0, 45.0]


def test_category_ids_with_gaps_map_to_contiguous_and_back(broken):
    manifest, rows, _ = broken
    cats = category_map(Path(manifest["source"]["annotations"]).parent / "shards")
    assert cats.coco_ids == (3, 17) and cats.num_classes == 2
    assert [cats.to_contiguous(3), cats.to_contiguous(17)] == [1, 2]
    row = rows[1]
    originals = {ann_id: ann["category_id"] for ann_id, (ann, _) in ANNOTATIONS.items()}
    for ann_id, label in zip(row["ann_ids"], row["labels"]):
        assert cats.to_coco(label) == originals[ann_id]
