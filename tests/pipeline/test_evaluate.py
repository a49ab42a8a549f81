"""COCO scoring: agreement with pycocotools run by hand, raised maxDets, thresholds, RLE results."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from pipeline.evaluate import (
    METRIC_NAMES,
    EvaluationError,
    coco_from_annotations,
    count_duplicates_and_merges,
    evaluate_coco,
    evaluate_thresholds,
    format_ap_table,
    format_recall_table,
    format_threshold_table,
    plot_pr_curve,
    predictions_to_coco_results,
    scalar_metrics,
)

NUCLEI_VAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "nuclei" / "val"
BACKENDS = [
    "pycocotools",
    pytest.param(
        "faster_coco_eval",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("faster_coco_eval") is None,
            reason="faster-coco-eval not installed",
        ),
    ),
]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _annotation(ann_id, image_id, category_id, mask, iscrowd=0) -> dict:
    rle = _rle(mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "area": float(mask.sum()),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": iscrowd,
    }


@pytest.fixture(scope="module")
def toy_gt() -> dict:
    """Three images, category ids with a gap (3, 7), a crowd region, an empty image."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (h, w) in zip([11, 12, 13], [(120, 160), (200, 100), (64, 64)]):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        if image_id == 13:
            continue  # an image without annotations
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1 = x0 + int(rng.integers(4, min(60, w - x0)))
            y1 = y0 + int(rng.integers(4, min(60, h - y0)))
            category = int(rng.choice([3, 7]))
            mask = _box_mask(h, w, x0, y0, x1, y1)
            annotations.append(_annotation(len(annotations) + 1, image_id, category, mask))
    crowd = _box_mask(120, 160, 100, 80, 150, 115)
    annotations.append(_annotation(len(annotations) + 1, 11, 3, crowd, iscrowd=1))
    categories = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _jittered_results(gt: dict, seed: int, drop: float = 0.2, extra: int = 5) -> list[dict]:
    """GT masks shifted by a few pixels, random scores, some misses and false positives."""
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    results = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd") or rng.random() < drop:
            continue
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        mask = np.roll(mask, tuple(int(v) for v in rng.integers(-3, 4, size=2)), axis=(0, 1))
        rle = _rle(mask)
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": rle,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "score": float(rng.uniform(0.01, 1.0)),
            }
        )
    image_ids = sorted(sizes)
    categories = [c["id"] for c in gt["categories"]]
    for _ in range(extra):
        image_id = int(rng.choice(image_ids))
        h, w = sizes[image_id]
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        rle = _rle(_box_mask(h, w, x0, y0, x0 + 8, y0 + 8))
        results.append(
            {
                "image_id": image_id,
                "category_id": int(rng.choice(categories)),
                "segmentation": rle,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "score": float(rng.uniform(0.01, 1.0)),
            }
        )
    return results


def _cocoeval_by_hand(gt_dict, results, iou_type, max_dets_list=None, img_ids=None):
    """pycocotools as its README runs it (segm without the bbox key, as detectron2 does)."""
    gt = coco_from_annotations(gt_dict)
    anns = copy.deepcopy(results)
    if iou_type == "segm":
        for ann in anns:
            ann.pop("bbox", None)
    coco_eval = COCOeval(gt, gt.loadRes(anns), iou_type)
    if max_dets_list is not None:
        coco_eval.params.maxDets = max_dets_list
    if img_ids is not None:
        coco_eval.params.imgIds = img_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


