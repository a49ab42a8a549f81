"""COCO scoring of instance-segmentation results with pycocotools' COCOeval (no Ray needed).

- `predictions_to_coco_results`: model outputs (masks at the model's input size) -> COCO
  results, one compressed RLE per instance from the binarised mask at the ORIGINAL size.
- `evaluate_coco`: AP, AP50, AP75, APs, APm, APl for segm and bbox at maxDets 100 and, for
  crowded data, at a raised limit (`max_dets`, e.g. 375 for the nuclei set), plus the segm
  precision-recall curve and the COCOeval params used.
- `evaluate_thresholds`: the same metrics at several score thresholds from ONE set of
  predictions made at a low threshold (the per-image matching is computed once).
- `recall_by_visibility`: segm recall at mask IoU 0.5 from COCOeval's own matching, overall
  and per visibility bin of the ground truth's `visible_fraction` (generated scenes).
- `count_duplicates_and_merges`: confident predictions that repeat an already found object
  or cover several objects with one mask.
- `format_ap_table` / `format_recall_table` / `format_threshold_table`: markdown tables.

Backends: pycocotools' COCOeval, or faster-coco-eval's COCOeval_faster (same matching and
accumulation in C++, agrees to 1e-6, ~13x faster on the crowded nuclei val set; see
BENCHMARKS.md). `backend="auto"` uses faster-coco-eval when it is installed.

Metric values follow COCOeval's convention: in [0, 1], and -1 where the ground truth has no
object in that area range (e.g. APl on data without large objects) or visibility bin.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

IOU_TYPES = ("segm", "bbox")
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COCO_MAX_DETS = 100  # COCOeval's standard per-image detection limit
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
# Bins of the ground truth's `visible_fraction` (share of the object not occluded), see
# `visibility_bin`; metric keys segm/R50_vis_<bin> and segm/n_vis_<bin>.
VISIBILITY_BINS = ("hi", "mid", "lo")
VISIBILITY_LABELS = {"hi": "vis>0.9", "mid": "vis 0.5-0.9", "lo": "vis<0.5"}
COUNT_SCORE_THRESHOLD = 0.3  # predictions counted as duplicates / false merges score >= this
# Upper bound on the float buffer used when resizing masks to the original size (elements).
_RESIZE_CHUNK_ELEMENTS = 32 * 1024 * 1024


class EvaluationError(ValueError):
    """Bad ground truth or results for COCO evaluation (the message names the record)."""


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' progress prints (it uses print, not logging)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def coco_from_annotations(source: str | Path | Mapping[str, Any]) -> COCO:
    """Load a COCO instances JSON file (or an already parsed dataset dict) as a COCO object."""
    if isinstance(source, Mapping):
        dataset = copy.deepcopy(dict(source))
        where = "<annotations dict>"
    else:
        path = Path(source)
        where = str(path)
        try:
            dataset = json.loads(path.read_text())
        except FileNotFoundError:
            raise EvaluationError(f"{path}: annotation file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvaluationError(f"{path}: not a valid JSON file: {e}") from None
    if not isinstance(dataset, dict):
        raise EvaluationError(f"{where}: expected a COCO dict at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise EvaluationError(f"{where}: missing or invalid '{key}' list (COCO instances)")
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise EvaluationError(f"backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            return "pycocotools"
        return "faster_coco_eval"
    return backend


def _coco_class(backend: str) -> type:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO

        return FasterCOCO
    return COCO


def _gt_for_backend(gt: Any, backend: str) -> Any:
    """The ground truth as a COCO object of the backend's own class."""
    coco_class = _coco_class(backend)
    if isinstance(gt, coco_class):
        return gt
    if hasattr(gt, "dataset") and hasattr(gt, "loadRes"):  # the other backend's COCO
        dataset = copy.deepcopy(gt.dataset)
    else:
        dataset = coco_from_annotations(gt).dataset
    if coco_class is COCO:
        return coco_from_annotations(dataset)
    return coco_class(dataset, print_function=logger.debug)


