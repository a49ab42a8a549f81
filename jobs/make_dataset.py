"""Write the embedded crowded-shapes dataset in COCO format (train/ and val/ splits).

    python jobs/make_dataset.py --out work/data/shapes --images 400 --size 256

Each split gets `annotations.json` and `images/*.jpg`; existing split folders are replaced.
The same arguments always give byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--images", type=int, default=400, help="number of images, all splits")
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of the images that go to val/"
    )
    parser.add_argument(
        "--object-scale", type=float, default=1.0, help="object sizes x this (1: the original)"
    )
    parser.add_argument("--max-objects", type=int, default=20, help="objects per image, at most")
    parser.add_argument(
        "--scene",
        choices=("shapes", "crowd", "amodal"),
        default="shapes",
        help="shapes: the original scenes; crowd: dense same-class packs (visible masks); "
        "amodal: the same images as crowd, each object's full extent as its mask",
    )
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.synth import make_dataset

    start = time.perf_counter()
    summary = make_dataset(
        args.out,
        images=args.images,
        size=args.size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        object_scale=args.object_scale,
        max_objects=args.max_objects,
        scene=args.scene,
    )
    elapsed = time.perf_counter() - start
    print(
        f"wrote {args.images} images of {args.size}x{args.size} px to {summary['out_dir']} "
        f"in {elapsed:.1f}s (seed {args.seed})"
    )
    for split, info in summary["splits"].items():
        print(
            f"  {split:5s} {info['images']:6d} images {info['instances']:7d} instances "
            f"{info['crowd_regions']:3d} crowd regions {info['empty_images']:3d} empty images"
            f"  -> {info['annotations']}"
        )
    print(f"  objects overlapping another: {summary['overlap_fraction']:.0%}")
    for split, info in summary["splits"].items():
        stats = info["statistics"]
        print(
            f"  {split:5s} {stats['objects_per_image']:.1f} objects/image (max "
            f"{stats['max_objects_per_image']}), under half visible "
            f"{stats['under_half_visible']:.0%}, touching one of their class "
            f"{stats['touching_same_class']:.0%}, mask IoU with another >= 0.2: "
            f"{stats['iou_ge_0.2']:.0%}, >= 0.5: {stats['iou_ge_0.5']:.0%}"
        )
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