@pytest.fixture(scope="module")
def nuclei_subset() -> tuple[dict, list[int]]:
    """The nuclei val ground truth and 5 image ids: 3 crowded (100..140 nuclei), 2 sparse."""
    path = NUCLEI_VAL / "annotations.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    gt = json.loads(path.read_text())
    counts: dict[int, int] = {}
    for ann in gt["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    ranked = sorted(counts, key=counts.get)
    crowded = [i for i in ranked if 100 < counts[i] < 140][:3]
    assert len(crowded) == 3
    return gt, crowded + ranked[:2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_ap_agrees_with_pycocotools_run_by_hand(toy_gt, iou_type, backend):
    results = _jittered_results(toy_gt, seed=1)
    metrics = evaluate_coco(toy_gt, results, iou_types=(iou_type,), backend=backend)
    stats = _cocoeval_by_hand(toy_gt, results, iou_type).stats
    ours = [metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES]
    np.testing.assert_allclose(ours, stats[:6], atol=1e-6)
    assert 0.05 < metrics[f"{iou_type}/AP"] < 1.0  # a meaningful, non-trivial score


@pytest.fixture(scope="module")
def nuclei_by_hand(nuclei_subset) -> tuple[list[dict], dict[str, list[float]]]:
    """Jittered nuclei results and pycocotools' own numbers for them at maxDets 100 and 400."""
    gt, img_ids = nuclei_subset
    results = _jittered_results(gt, seed=2, drop=0.05, extra=0)
    expected = {}
    for iou_type in ("segm", "bbox"):
        # At 100: COCOeval's own summarize with maxDets [1, 10, 100, 400].
        at_100 = _cocoeval_by_hand(gt, results, iou_type, [1, 10, 100, 400], img_ids)
        expected[iou_type] = list(at_100.stats[:6])
        # At 400: summarize reads maxDets[2] for AP50..APl; AP from the precision array.
        at_400 = _cocoeval_by_hand(gt, results, iou_type, [1, 10, 400], img_ids)
        precision = at_400.eval["precision"][:, :, :, 0, -1]
        expected[f"{iou_type}@400"] = [precision[precision > -1].mean(), *at_400.stats[1:6]]
    return results, expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_raised_max_dets_on_crowded_nuclei(nuclei_subset, nuclei_by_hand, backend):
    gt, img_ids = nuclei_subset
    results, expected = nuclei_by_hand
    metrics = evaluate_coco(gt, results, max_dets=400, img_ids=img_ids, backend=backend)
    for iou_type in ("segm", "bbox"):
        ours = [metrics[f"{iou_type}/{name}"] for name in METRIC_NAMES]
        np.testing.assert_allclose(ours, expected[iou_type], atol=1e-6)
        ours = [metrics[f"{iou_type}/{name}@400"] for name in METRIC_NAMES]
        np.testing.assert_allclose(ours, expected[f"{iou_type}@400"], atol=1e-6)
        # The crowded images need the raised limit: capping at 100 loses recall.
        assert metrics[f"{iou_type}/AP@400"] > metrics[f"{iou_type}/AP"] + 0.02
    assert metrics["params"]["segm"]["maxDets"] == [1, 10, 100, 400]
    assert metrics["params"]["segm"]["num_images"] == len(img_ids)
    curve = metrics["pr_curve"]
    assert curve["max_dets"] == 400 and len(curve["recall"]) == len(curve["precision"]) == 101
    assert curve["precision50"][0] >= curve["precision"][0] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero_ap(toy_gt, backend):
    metrics = evaluate_coco(toy_gt, [], max_dets=300, backend=backend)
    for iou_type in ("segm", "bbox"):
        assert metrics[f"{iou_type}/AP"] == 0.0
        assert metrics[f"{iou_type}/AP@300"] == 0.0
        assert metrics[f"{iou_type}/APl"] == -1.0  # no large object in the GT: undefined
    assert set(metrics["pr_curve"]["precision"]) == {0.0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_does_not_mutate_results(toy_gt, backend):
    results = _jittered_results(toy_gt, seed=3)
    before = copy.deepcopy(results)
    evaluate_coco(toy_gt, results, backend=backend)
    evaluate_thresholds(toy_gt, results, [0.3], backend=backend)
    assert results == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholds_equal_separate_passes(toy_gt, nuclei_subset, backend):
    nuclei_gt, img_ids = nuclei_subset
    cases = [
        (toy_gt, _jittered_results(toy_gt, seed=4), 100, None, [0.05, 0.3, 0.5, 0.9, 1.1]),
        (nuclei_gt, _jittered_results(nuclei_gt, seed=5), 400, img_ids, [0.05, 0.5, 0.9, 1.1]),
    ]
    for gt, results, max_dets, ids, thresholds in cases:
        per_threshold = evaluate_thresholds(
            gt, results, thresholds, max_dets, img_ids=ids, backend=backend
        )
        assert list(per_threshold) == thresholds
        for t in thresholds:
            kept = [r for r in results if r["score"] >= t]
            separate = evaluate_coco(gt, kept, max_dets=max_dets, img_ids=ids, backend=backend)
            assert scalar_metrics(per_threshold[t]) == scalar_metrics(separate)
            assert per_threshold[t]["pr_curve"] == separate["pr_curve"]
        aps = [per_threshold[t]["segm/AP"] for t in thresholds]
        assert aps[0] > aps[-2] > aps[-1] == 0.0


def test_predictions_to_coco_results_at_original_size():
    # Model input 100x50 (h x w) for an original image of 200x100: every side doubles.
    masks = torch.zeros(2, 100, 50, dtype=torch.bool)
    masks[0, 10:30, 5:25] = True
    masks[1, 60:90, 20:45] = True
    prediction = {
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.4]),
        "masks": masks,
        "boxes": torch.tensor([[5.0, 10.0, 25.0, 30.0], [20.0, 60.0, 45.0, 90.0]]),
    }
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 64, 64, dtype=torch.bool),
        "boxes": torch.zeros(0, 4),
    }
    results = predictions_to_coco_results(
        [prediction, empty], [42, 43], [(200, 100), (64, 64)], {1: 3, 2: 7}
    )
    assert len(results) == 2  # one per instance, none for the empty image
    assert [r["category_id"] for r in results] == [3, 7]
    assert [r["image_id"] for r in results] == [42, 42]
    assert results[0]["score"] == pytest.approx(0.9)
    assert results[0]["bbox"] == pytest.approx([10.0, 20.0, 40.0, 40.0])
    for result, source in zip(results, masks):
        assert isinstance(result["segmentation"]["counts"], str)
        decoded = mask_utils.decode(result["segmentation"])
        assert decoded.shape == (200, 100)
        expected = source.repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
        assert (decoded.astype(bool) == expected).mean() > 0.99
    json.dumps(results)  # JSON-ready


