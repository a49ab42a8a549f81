"""COCO scoring speed: pycocotools vs faster-coco-eval through `pipeline.evaluate`.

Ground truth: the nuclei val set (crowded, up to 199 objects per image). Results: the ground
truth masks shifted by a few pixels, with random scores, 5% misses and extra false positives,
so matching is non-trivial. Reports wall time per backend, the speed ratio and the largest
metric difference between the backends.

    python benchmarks/bench_cocoeval.py [--annotations PATH] [--repeats 3] [--max-dets 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate import evaluate_coco, evaluate_thresholds, scalar_metrics  # noqa: E402

DEFAULT_ANNOTATIONS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei" / "val" / "annotations.json"
)


def jittered_results(gt: dict, seed: int = 0, drop: float = 0.05, extra: int = 300) -> list:
    """GT masks rolled by up to 3 pixels, random scores, misses and 8x8 false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd") or rng.random() < drop:
            continue
        mask = mask_utils.decode(gt_rle(gt, ann))
        mask = np.roll(mask, tuple(int(v) for v in rng.integers(-3, 4, size=2)), axis=(0, 1))
        results.append(result(ann["image_id"], ann["category_id"], mask, rng))
    images = gt["images"]
    for _ in range(extra):
        image = images[int(rng.integers(len(images)))]
        mask = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        x, y = int(rng.integers(image["width"] - 8)), int(rng.integers(image["height"] - 8))
        mask[y : y + 8, x : x + 8] = 1
        results.append(result(image["id"], gt["categories"][0]["id"], mask, rng))
    return results


def gt_rle(gt: dict, ann: dict) -> dict:
    segmentation = ann["segmentation"]
    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):
        return segmentation
    image = next(im for im in gt["images"] if im["id"] == ann["image_id"])
    rles = mask_utils.frPyObjects(segmentation, image["height"], image["width"])
    return mask_utils.merge(rles) if isinstance(rles, list) else rles


def result(image_id: int, category_id: int, mask: np.ndarray, rng) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "score": float(rng.uniform(0.01, 1.0)),
    }


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-dets", type=int, default=400)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
    )
    args = parser.parse_args()

    gt = json.loads(args.annotations.read_text())
    results = jittered_results(gt)
    print(
        f"ground truth: {args.annotations} ({len(gt['images'])} images, "
        f"{len(gt['annotations'])} instances); results: {len(results)}; "
        f"median of {args.repeats} runs"
    )
    print()
    print("| task | pycocotools (s) | faster-coco-eval (s) | speed-up | max abs metric diff |")
    print("|---|---|---|---|---|")
    tasks = {
        "evaluate_coco segm+bbox, maxDets 100": lambda backend: evaluate_coco(
            gt, results, max_dets=100, backend=backend
        ),
        f"evaluate_coco segm+bbox, maxDets {args.max_dets}": lambda backend: evaluate_coco(
            gt, results, max_dets=args.max_dets, backend=backend
        ),
        f"evaluate_thresholds x{len(args.thresholds)}, maxDets {args.max_dets}": (
            lambda backend: evaluate_thresholds(
                gt, results, args.thresholds, max_dets=args.max_dets, backend=backend
            )
        ),
    }
    for name, task in tasks.items():
        slow, slow_out = timed(lambda task=task: task("pycocotools"), args.repeats)
        fast, fast_out = timed(lambda task=task: task("faster_coco_eval"), args.repeats)
        pairs = [(slow_out, fast_out)]
        if "thresholds" in name:
            pairs = [(slow_out[t], fast_out[t]) for t in slow_out]
        diff = max(
            abs(value - scalar_metrics(b)[key])
            for a, b in pairs
            for key, value in scalar_metrics(a).items()
        )
        print(f"| {name} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
