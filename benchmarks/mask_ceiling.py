"""The AP ceiling of PEP's mask representation on a COCO dataset: masks at `mask_stride`.

PEP predicts each mask on the general feature B at `model.mask_stride` (4 in every config here)
and trains it against the ground-truth mask's area fractions at that stride
(`pep_model.mask_learning.downsample_masks`). This script replaces every ground-truth object
by exactly that training target, decodes it the way `PEP.postprocess` does (a mask whose
stride-s binary is empty is dropped; otherwise bilinear x s, > 0.5, then resized to the
image's original size like `pipeline.evaluate.resize_masks`), gives it score 1 and scores the
result with COCOeval. The AP it prints is what a model that fitted its mask targets perfectly,
and found every object once, would reach: an upper bound set by the image size and the stride
alone, independent of training.

    python benchmarks/mask_ceiling.py ../shared/data/nuclei/val/annotations.json \
        --max-size 256 --strides 4 2 --max-dets 400

Images are first resized as `pipeline` prepares shards (longer side to `--max-size`, aspect
kept, never upscaled).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pep_model.mask_learning import downsample_masks  # noqa: E402
from pipeline import evaluate  # noqa: E402


def stride_targets(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """N x H x W binary masks -> N x ceil(H/s) x ceil(W/s) area fractions (PEP's mask targets)."""
    height, width = masks.shape[-2:]
    pad_h, pad_w = math.ceil(height / stride) * stride, math.ceil(width / stride) * stride
    padded = F.pad(masks.float(), (0, pad_w - width, 0, pad_h - height))
    return downsample_masks(padded, stride)


def decode_targets(targets: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Area fractions -> binary masks at `size` (H x W, the resized image), as postprocess does.

    Returns N x H x W bool; a mask whose stride-s binary is empty stays empty (postprocess drops
    such an instance).
    """
    height, width = size
    kept = (targets > 0.5).flatten(1).any(1)
    full = F.interpolate(
        targets[:, None], scale_factor=stride, mode="bilinear", align_corners=False
    )[:, 0, :height, :width]
    return (full > 0.5) & kept[:, None, None]


def ceiling(annotations: str | Path, max_size: int, stride: int, max_dets: int) -> dict[str, float]:
    """COCO metrics of the decoded stride-s targets, plus object counts and IoU statistics."""
    coco = evaluate.coco_from_annotations(annotations)
    results, ious, dropped = [], [], 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        height, width = info["height"], info["width"]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd")]
        if not anns:
            continue
        scale = min(1.0, max_size / max(height, width))
        size = (round(height * scale), round(width * scale))
        gt = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]))
        resized = torch.from_numpy(evaluate.resize_masks(gt, size))
        decoded = decode_targets(stride_targets(resized, stride), stride, size)
        masks = evaluate.resize_masks(decoded, (height, width))
        gt_np = gt.numpy().astype(bool)
        inter = (masks & gt_np).reshape(len(anns), -1).sum(1)
        union = (masks | gt_np).reshape(len(anns), -1).sum(1)
        ious.extend((inter / np.maximum(union, 1)).tolist())
        nonempty = masks.reshape(len(anns), -1).any(1)
        dropped += int((~nonempty).sum())
        for ann, rle in zip(
            [a for a, keep in zip(anns, nonempty) if keep], evaluate.encode_masks(masks[nonempty])
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "segmentation": rle,
                    "score": 1.0,
                }
            )
    metrics = evaluate.scalar_metrics(
        evaluate.evaluate_coco(coco, results, max_dets=max_dets, iou_types=["segm"])
    )
    ious = np.asarray(ious)
    metrics.update(
        objects=float(len(ious)),
        dropped=float(dropped),
        iou_median=float(np.median(ious)) if len(ious) else 0.0,
        iou_ge_50=float((ious >= 0.5).mean()) if len(ious) else 0.0,
        iou_ge_75=float((ious >= 0.75).mean()) if len(ious) else 0.0,
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", help="COCO annotations JSON (e.g. a val split)")
    parser.add_argument("--max-size", type=int, default=256, help="longer side after resize")
    parser.add_argument("--strides", nargs="+", type=int, default=[4, 2, 1])
    parser.add_argument("--max-dets", type=int, default=100, help="COCOeval maxDets")
    args = parser.parse_args(argv)

    suffix = f"@{args.max_dets}" if args.max_dets > 100 else ""
    print(
        f"{args.annotations}: images resized to longer side <= {args.max_size}; "
        f"segm AP of the ground truth's own stride-s mask targets (maxDets {args.max_dets})"
    )
    print(
        "| stride | objects | dropped (empty at stride) | median IoU | IoU >= 0.5 | IoU >= 0.75 "
        "| segm AP | AP50 | AP75 | APs | APm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for stride in args.strides:
        m = ceiling(args.annotations, args.max_size, stride, args.max_dets)
        n = int(m["objects"])
        print(
            f"| {stride} | {n} | {int(m['dropped'])} ({m['dropped'] / max(n, 1):.1%}) "
            f"| {m['iou_median']:.3f} | {m['iou_ge_50']:.1%} | {m['iou_ge_75']:.1%} | "
            + " | ".join(
                f"{m[f'segm/{k}{suffix}']:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm")
            )
            + " |"
        )


if __name__ == "__main__":
    main()