def test_mask_vanishing_at_original_size_keeps_the_scaled_box():
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 20, 20] = True  # one pixel at the model input size, gone at a quarter size
    prediction = {
        "labels": np.array([1]),
        "scores": np.array([0.5]),
        "masks": masks,
        "boxes": np.array([[20.0, 20.0, 21.0, 21.0]]),
    }
    (result,) = predictions_to_coco_results([prediction], [1], [(10, 10)], {1: 1})
    assert mask_utils.area(result["segmentation"]) == 0
    assert result["bbox"] == pytest.approx([5.0, 5.0, 0.25, 0.25])


def test_more_than_255_instances_in_one_image():
    # Crowded images with a raised --max-dets: pycocotools' mask.area() overflows (numpy 2)
    # for a list of > 255 RLEs; every instance must come out, the empty one with its box.
    num = 300
    masks = np.zeros((num, 40, 40), dtype=bool)
    for k in range(num - 1):
        masks[k, k % 40, (k // 40) * 5 : (k // 40) * 5 + 4] = True  # 1 x 4 px strips
    boxes = np.array([[0.0, 0.0, 4.0, 1.0]] * num)
    boxes[-1] = [10.0, 10.0, 12.0, 12.0]  # the last mask is empty: its box is kept
    prediction = {
        "labels": np.ones(num, dtype=np.int64),
        "scores": np.linspace(1, 0.1, num),
        "masks": masks,
        "boxes": boxes,
    }
    results = predictions_to_coco_results([prediction], [5], [(40, 40)], {1: 1})
    assert len(results) == num
    assert results[0]["bbox"] == pytest.approx([0.0, 0.0, 4.0, 1.0])
    assert results[-1]["bbox"] == pytest.approx([10.0, 10.0, 2.0, 2.0])
    assert mask_utils.area(results[-1]["segmentation"]) == 0


def test_predictions_to_coco_results_rejects_unknown_label():
    prediction = {
        "labels": np.array([4]),
        "scores": np.array([0.5]),
        "masks": np.ones((1, 8, 8), dtype=bool),
        "boxes": np.array([[0.0, 0.0, 8.0, 8.0]]),
    }
    with pytest.raises(EvaluationError, match="image 5: predicted labels \\[4\\]"):
        predictions_to_coco_results([prediction], [5], [(8, 8)], {1: 1})


def test_bad_inputs_name_the_record(toy_gt, tmp_path):
    results = _jittered_results(toy_gt, seed=6)
    results[2] = dict(results[2], image_id=999)
    with pytest.raises(EvaluationError, match="result 2: image_id 999"):
        evaluate_coco(toy_gt, results)
    with pytest.raises(EvaluationError, match="missing.*segmentation"):
        evaluate_coco(toy_gt, [{"image_id": 11, "category_id": 3, "score": 1.0, "bbox": [0] * 4}])
    with pytest.raises(EvaluationError, match="max_dets=50"):
        evaluate_coco(toy_gt, [], max_dets=50)
    with pytest.raises(EvaluationError, match="backend 'detectron'"):
        evaluate_coco(toy_gt, [], backend="detectron")
    with pytest.raises(EvaluationError, match="nope.json: annotation file not found"):
        coco_from_annotations(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="bad.json: not a valid JSON"):
        coco_from_annotations(tmp_path / "bad.json")


def test_tables_and_pr_plot(toy_gt, tmp_path):
    results = _jittered_results(toy_gt, seed=7)
    metrics = evaluate_coco(toy_gt, results, max_dets=200)
    table = format_ap_table(metrics)
    lines = table.splitlines()
    assert lines[0] == "| | AP | AP50 | AP75 | APs | APm | APl |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == [
        "segm",
        "bbox",
        "segm @200",
        "bbox @200",
    ]
    assert f"{100 * metrics['segm/AP']:.1f}" in lines[2]
    per_threshold = evaluate_thresholds(toy_gt, results, [0.1, 0.5], max_dets=200)
    assert format_threshold_table(per_threshold).splitlines()[2].startswith("| 0.1 |")
    png = plot_pr_curve(metrics["pr_curve"], tmp_path / "pr.png")
    assert png.stat().st_size > 1000


# ---------------------------------------------------------------- recall by visibility, counts


def _result(image_id, category_id, mask, score) -> dict:
    rle = _rle(mask)
    return {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "score": score,
    }


@pytest.fixture(scope="module")
def visibility_case() -> tuple[dict, list[dict]]:
    """One 100 x 100 image: GT objects with known visible fractions, and which are recalled.

    Recalled at IoU 0.5: A (hi), C and H (mid), E (lo), G (no field). Missed: B (a prediction
    of the wrong class), D (IoU 1/3), F (no prediction). The crowd region is ignored.
    """
    h = w = 100
    objects = [  # name, category, box x0 y0 x1 y1, visible_fraction
        ("A", 1, (0, 0, 20, 20), 1.0),
        ("B", 1, (0, 30, 20, 50), 0.95),
        ("C", 1, (30, 0, 50, 20), 0.7),
        ("D", 2, (60, 60, 80, 80), 0.9),
        ("H", 2, (60, 30, 80, 50), 0.5),
        ("E", 2, (30, 30, 50, 50), 0.3),
        ("F", 1, (0, 60, 20, 80), 0.49),
        ("G", 1, (60, 0, 80, 20), None),
    ]
    annotations = []
    for k, (_, category, box, fraction) in enumerate(objects):
        ann = _annotation(k + 1, 1, category, _box_mask(h, w, *box))
        if fraction is not None:
            ann["visible_fraction"] = fraction
        annotations.append(ann)
    annotations.append(_annotation(20, 1, 1, _box_mask(h, w, 85, 85, 100, 100), iscrowd=1))
    gt = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": h, "width": w}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    results = [
        _result(1, 1, _box_mask(h, w, 0, 0, 20, 20), 0.9),  # A, exact
        _result(1, 2, _box_mask(h, w, 0, 30, 20, 50), 0.9),  # B's mask, wrong class
        _result(1, 1, _box_mask(h, w, 34, 0, 54, 20), 0.8),  # C, IoU 2/3
        _result(1, 2, _box_mask(h, w, 70, 60, 90, 80), 0.8),  # D, IoU 1/3
        _result(1, 2, _box_mask(h, w, 60, 30, 80, 50), 0.7),  # H, exact
        _result(1, 2, _box_mask(h, w, 30, 30, 50, 50), 0.6),  # E, exact
        _result(1, 1, _box_mask(h, w, 60, 0, 80, 20), 0.5),  # G, exact
        _result(1, 1, _box_mask(h, w, 85, 85, 100, 100), 0.95),  # on the crowd region
    ]
    return gt, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_recall_by_visibility_counts_cocoeval_matches_per_bin(visibility_case, backend):
    gt, results = visibility_case
    metrics = evaluate_coco(gt, results, backend=backend)
    assert metrics["segm/R50"] == pytest.approx(5 / 8)  # G, without the field, counts here
    assert metrics["segm/R50_vis_hi"] == pytest.approx(1 / 2)  # A of A, B
    assert metrics["segm/R50_vis_mid"] == pytest.approx(2 / 3)  # C, H of C, D (0.9), H (0.5)
    assert metrics["segm/R50_vis_lo"] == pytest.approx(1 / 2)  # E of E, F
    assert [metrics[f"segm/n_vis_{b}"] for b in ("hi", "mid", "lo")] == [2, 3, 2]
    assert "segm/R50@100" not in metrics and "bbox/R50" not in metrics
    assert metrics["pr_curve"]  # the AP part is untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_recall_without_visible_fraction_gives_overall_recall_only(visibility_case, backend):
    gt, results = visibility_case
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"]:
        ann.pop("visible_fraction", None)
    metrics = evaluate_coco(gt, results, backend=backend)
    assert metrics["segm/R50"] == pytest.approx(5 / 8)
    assert not [k for k in metrics if "vis" in k]
    assert "R50" not in evaluate_coco(gt, results, iou_types=("bbox",), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_f1_threshold_sweeps_the_matched_scores(visibility_case, backend):
    gt, results = visibility_case
    metrics = evaluate_coco(gt, results, backend=backend)
    # by score, the crowd one (0.95) aside: A hit, B's class miss (0.9); C hit, D miss (0.8);
    # H (0.7), E (0.6), G (0.5) hits. At 0.5: 5 hits of 7 kept, 5 of 8 objects, F1 2/3.
    assert metrics["segm/F1_threshold"] == 0.5
    assert metrics["segm/F1"] == pytest.approx(2 / 3)
    assert metrics["segm/F1_precision"] == pytest.approx(5 / 7)
    assert metrics["segm/F1_recall"] == pytest.approx(5 / 8)
    # F1 = 2 hits / (kept + objects): four more misses at G's score make 0.6 the better
    # threshold (8/14 against 10/19)
    h = w = 100
    misses = [_result(1, 1, _box_mask(h, w, 40, 60, 45, 65), 0.5) for _ in range(4)]
    worse = evaluate_coco(gt, results + misses, backend=backend)
    assert worse["segm/F1_threshold"] == 0.6
    assert worse["segm/F1"] == pytest.approx(4 / 7)
    assert "segm/F1" not in evaluate_coco(gt, [], backend=backend)


def test_recall_respects_max_dets_per_image_and_class(visibility_case):
    gt, results = visibility_case
    h = w = 100
    # 100 higher-scored class-1 predictions on empty pixels push A's match to rank 101
    noise = [_result(1, 1, _box_mask(h, w, 90, 0, 92, 2), 0.99) for _ in range(100)]
    metrics = evaluate_coco(gt, results + noise, max_dets=200, backend="pycocotools")
    assert metrics["segm/R50"] == pytest.approx(2 / 8)  # only class 2 (H, E) within 100
    assert metrics["segm/R50_vis_hi"] == 0.0
    assert metrics["segm/R50@200"] == pytest.approx(5 / 8)
    assert metrics["segm/R50_vis_hi@200"] == pytest.approx(1 / 2)


def test_recall_bins_of_empty_bins_are_minus_one(visibility_case):
    gt, _ = visibility_case
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"]:
        if "visible_fraction" in ann:
            ann["visible_fraction"] = 1.0
    metrics = evaluate_coco(gt, [], backend="pycocotools")
    assert metrics["segm/R50"] == metrics["segm/R50_vis_hi"] == 0.0
    assert metrics["segm/R50_vis_mid"] == metrics["segm/R50_vis_lo"] == -1.0
    assert metrics["segm/n_vis_hi"] == 7 and metrics["segm/n_vis_lo"] == 0


@pytest.fixture(scope="module")
def crowding_case() -> tuple[dict, list[dict]]:
    """Objects P, Q (class 1, side by side), R (class 2), a crowd region; an empty image 2."""
    h = w = 100
    P, Q, R = (10, 10, 30, 30), (32, 10, 52, 30), (60, 60, 80, 80)  # noqa: N806
    annotations = [
        _annotation(1, 1, 1, _box_mask(h, w, *P)),
        _annotation(2, 1, 1, _box_mask(h, w, *Q)),
        _annotation(3, 1, 2, _box_mask(h, w, *R)),
        _annotation(4, 1, 1, _box_mask(h, w, 0, 80, 40, 100), iscrowd=1),
    ]
    half_r = _box_mask(h, w, 60, 60, 80, 70)  # exactly half of R
    results = [
        _result(1, 1, _box_mask(h, w, *P), 0.9),  # takes P
        _result(1, 1, _box_mask(h, w, 12, 10, 32, 30), 0.8),  # P again (IoU 0.82): duplicate
        _result(1, 1, _box_mask(h, w, 10, 10, 52, 30), 0.7),  # P + Q in one mask: merge
        _result(1, 2, _box_mask(h, w, *R), 0.6),  # takes R
        _result(1, 2, _box_mask(h, w, *P), 0.5),  # P's mask, other class: neither
        _result(1, 1, half_r | _box_mask(h, w, 0, 80, 40, 100), 0.4),  # R + crowd: neither
        _result(1, 2, half_r | _box_mask(h, w, 10, 10, 30, 20), 0.35),  # half R + half P: merge
        _result(1, 2, _box_mask(h, w, *R), 0.2),  # R again, below the default threshold
    ]
    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i in (1, 2)],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    return gt, results