# --------------------------------------------------------------------------------------------
# Predictions -> COCO results
# --------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def resize_masks(masks: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize binary masks [K,h,w] to `size` (H,W): bilinear, then threshold at 0.5 -> bool."""
    masks_t = torch.as_tensor(_to_numpy(masks))
    if masks_t.ndim != 3:
        raise EvaluationError(f"masks must be [K,H,W], got shape {tuple(masks_t.shape)}")
    height, width = int(size[0]), int(size[1])
    if tuple(masks_t.shape[-2:]) == (height, width):
        return masks_t.numpy().astype(bool, copy=False)
    out = np.zeros((masks_t.shape[0], height, width), dtype=bool)
    chunk = max(1, _RESIZE_CHUNK_ELEMENTS // max(1, height * width))
    for start in range(0, masks_t.shape[0], chunk):
        part = masks_t[start : start + chunk].float()[:, None]  # k x 1 x h x w
        resized = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
        out[start : start + chunk] = (resized[:, 0] >= 0.5).numpy()
    return out


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [K,H,W] -> COCO compressed RLEs with `counts` as str (JSON-ready)."""
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def predictions_to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    orig_sizes: Sequence[tuple[int, int]],
    contiguous_to_coco: Mapping[int, int],
) -> list[dict[str, Any]]:
    """Convert per-image model outputs to COCO results at each image's original size.

    predictions[i] is the model's eval output for image i: `labels` [K] (contiguous 1..C),
    `scores` [K], `masks` bool [K,h,w] at the model input size, `boxes` [K,4] xyxy at the
    same size. `orig_sizes[i]` is (height, width) of the original image. Each instance gives
    one result {image_id, category_id (COCO id), segmentation (RLE), bbox [x,y,w,h], score};
    the bbox is the tight box of the mask at the original size (PEP has no box head).
    """
    if not len(predictions) == len(image_ids) == len(orig_sizes):
        raise EvaluationError(
            f"predictions ({len(predictions)}), image_ids ({len(image_ids)}) and orig_sizes "
            f"({len(orig_sizes)}) must have the same length"
        )
    to_coco = {int(k): int(v) for k, v in contiguous_to_coco.items()}
    results: list[dict[str, Any]] = []
    for prediction, image_id, (height, width) in zip(predictions, image_ids, orig_sizes):
        try:
            labels = _to_numpy(prediction["labels"]).astype(np.int64).reshape(-1)
            scores = _to_numpy(prediction["scores"]).astype(np.float64).reshape(-1)
            masks = _to_numpy(prediction["masks"])
            boxes = _to_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)
        except KeyError as e:
            raise EvaluationError(f"image {image_id}: prediction has no {e} entry") from None
        num = len(labels)
        if not (len(scores) == len(boxes) == num and masks.ndim == 3 and masks.shape[0] == num):
            raise EvaluationError(
                f"image {image_id}: inconsistent prediction shapes labels {labels.shape}, "
                f"scores {scores.shape}, masks {masks.shape}, boxes {boxes.shape}"
            )
        unknown = sorted(set(labels.tolist()) - set(to_coco))
        if unknown:
            raise EvaluationError(
                f"image {image_id}: predicted labels {unknown} are not in the category map "
                f"(contiguous ids {sorted(to_coco)})"
            )
        if num == 0:
            continue
        in_h, in_w = masks.shape[-2:]
        resized = resize_masks(masks, (height, width))
        rles = encode_masks(resized)
        # The box of the mask at the original size (COCO convention, w = columns covered);
        # the model's box, scaled, only where the resized mask came out empty.
        mask_boxes = mask_utils.toBbox(rles)  # K x 4, xywh
        scale = np.array([width / in_w, height / in_h, width / in_w, height / in_h])
        xyxy = boxes * scale
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
        scaled_boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        # (from the masks, not pycocotools' `area`: with numpy 2 it raises OverflowError for a
        # list of more than 255 RLEs, which crowded images with a raised --max-dets produce)
        empty = ~resized.reshape(num, -1).any(axis=1)
        bboxes = np.where(empty[:, None], scaled_boxes, mask_boxes)
        for label, score, rle, bbox in zip(labels, scores, rles, bboxes):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": to_coco[int(label)],
                    "segmentation": rle,
                    "bbox": [float(v) for v in bbox],
                    "score": float(score),
                }
            )
    return results


# --------------------------------------------------------------------------------------------
# COCOeval
# --------------------------------------------------------------------------------------------


def _max_dets_list(max_dets: int) -> list[int]:
    if max_dets < COCO_MAX_DETS:
        raise EvaluationError(
            f"max_dets={max_dets}: must be >= {COCO_MAX_DETS} (COCO's standard limit); lower "
            "the model's max_instances to cap its output instead"
        )
    return [1, 10, COCO_MAX_DETS] + ([max_dets] if max_dets > COCO_MAX_DETS else [])


def _load_results(gt: Any, results: Sequence[Mapping[str, Any]], iou_type: str) -> Any:
    """COCO.loadRes on copies of the results (it mutates them), also for an empty list.

    For segm the `bbox` key is dropped, as detectron2 does: otherwise loadRes takes the box
    area as the instance area, which changes the small/medium/large split of mask AP.
    """
    known_images = set(gt.getImgIds())
    anns = []
    for i, result in enumerate(results):
        missing = {"image_id", "category_id", "score"} - set(result)
        if iou_type == "segm" and "segmentation" not in result:
            missing.add("segmentation")
        if iou_type == "bbox" and "bbox" not in result:
            missing.add("bbox")
        if missing:
            raise EvaluationError(f"result {i}: missing {sorted(missing)} for {iou_type} eval")
        if result["image_id"] not in known_images:
            raise EvaluationError(
                f"result {i}: image_id {result['image_id']} is not in the ground truth"
            )
        ann = dict(result)
        if iou_type == "segm":
            ann.pop("bbox", None)
        anns.append(ann)
    if anns:
        with _quiet():
            return gt.loadRes(anns)
    res = type(gt)()  # loadRes fails on an empty list: an empty result set with the GT's images
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    with _quiet():
        res.createIndex()
    return res


def _run_evaluate(
    gt: Any,
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    max_dets: int,
    img_ids: Sequence[int] | None,
    backend: str,
) -> COCOeval:
    """COCOeval after `evaluate()` (per-image matching), before `accumulate()`."""
    if iou_type not in IOU_TYPES:
        raise EvaluationError(f"iou_type {iou_type!r}: expected one of {IOU_TYPES}")
    dt = _load_results(gt, results, iou_type)
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster

        coco_eval = COCOeval_faster(gt, dt, iou_type, print_function=logger.debug)
    else:
        coco_eval = COCOeval(gt, dt, iouType=iou_type)
    coco_eval.params.maxDets = _max_dets_list(max_dets)
    if img_ids is not None:
        coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
    with _quiet():
        coco_eval.evaluate()
    return coco_eval


def _filter_by_score(coco_eval: COCOeval, threshold: float) -> COCOeval:
    """A copy of an evaluated COCOeval whose per-image records keep only scores >= threshold.

    Exactly equal to evaluating the filtered results: COCOeval matches detections greedily in
    descending score order, so dropping the lowest-scored ones never changes earlier matches.
    """
    filtered = copy.copy(coco_eval)
    eval_imgs = []
    for record in coco_eval.evalImgs:
        if record is None:
            eval_imgs.append(None)
            continue
        keep = np.asarray(record["dtScores"], dtype=np.float64) >= threshold
        if not keep.any() and not record["gtIds"]:
            eval_imgs.append(None)  # what evaluateImg returns for no GT and no detection
            continue
        record = dict(record)
        record["dtIds"] = [d for d, k in zip(record["dtIds"], keep) if k]
        record["dtScores"] = [s for s, k in zip(record["dtScores"], keep) if k]
        record["dtMatches"] = record["dtMatches"][:, keep]
        record["dtIgnore"] = record["dtIgnore"][:, keep]
        eval_imgs.append(record)
    filtered.evalImgs = eval_imgs
    return filtered


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _summarize(coco_eval: COCOeval, iou_type: str, max_dets: int) -> dict[str, float]:
    """AP table from `eval["precision"]` [T,R,K,A,M] at maxDets 100 and at `max_dets`.

    The same means as COCOeval.summarize(), which can only read its default maxDets indices.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # T x R x K x A x M
    area = {label: i for i, label in enumerate(params.areaRngLbl)}
    iou_50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    iou_75 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.75)))
    metrics: dict[str, float] = {}
    limits = [COCO_MAX_DETS] + ([max_dets] if max_dets > COCO_MAX_DETS else [])
    for limit in limits:
        m = list(params.maxDets).index(limit)
        suffix = "" if limit == COCO_MAX_DETS else f"@{limit}"
        values = {
            "AP": precision[:, :, :, area["all"], m],
            "AP50": precision[iou_50, :, :, area["all"], m],
            "AP75": precision[iou_75, :, :, area["all"], m],
            "APs": precision[:, :, :, area["small"], m],
            "APm": precision[:, :, :, area["medium"], m],
            "APl": precision[:, :, :, area["large"], m],
        }
        for name in METRIC_NAMES:
            metrics[f"{iou_type}/{name}{suffix}"] = _mean_valid(values[name])
    return metrics


