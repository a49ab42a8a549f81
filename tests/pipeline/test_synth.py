"""The crowded-shapes generator writes valid, deterministic, crowded COCO data."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import synth
from pipeline.coco import decode_segmentation
from pipeline.synth import (
    CATEGORIES,
    MIN_VISIBLE_AREA,
    make_dataset,
    render_image,
    trace_outline,
)

REPO = Path(__file__).resolve().parents[2]
IMAGES, SMALL, SIZE = 100, 25, 256
# sha256 of `render_image`'s pixels, annotations (without `visible_fraction`) and stats for
# images 0..n-1 of (seed, size, n), computed on main at 0fc58d3, before the field existed;
# both sets hold a crowd region (seed 1: image 1, seed 3: image 26)
BEFORE_VISIBLE_FRACTION = {
    (1, 192, 12): "19d351d08903c3d82ae848a500f7db5f2e864625a5c40f3fd5d6edaca155d39b",
    (3, 64, 30): "09d61327a1d5adb26f49e5fe248c5dcda4933eb3ab12d7cc2fd8b20fc491c8dd",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    return root, make_dataset(root, images=IMAGES, size=SIZE, seed=0, val_fraction=0.2)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_small")
    make_dataset(root, images=SMALL, size=SIZE, seed=0, val_fraction=0.2)
    return root


def _load(root: Path, split: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / split / "annotations.json"))


def _all_anns(root: Path) -> list[dict]:
    anns = []
    for split in ("train", "val"):
        anns += json.loads((root / split / "annotations.json").read_text())["annotations"]
    return anns


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected foreground regions (plain flood fill; masks are small)."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if (
                    0 <= rr < mask.shape[0]
                    and 0 <= cc < mask.shape[1]
                    and mask[rr, cc]
                    and not seen[rr, cc]
                ):
                    seen[rr, cc] = True
                    stack.append((rr, cc))
    return count


def test_layout_and_summary_match_the_files(dataset):
    root, summary = dataset
    total = 0
    for split in ("train", "val"):
        data = json.loads((root / split / "annotations.json").read_text())
        files = sorted(p.name for p in (root / split / "images").glob("*.jpg"))
        assert files == sorted(im["file_name"] for im in data["images"])
        assert all(im["width"] == SIZE and im["height"] == SIZE for im in data["images"])
        info = summary["splits"][split]
        assert info["images"] == len(files)
        assert info["instances"] == sum(1 for a in data["annotations"] if not a["iscrowd"])
        total += len(files)
    assert total == IMAGES
    assert summary["splits"]["val"]["images"] == int(IMAGES * 0.2)


def test_same_arguments_give_byte_identical_files(small_dataset, tmp_path):
    make_dataset(tmp_path, images=SMALL, size=SIZE, seed=0, val_fraction=0.2)
    for split in ("train", "val"):
        for first, second in zip(
            sorted((small_dataset / split).rglob("*")), sorted((tmp_path / split).rglob("*"))
        ):
            assert first.relative_to(small_dataset) == second.relative_to(tmp_path)
            if first.is_file():
                assert first.read_bytes() == second.read_bytes(), first


def test_an_image_does_not_depend_on_the_dataset_size(dataset, small_dataset):
    root, _ = dataset
    for split in ("train", "val"):
        small = json.loads((small_dataset / split / "annotations.json").read_text())
        large = json.loads((root / split / "annotations.json").read_text())
        ids = {im["id"] for im in small["images"]}
        assert ids and ids <= {im["id"] for im in large["images"]}
        assert small["annotations"] == [a for a in large["annotations"] if a["image_id"] in ids]
        for im in small["images"]:
            name = im["file_name"]
            assert (small_dataset / split / "images" / name).read_bytes() == (
                root / split / "images" / name
            ).read_bytes()


def test_other_seed_gives_other_scenes(dataset, tmp_path):
    root, _ = dataset
    make_dataset(tmp_path, images=5, size=SIZE, seed=1, val_fraction=0.0)
    other = json.loads((tmp_path / "train" / "annotations.json").read_text())["annotations"]
    base = [a for a in _all_anns(root) if a["image_id"] <= 5]
    assert [a["bbox"] for a in other] != [a["bbox"] for a in base]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_ground_truth_scored_against_itself_gives_ap_1(dataset, iou_type):
    root, _ = dataset
    for split in ("train", "val"):
        coco = _load(root, split)
        results = []
        for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            result = {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "score": 1.0,
                "bbox": ann["bbox"],
            }
            if iou_type == "segm":
                rle = coco.annToRLE(ann)
                counts = rle["counts"]  # bytes when made from a polygon, str when read as RLE
                counts = counts.decode() if isinstance(counts, bytes) else counts
                result["segmentation"] = {"size": rle["size"], "counts": counts}
            results.append(result)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
            evaluator.params.maxDets = [1, 10, 100]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), (split, evaluator.stats)
        assert evaluator.stats[8] == pytest.approx(1.0), (split, evaluator.stats)  # AR@100


def test_polygons_and_rle_both_appear_and_decode_to_area_and_box(dataset):
    root, _ = dataset
    kinds = Counter()
    for split in ("train", "val"):
        coco = _load(root, split)
        for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            seg = ann["segmentation"]
            if isinstance(seg, list):
                kinds["polygon"] += 1
                assert len(seg) == 1 and len(seg[0]) >= 6 and len(seg[0]) % 2 == 0
                assert all(0 <= v <= SIZE for v in seg[0])
            else:
                kinds["rle"] += 1
                assert isinstance(seg["counts"], str) and seg["size"] == [SIZE, SIZE]
            mask = coco.annToMask(ann)
            # polygons are written so that they rasterise back to the visible mask
            assert int(mask.sum()) == ann["area"]
            rle = mask_utils.encode(np.asfortranarray(mask))
            assert mask_utils.toBbox(rle).tolist() == ann["bbox"]
            assert ann["area"] >= MIN_VISIBLE_AREA
    assert kinds["polygon"] > 100 and kinds["rle"] > 50, kinds


def test_crowd_regions_are_uncompressed_rle(dataset):
    root, summary = dataset
    crowds = [a for a in _all_anns(root) if a["iscrowd"]]
    assert len(crowds) == sum(s["crowd_regions"] for s in summary["splits"].values())
    assert 1 <= len(crowds) <= 0.1 * IMAGES
    for ann in crowds:
        seg = ann["segmentation"]
        assert all(isinstance(c, int) for c in seg["counts"])
        assert sum(seg["counts"]) == SIZE * SIZE
        mask = mask_utils.decode(mask_utils.frPyObjects(seg, *seg["size"]))
        assert int(mask.sum()) == ann["area"] > 0


def test_scenes_range_from_empty_to_crowded(dataset):
    root, summary = dataset
    per_image = []
    for split in ("train", "val"):
        coco = _load(root, split)
        per_image += [len(coco.getAnnIds(imgIds=i, iscrowd=False)) for i in coco.getImgIds()]
    assert min(per_image) == 0 and 1 <= per_image.count(0) <= 0.1 * IMAGES
    assert 15 <= max(per_image) <= 20
    assert 5 <= np.mean(per_image) <= 15
    assert 0.3 <= summary["overlap_fraction"] <= 0.6


def test_sizes_cover_coco_small_medium_and_large(dataset):
    root, _ = dataset
    areas = np.array([a["area"] for a in _all_anns(root) if not a["iscrowd"]])
    assert (areas < 32**2).sum() > 100
    assert ((areas >= 32**2) & (areas < 96**2)).sum() > 50
    assert (areas >= 96**2).sum() >= 1


def test_same_class_objects_touch_or_overlap(dataset):
    root, _ = dataset
    anns = [a for a in _all_anns(root) if not a["iscrowd"]]
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)

    def touches(a: dict, b: dict) -> bool:
        (ax, ay, aw, ah), (bx, by, bw, bh) = a["bbox"], b["bbox"]
        return ax <= bx + bw and bx <= ax + aw and ay <= by + bh and by <= ay + ah

    close = sum(
        any(b is not a and b["category_id"] == a["category_id"] and touches(a, b) for b in group)
        for group in by_image.values()
        for a in group
    )
    assert close >= 0.1 * len(anns)


def test_occlusion_splits_some_masks(dataset):
    root, _ = dataset
    coco = _load(root, "train")
    split = 0
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        if isinstance(ann["segmentation"], dict) and ann["category_id"] != 7:  # not a ring
            split += _components(coco.annToMask(ann)) > 1
            if split >= 3:
                break
    assert split >= 3


def test_category_ids_have_gaps_and_all_classes_appear(dataset):
    root, _ = dataset
    ids = [c["id"] for c in CATEGORIES]
    assert 3 <= len(ids) <= 5 and len({c["name"] for c in CATEGORIES}) == len(ids)
    assert ids != list(range(1, len(ids) + 1))
    data = json.loads((root / "train" / "annotations.json").read_text())
    assert [c["id"] for c in data["categories"]] == ids
    assert {a["category_id"] for a in data["annotations"]} == set(ids)


def test_trace_outline_is_exact_for_simple_regions_only():
    mask = np.zeros((9, 10), dtype=bool)
    mask[1:8, 2:5] = True
    mask[5:8, 4:9] = True  # an L-shape
    outline = trace_outline(mask)
    assert outline is not None and len(outline) == 6
    drawn = mask_utils.decode(mask_utils.frPyObjects([outline.ravel().tolist()], 9, 10))
    assert np.array_equal(drawn[..., 0].astype(bool), mask)

    two = np.zeros((6, 6), dtype=bool)
    two[0:2, 0:2] = two[3:5, 3:5] = True
    assert trace_outline(two) is None
    holed = np.ones((5, 5), dtype=bool)
    holed[2, 2] = False
    assert trace_outline(holed) is None
    diagonal = np.eye(3, dtype=bool)
    assert trace_outline(diagonal) is None


def test_rewriting_a_folder_replaces_its_splits(tmp_path):
    make_dataset(tmp_path, images=6, size=64, seed=0)
    stale = tmp_path / "train" / "images" / "stale.jpg"
    stale.write_bytes(b"old")
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    summary = make_dataset(tmp_path, images=3, size=64, seed=0)
    assert not stale.exists() and keep.read_text() == "mine"
    assert (
        len(list((tmp_path / "train" / "images").iterdir())) == summary["splits"]["train"]["images"]
    )


def test_object_scale_and_max_objects_shape_the_scenes():
    """The knobs of the default run's scenes: bigger objects, fewer per image; the defaults
    draw exactly the original scenes."""

    def objects(**kwargs):
        found = []
        for index in range(24):
            _, anns, _ = render_image(index, size=128, seed=0, **kwargs)
            found.append([a for a in anns if not a["iscrowd"]])
        return found

    default = objects()
    assert [len(a) for a in objects(object_scale=1.0, max_objects=20)] == [len(a) for a in default]
    assert max(len(a) for a in objects(max_objects=3)) <= 3 < max(len(a) for a in default)
    area = [np.median([a["area"] for a in image]) for image in default if image]
    bigger = [np.median([a["area"] for a in image]) for image in objects(object_scale=2) if image]
    assert np.median(bigger) > 2.5 * np.median(area)  # ~4x the area for 2x the size


def test_crowd_and_amodal_scenes_are_one_drawing_with_two_annotations():
    """`crowd` and `amodal` draw the same pixels and objects; amodal masks hold the visible
    ones and are larger where an object is hidden; the shapes scene is left as it was."""
    for index in range(8):
        pixels, crowd, _ = render_image(index, size=128, seed=5, scene="crowd")
        same, amodal, _ = render_image(index, size=128, seed=5, scene="amodal")
        assert (pixels == same).all() and len(crowd) == len(amodal) >= 5
        for vis, full in zip(crowd, amodal):
            assert vis["category_id"] == full["category_id"]
            assert vis["visible_fraction"] == full["visible_fraction"]
            visible = decode_segmentation(vis["segmentation"], 128, 128).astype(bool)
            extent = decode_segmentation(full["segmentation"], 128, 128).astype(bool)
            assert (extent | visible).sum() == extent.sum()  # visible within the extent
            if vis["visible_fraction"] < 0.9:
                assert extent.sum() > visible.sum()
    shapes, _, _ = render_image(0, size=128, seed=5)
    assert not (shapes == pixels).all()


def test_scene_statistics_measure_what_the_scenes_were_built_for(tmp_path):
    """`crowd` packs objects of one class against each other and hides many of them;
    `amodal` makes true instances overlap; `shapes` does neither (issue 28's settings)."""
    stats = {
        scene: make_dataset(tmp_path / scene, images=40, size=128, seed=2, scene=scene)["splits"][
            "train"
        ]["statistics"]
        for scene in ("shapes", "crowd", "amodal")
    }
    assert stats["shapes"]["iou_ge_0.2"] == stats["crowd"]["iou_ge_0.2"] == 0.0
    assert (
        stats["crowd"]["under_half_visible"] >= 0.3 > 0.15 > stats["shapes"]["under_half_visible"]
    )
    assert stats["crowd"]["touching_same_class"] >= 0.8 > stats["shapes"]["touching_same_class"]
    assert stats["amodal"]["iou_ge_0.2"] >= 0.4 and stats["amodal"]["mean_best_iou"] > 0.15
    assert stats["amodal"]["under_half_visible"] == stats["crowd"]["under_half_visible"]


def test_scene_statistics_on_a_hand_built_image():
    """Two 10x10 squares of class 1 overlapping by half (IoU 1/3), a class-2 square touching
    the second one, and a lone class-1 square: values computed by hand."""

    def square(x, y, category_id, visible_fraction=1.0):
        polygon = [x, y, x + 10, y, x + 10, y + 10, x, y + 10]
        return {"image_id": 1, "category_id": category_id, "segmentation": [polygon],
                "iscrowd": 0, "visible_fraction": visible_fraction}  # fmt: skip

    coco = {
        "images": [{"id": 1, "height": 64, "width": 64}, {"id": 2, "height": 64, "width": 64}],
        "annotations": [
            square(0, 0, 1, 0.4), square(5, 0, 1), square(15, 0, 2), square(40, 40, 1),
        ],
    }  # fmt: skip
    stats = synth.scene_statistics(coco)
    assert stats["objects_per_image"] == 2.0 and stats["max_objects_per_image"] == 4
    assert stats["under_half_visible"] == 0.25
    assert stats["touching_same_class"] == 0.5  # the two class-1 squares that overlap
    assert stats["iou_ge_0.2"] == 0.5 and stats["iou_ge_0.5"] == 0.0
    assert stats["mean_best_iou"] == pytest.approx((1 / 3 + 1 / 3) / 4, abs=0.01)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"images": -1},
        {"size": 8},
        {"val_fraction": 1.5},
        {"object_scale": 0},
        {"max_objects": 0},
        {"scene": "zoo"},
    ],
    ids=str,
)
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_dataset(tmp_path, **kwargs)