def test_duplicates_and_false_merges_on_hand_built_masks(crowding_case):
    gt, results = crowding_case
    coco = coco_from_annotations(gt)
    counts = count_duplicates_and_merges(coco, results)  # score >= 0.3
    assert counts == {
        "segm/duplicates_thr0.3": 1.0,
        "segm/duplicates_per_img_thr0.3": 0.5,  # over both images, the empty one included
        "segm/false_merges_thr0.3": 2.0,
        "segm/false_merges_per_img_thr0.3": 1.0,
    }
    low = count_duplicates_and_merges(coco, results, score_threshold=0.1, img_ids=[1])
    assert low["segm/duplicates_thr0.1"] == 2.0 and low["segm/false_merges_thr0.1"] == 2.0
    assert low["segm/duplicates_per_img_thr0.1"] == 2.0
    none = count_duplicates_and_merges(coco, results, score_threshold=0.95)
    assert none["segm/duplicates_thr0.95"] == none["segm/false_merges_thr0.95"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_coco_reports_duplicates_and_merges(crowding_case, backend):
    gt, results = crowding_case
    metrics = evaluate_coco(gt, results, backend=backend)
    assert metrics["segm/duplicates_thr0.3"] == 1.0
    assert metrics["segm/false_merges_thr0.3"] == 2.0
    assert evaluate_coco(gt, results, count_threshold=0.1)["segm/duplicates_thr0.1"] == 2.0


def test_recall_table_and_metric_names_suit_mlflow(visibility_case, crowding_case):
    from mlflow.utils.validation import _validate_metric_name

    metrics = evaluate_coco(*visibility_case, max_dets=200)
    for key in [*scalar_metrics(metrics), *scalar_metrics(evaluate_coco(*crowding_case))]:
        _validate_metric_name(key.replace("@", "_at_"))  # as experiment.py logs them
    lines = format_recall_table(metrics).splitlines()
    assert lines[0] == "| | R50 | vis>0.9 | vis 0.5-0.9 | vis<0.5 |"
    assert lines[2] == "| maxDets 100 | 62.5 | 50.0 | 66.7 | 50.0 |"
    assert lines[3].startswith("| maxDets 200 | 62.5 |")
    assert lines[4] == "| objects | - | 2 | 3 | 2 |"
    assert "score >= 0.3: 0 duplicates (0.00 per image), 0 false merges" in lines[-1]
    crowding = format_recall_table(evaluate_coco(*crowding_case)).splitlines()
    assert crowding[0] == "| | R50 |" and "1 duplicates (0.50 per image)" in crowding[-1]