def _pr_curve(coco_eval: COCOeval, max_dets: int) -> dict[str, Any]:
    """Precision vs recall (COCO's 101-point grid), area all, averaged over classes."""
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # T x R x K x A x M
    a = list(params.areaRngLbl).index("all")
    m = list(params.maxDets).index(max_dets)
    iou_50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    per_recall = precision[:, :, :, a, m].transpose(1, 0, 2)  # R x T x K
    return {
        "max_dets": max_dets,
        "recall": [float(r) for r in params.recThrs],
        "precision": [_mean_valid(p) for p in per_recall],  # IoU .50:.95 mean
        "precision50": [_mean_valid(p[iou_50]) for p in per_recall],  # IoU .50
    }


def _params_dict(coco_eval: COCOeval) -> dict[str, Any]:
    params = coco_eval.params
    return {
        "iouThrs": [round(float(t), 4) for t in params.iouThrs],
        "recThrs": [round(float(r), 4) for r in params.recThrs],
        "maxDets": [int(m) for m in params.maxDets],
        "areaRng": {
            label: [float(lo), float(hi)]
            for label, (lo, hi) in zip(params.areaRngLbl, params.areaRng)
        },
        "num_images": len(params.imgIds),
        "catIds": [int(c) for c in params.catIds],
    }