def test_cli_writes_the_coco_layout(tmp_path):
    out = tmp_path / "data"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/make_dataset.py",
            "--out",
            str(out),
            "--images",
            "20",
            "--size",
            "128",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    counts = {}
    for split in ("train", "val"):
        data = json.loads((out / split / "annotations.json").read_text())
        images = list((out / split / "images").glob("*.jpg"))
        assert len(images) == len(data["images"])
        assert all(im["width"] == 128 for im in data["images"])
        counts[split] = len(images)
    assert counts == {"train": 16, "val": 4}


@pytest.mark.parametrize("seed_size_n", sorted(BEFORE_VISIBLE_FRACTION), ids=str)
def test_visible_fraction_changes_no_pixel_and_no_other_field(seed_size_n):
    seed, size, n = seed_size_n
    digest = hashlib.sha256()
    for k in range(n):
        pixels, anns, stats = synth.render_image(k, size=size, seed=seed)
        anns = [{key: v for key, v in a.items() if key != "visible_fraction"} for a in anns]
        digest.update(pixels.tobytes())
        digest.update(json.dumps(anns, sort_keys=True).encode())
        digest.update(json.dumps(stats, sort_keys=True).encode())
    assert digest.hexdigest() == BEFORE_VISIBLE_FRACTION[seed_size_n]