def _collect(
    evaluated: Mapping[str, COCOeval], max_dets: int, threshold: float | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for iou_type, coco_eval in evaluated.items():
        if threshold is not None:
            coco_eval = _filter_by_score(coco_eval, threshold)
        with _quiet():
            coco_eval.accumulate()
        out.update(_summarize(coco_eval, iou_type, max_dets))
        if iou_type == "segm":
            out["pr_curve"] = _pr_curve(coco_eval, max_dets)
        out.setdefault("params", {})[iou_type] = _params_dict(coco_eval)
    return out


def evaluate_coco(
    gt: COCO | str | Path | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    max_dets: int = COCO_MAX_DETS,
    iou_types: Sequence[str] = IOU_TYPES,
    img_ids: Sequence[int] | None = None,
    backend: str = "auto",
    count_threshold: float = COUNT_SCORE_THRESHOLD,
) -> dict[str, Any]:
    """Score COCO results against the ground truth with COCOeval.

    Returns flat float metrics `{iou_type}/{AP,AP50,AP75,APs,APm,APl}` at maxDets 100 and,
    when `max_dets` > 100, also `{iou_type}/{name}@{max_dets}` (COCOeval's maxDets becomes
    [1, 10, 100, max_dets]); plus `pr_curve` (segm precision vs recall at `max_dets`) and
    `params` (the COCOeval params per iou type). With segm, also recall at IoU 0.5 by
    visibility (`recall_by_visibility`) and duplicates / false merges at score >=
    `count_threshold` (`count_duplicates_and_merges`). `img_ids` restricts the evaluated
    images (default: every image of the ground truth; images without results count as
    misses). `backend`: "pycocotools", "faster_coco_eval" or "auto" (the latter when
    installed).
    """
    backend = _resolve_backend(backend)
    coco_gt = _gt_for_backend(gt, backend)
    evaluated = {
        t: _run_evaluate(coco_gt, results, t, max_dets, img_ids, backend) for t in iou_types
    }
    metrics = _collect(evaluated, max_dets, threshold=None)
    if "segm" in evaluated:
        if backend == "pycocotools":
            matched = evaluated["segm"]
        else:  # faster-coco-eval's per-image matches are not readable: pycocotools at IoU 0.5
            pycoco_gt = _gt_for_backend(coco_gt, "pycocotools")
            matched = _match_at_iou_50(pycoco_gt, results, max_dets, img_ids)
        metrics.update(_segm_counts(matched, results, max_dets, img_ids, count_threshold))
    logger.info(
        "COCO eval (%s) of %d results on %d images: %s",
        backend,
        len(results),
        len(coco_gt.getImgIds() if img_ids is None else img_ids),
        ", ".join(f"{k}={v:.4f}" for k, v in scalar_metrics(metrics).items() if k.endswith("/AP")),
    )
    return metrics


def evaluate_thresholds(
    gt: COCO | str | Path | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    thresholds: Sequence[float],
    max_dets: int = COCO_MAX_DETS,
    iou_types: Sequence[str] = IOU_TYPES,
    img_ids: Sequence[int] | None = None,
    backend: str = "auto",
    count_threshold: float = COUNT_SCORE_THRESHOLD,
) -> dict[float, dict[str, Any]]:
    """`evaluate_coco` of the results with score >= t, for every t, from one set of results.

    The results come from one prediction pass at a low score threshold. With pycocotools the
    per-image matching runs once and each threshold only re-accumulates (exactly the numbers
    of separate passes on the filtered results); faster-coco-eval, whose per-image records
    live in C++, runs one fast pass per threshold (plus pycocotools' matching at IoU 0.5
    for the recall by visibility).
    """
    backend = _resolve_backend(backend)
    coco_gt = _gt_for_backend(gt, backend)
    ordered = sorted(float(t) for t in thresholds)
    per_threshold = {}
    if backend == "pycocotools":
        evaluated = {
            t: _run_evaluate(coco_gt, results, t, max_dets, img_ids, backend) for t in iou_types
        }
        for threshold in ordered:
            metrics = _collect(evaluated, max_dets, threshold=threshold)
            if "segm" in evaluated:
                kept = [r for r in results if r["score"] >= threshold]
                matched = _filter_by_score(evaluated["segm"], threshold)
                metrics.update(_segm_counts(matched, kept, max_dets, img_ids, count_threshold))
            per_threshold[threshold] = metrics
        return per_threshold
    pycoco_gt = _gt_for_backend(coco_gt, "pycocotools") if "segm" in iou_types else None
    for threshold in ordered:
        kept = [r for r in results if r.get("score", threshold) >= threshold]  # checked later
        evaluated = {
            t: _run_evaluate(coco_gt, kept, t, max_dets, img_ids, backend) for t in iou_types
        }
        metrics = _collect(evaluated, max_dets, threshold=None)
        if pycoco_gt is not None:
            matched = _match_at_iou_50(pycoco_gt, kept, max_dets, img_ids)
            metrics.update(_segm_counts(matched, kept, max_dets, img_ids, count_threshold))
        per_threshold[threshold] = metrics
    return per_threshold


# --------------------------------------------------------------------------------------------
# Recall by visibility, duplicates and false merges
# --------------------------------------------------------------------------------------------


def visibility_bin(fraction: float) -> str:
    """Bin of a visible fraction: "hi" above 0.9, "mid" from 0.5 to 0.9, "lo" below 0.5."""
    if fraction > 0.9:
        return "hi"
    return "mid" if fraction >= 0.5 else "lo"


def _limit_suffix(limit: int) -> str:
    return "" if limit == COCO_MAX_DETS else f"@{limit}"


def recall_by_visibility(coco_eval: COCOeval, max_dets: int = COCO_MAX_DETS) -> dict[str, float]:
    """Recall at mask IoU 0.5 of the non-crowd ground truth, overall and per visibility bin.

    Reads pycocotools' per-image matching (`evalImgs` after `evaluate()`, area range "all"):
    an object is recalled when COCOeval matched it at IoU 0.5 to a detection of its class
    within the first maxDets of that image and class. Crowd regions (gtIgnore) do not count.
    Returns `segm/R50` and, for objects with a `visible_fraction` field, `segm/R50_vis_<bin>`
    with the object counts `segm/n_vis_<bin>` (bins: `visibility_bin`); at maxDets 100 and,
    when `max_dets` > 100, also `...@{max_dets}`. -1 where a bin holds no object; no visibility
    keys at all when no object has the field (e.g. real data).
    """
    params = coco_eval.params
    if not isinstance(getattr(coco_eval, "evalImgs", None), list):
        raise EvaluationError("recall_by_visibility needs a pycocotools COCOeval after evaluate()")
    iou_50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    if abs(float(params.iouThrs[iou_50]) - 0.5) > 1e-6:
        raise EvaluationError(f"COCOeval iouThrs {list(params.iouThrs)} lack 0.5")
    area_all = list(params.areaRng[list(params.areaRngLbl).index("all")])
    limits = [COCO_MAX_DETS] + ([max_dets] if max_dets > COCO_MAX_DETS else [])
    found = {limit: {"all": 0} | dict.fromkeys(VISIBILITY_BINS, 0) for limit in limits}
    counts = {"all": 0} | dict.fromkeys(VISIBILITY_BINS, 0)
    with_field = 0
    for record in coco_eval.evalImgs:
        if record is None or list(record["aRng"]) != area_all:
            continue
        rank = {int(d): r for r, d in enumerate(record["dtIds"])}  # dtIds in score order
        for g, gt_id in enumerate(record["gtIds"]):
            if record["gtIgnore"][g]:
                continue
            fraction = coco_eval.cocoGt.anns[gt_id].get("visible_fraction")
            groups = ["all"] if fraction is None else ["all", visibility_bin(float(fraction))]
            with_field += fraction is not None
            for group in groups:
                counts[group] += 1
            # the matched detection's id (0: none); not in dtIds when a score filter dropped it
            matched = rank.get(int(record["gtMatches"][iou_50, g]))
            for limit in limits:
                if matched is not None and matched < limit:
                    for group in groups:
                        found[limit][group] += 1
    metrics: dict[str, float] = {}
    for limit in limits:
        suffix = _limit_suffix(limit)
        for group in ["all", *(VISIBILITY_BINS if with_field else [])]:
            key = "segm/R50" if group == "all" else f"segm/R50_vis_{group}"
            metrics[key + suffix] = found[limit][group] / counts[group] if counts[group] else -1.0
    if with_field:
        metrics.update({f"segm/n_vis_{b}": float(counts[b]) for b in VISIBILITY_BINS})
    return metrics


def best_f1_threshold(coco_eval: COCOeval) -> dict[str, float]:
    """The score threshold that maximises F1 at mask IoU 0.5 (area "all", every detection
    COCOeval kept: an image's first max_dets of each class).

    Reads the per-image matching of an evaluated pycocotools COCOeval, as
    `recall_by_visibility` does: every detection
    is a true positive when COCOeval matched it to an object at IoU 0.5, a false positive
    otherwise; detections matched to crowd regions (dtIgnore) are neither. Sweeping the
    threshold down the sorted scores gives precision, recall and F1 at each; the best F1 is
    returned with its threshold (the lowest score it keeps), its precision and recall:
    `segm/F1`, `segm/F1_threshold`, `segm/F1_precision`, `segm/F1_recall`. The threshold is
    what a person should look at (`visualize` draws at it); AP is computed without it.
    Returns {} when nothing is detected or no object exists.
    """
    params = coco_eval.params
    iou_50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    area_all = list(params.areaRng[list(params.areaRngLbl).index("all")])
    scores: list[float] = []
    hits: list[bool] = []
    objects = 0
    for record in coco_eval.evalImgs:
        if record is None or list(record["aRng"]) != area_all:
            continue
        objects += int(np.sum(~np.asarray(record["gtIgnore"], dtype=bool)))
        kept = ~np.asarray(record["dtIgnore"][iou_50], dtype=bool)
        scores += [float(s) for s, k in zip(record["dtScores"], kept, strict=True) if k]
        matched = np.asarray(record["dtMatches"][iou_50])[kept] > 0
        hits += matched.tolist()
    if not scores or not objects:
        return {}
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores = np.asarray(scores)[order]
    tp = np.cumsum(np.asarray(hits)[order])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / objects
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    # a threshold keeps every detection of its score: only the last of equal scores counts
    last_of_score = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    f1 = np.where(last_of_score, f1, -1.0)
    best = int(np.argmax(f1))
    return {
        "segm/F1": float(f1[best]),
        "segm/F1_threshold": float(sorted_scores[best]),
        "segm/F1_precision": float(precision[best]),
        "segm/F1_recall": float(recall[best]),
    }


def _match_at_iou_50(
    gt: COCO, results: Sequence[Mapping[str, Any]], max_dets: int, img_ids: Sequence[int] | None
) -> COCOeval:
    """pycocotools' segm matching at IoU 0.5, area "all" only: the same per-image matches as
    a full `evaluate()` at that threshold (each threshold and area range is matched on its
    own), for a backend whose per-image records cannot be read (faster-coco-eval keeps them
    in C++ and has no `evalImgs`)."""
    coco_eval = COCOeval(gt, _load_results(gt, results, "segm"), iouType="segm")
    params = coco_eval.params
    params.iouThrs = np.array([0.5])
    params.areaRng, params.areaRngLbl = [params.areaRng[0]], ["all"]
    params.maxDets = _max_dets_list(max_dets)
    if img_ids is not None:
        params.imgIds = sorted(int(i) for i in img_ids)
    with _quiet():
        coco_eval.evaluate()
    return coco_eval


def _segm_counts(
    matched: COCOeval,
    results: Sequence[Mapping[str, Any]],
    max_dets: int,
    img_ids: Sequence[int] | None,
    count_threshold: float,
) -> dict[str, float]:
    """Recall by visibility from an evaluated pycocotools COCOeval, duplicates and merges."""
    metrics = recall_by_visibility(matched, max_dets)
    metrics.update(best_f1_threshold(matched))
    metrics.update(count_duplicates_and_merges(matched.cocoGt, results, count_threshold, img_ids))
    return metrics


def count_duplicates_and_merges(
    gt: COCO,
    results: Sequence[Mapping[str, Any]],
    score_threshold: float = COUNT_SCORE_THRESHOLD,
    img_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Duplicates and false merges among the segm results with score >= `score_threshold`.

    Per image, against the non-crowd ground truth (crowd regions are left out):
    - duplicate: a prediction whose best-IoU object of its own class (mask IoU >= 0.5) is
      already the best-IoU object of a higher-scored prediction. The first prediction to
      reach an object takes it; every later one on it is a duplicate (a split object, or
      NMS/purifying leaving two masks for one object).
    - false merge: a prediction that covers two or more objects, of any class, each with at
      least half of its pixels (|prediction & object| >= 0.5 |object|): one mask for several.
    Returns `segm/duplicates_thr{t}` and `segm/false_merges_thr{t}` (totals) and the
    `..._per_img_thr{t}` means over the evaluated images (`img_ids`, default all of `gt`).
    """
    ids = [int(i) for i in (gt.getImgIds() if img_ids is None else img_ids)]
    kept: dict[int, list[Mapping[str, Any]]] = {i: [] for i in ids}
    for result in results:
        if result["score"] >= score_threshold and int(result["image_id"]) in kept:
            kept[int(result["image_id"])].append(result)
    duplicates = merges = 0
    for image_id, preds in kept.items():
        objects = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not preds or not objects:
            continue
        preds = sorted(preds, key=lambda r: -r["score"])
        pred_rles = [r["segmentation"] for r in preds]
        gt_rles = [gt.annToRLE(a) for a in objects]
        iou = mask_utils.iou(pred_rles, gt_rles, [0] * len(gt_rles))  # P x G
        same_class = np.array([r["category_id"] for r in preds])[:, None] == np.array(
            [a["category_id"] for a in objects]
        )
        iou = np.where(same_class, iou, 0.0)
        taken: set[int] = set()
        for row in iou:
            best = int(np.argmax(row))
            if row[best] >= 0.5:
                duplicates += best in taken
                taken.add(best)
        # with every "ground truth" a crowd, iou(a, b) = |a & b| / |a|: each object's share
        # covered by each prediction
        covered = mask_utils.iou(gt_rles, pred_rles, [1] * len(pred_rles))  # G x P
        merges += int(((covered >= 0.5).sum(axis=0) >= 2).sum())
    n = max(1, len(ids))
    t = f"{score_threshold:g}"
    return {
        f"segm/duplicates_thr{t}": float(duplicates),
        f"segm/duplicates_per_img_thr{t}": duplicates / n,
        f"segm/false_merges_thr{t}": float(merges),
        f"segm/false_merges_per_img_thr{t}": merges / n,
    }


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only the float metrics of an `evaluate_coco` result (what goes to MLflow)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{100 * value:.1f}"


def _limits(metrics: Mapping[str, Any]) -> list[str]:
    """'' for maxDets 100 and '@N' for every raised limit present in the metrics."""
    suffixes = {k.split("@", 1)[1] for k in metrics if "@" in k and "/" in k}
    return [""] + [f"@{s}" for s in sorted(suffixes, key=int)]


def format_ap_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table (values in %): rows segm/bbox (and '@N' rows for a raised maxDets)."""
    lines = ["| | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for suffix in _limits(metrics):
        for iou_type in IOU_TYPES:
            keys = [f"{iou_type}/{name}{suffix}" for name in METRIC_NAMES]
            if not any(k in metrics for k in keys):
                continue
            row = [f"{iou_type}{' ' + suffix if suffix else ''}"]
            row += [_fmt(metrics.get(k)) for k in keys]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_recall_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table of segm recall at IoU 0.5 (%), overall and per visibility bin, one row
    per maxDets limit, the objects per bin, and a line with the duplicates and false merges.
    Empty when the metrics hold no recall (bbox only)."""
    if "segm/R50" not in metrics:
        return ""
    bins = [b for b in VISIBILITY_BINS if f"segm/R50_vis_{b}" in metrics]
    header = ["R50", *(VISIBILITY_LABELS[b] for b in bins)]
    lines = ["| | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for suffix in _limits(metrics):
        if f"segm/R50{suffix}" not in metrics:
            continue
        keys = ["segm/R50", *(f"segm/R50_vis_{b}" for b in bins)]
        cells = [f"maxDets {suffix[1:] or COCO_MAX_DETS}"]
        cells += [_fmt(metrics.get(key + suffix)) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    if bins:
        counts = [f"{metrics[f'segm/n_vis_{b}']:.0f}" for b in bins]
        lines.append("| " + " | ".join(["objects", "-", *counts]) + " |")
    for key in sorted(k for k in metrics if k.startswith("segm/duplicates_thr")):
        t = key.removeprefix("segm/duplicates_thr")
        lines += [
            "",
            f"score >= {t}: {metrics[key]:.0f} duplicates "
            f"({metrics[f'segm/duplicates_per_img_thr{t}']:.2f} per image), "
            f"{metrics[f'segm/false_merges_thr{t}']:.0f} false merges "
            f"({metrics[f'segm/false_merges_per_img_thr{t}']:.2f} per image)",
        ]
    return "\n".join(lines)


def format_threshold_table(per_threshold: Mapping[float, Mapping[str, Any]]) -> str:
    """Markdown table of AP (in %) per score threshold, for each iou type and maxDets limit."""
    if not per_threshold:
        return "(no thresholds)"
    first = next(iter(per_threshold.values()))
    columns = [
        f"{iou_type}/AP{suffix}"
        for suffix in _limits(first)
        for iou_type in IOU_TYPES
        if f"{iou_type}/AP{suffix}" in first
    ]
    lines = ["| score >= | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for threshold, metrics in per_threshold.items():
        row = [f"{threshold:g}"] + [_fmt(metrics.get(c)) for c in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_pr_curve(pr_curve: Mapping[str, Any], path: str | Path) -> Path:
    """Save the segm precision-recall curve (from `evaluate_coco`) as a PNG artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(pr_curve["recall"], pr_curve["precision"], label="IoU .50:.95")
    ax.plot(pr_curve["recall"], pr_curve["precision50"], label="IoU .50")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"segm precision-recall (maxDets {pr_curve['max_dets']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