def test_visible_fraction_is_visible_over_full_shape_pixels(monkeypatch):
    """Rebuild occlusion from the painted amodal masks (later shapes cover earlier ones) and
    compare each annotation's decoded mask and fraction with it."""
    painted: list[np.ndarray] = []
    paint = synth._paint

    def recording_paint(rng, pixels, owner, shape, index, colour=None):
        assert index == len(painted)
        painted.append(shape.mask.copy())
        paint(rng, pixels, owner, shape, index, colour)

    monkeypatch.setattr(synth, "_paint", recording_paint)
    seen = {"whole": 0, "occluded": 0, "mostly_hidden": 0}
    for k in range(12):
        painted.clear()
        _, anns, _ = synth.render_image(k, size=128, seed=1)
        visible = []
        for j, full in enumerate(painted):
            later = np.zeros_like(full)
            for mask in painted[j + 1 :]:
                later |= mask
            visible.append((full, full & ~later))
        for ann in anns:
            if ann["iscrowd"]:
                assert "visible_fraction" not in ann
                continue
            rle = ann["segmentation"]  # polygons, or compressed RLE with str counts
            if isinstance(rle, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(rle, 128, 128))
            mask = mask_utils.decode(rle).astype(bool)
            (full, shown), *others = [v for v in visible if np.array_equal(v[1], mask)]
            assert all(int(f.sum()) == int(full.sum()) for f, _ in others)  # same shape twice
            expected = round(int(shown.sum()) / int(full.sum()), 4)
            assert ann["visible_fraction"] == expected
            seen["whole"] += expected == 1.0
            seen["occluded"] += expected < 1.0
            seen["mostly_hidden"] += expected < 0.5
    assert seen["whole"] >= 10 and seen["occluded"] >= 5 and seen["mostly_hidden"] >= 1, seen


def test_every_instance_has_a_visible_fraction_and_the_version_is_current(small_dataset):
    fractions = [a["visible_fraction"] for a in _all_anns(small_dataset) if not a["iscrowd"]]
    assert len(fractions) == len([a for a in _all_anns(small_dataset) if not a["iscrowd"]])
    assert all(0 < f <= 1 for f in fractions) and 1.0 in fractions and min(fractions) < 0.5
    assert synth.is_current(small_dataset)


def test_a_dataset_of_an_older_generator_is_not_current(tmp_path):
    make_dataset(tmp_path, images=3, size=64, seed=0)
    assert synth.is_current(tmp_path)
    path = tmp_path / "val" / "annotations.json"
    data = json.loads(path.read_text())
    data["info"]["version"] = "1"
    path.write_text(json.dumps(data))
    assert not synth.is_current(tmp_path)
    assert not synth.is_current(tmp_path / "absent")
