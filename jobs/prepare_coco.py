"""Shard a COCO instances dataset into Parquet for training (wiring around pipeline.prepare).

    python jobs/prepare_coco.py --annotations A.json --images DIR --out SHARDS \
        [--max-size 512] [--rows-per-shard 256] [--force]

Re-running with the same input and options reuses the shards; `--force` rebuilds. Exit
status 2 when the annotation file, image folder or output folder is unusable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.prepare import PrepareResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python jobs/x.py`

# pipeline.prepare.PrepareConfig's defaults, repeated so that --help imports no Ray (a test
# compares them); None in the parser means "PrepareConfig's".
DEFAULTS = {"max_size": 512, "rows_per_shard": 256, "jpeg_quality": 95}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--annotations", required=True, help="COCO instances JSON file")
    parser.add_argument("--images", required=True, help="folder of the images it names")
    parser.add_argument("--out", required=True, help="shards folder (created or replaced)")
    parser.add_argument(
        "--max-size",
        type=int,
        help="longer image side after resizing (aspect kept, no upscaling; default "
        f"{DEFAULTS['max_size']})",
    )
    parser.add_argument("--rows-per-shard", type=int, help=f"default {DEFAULTS['rows_per_shard']}")
    parser.add_argument("--jpeg-quality", type=int, help=f"default {DEFAULTS['jpeg_quality']}")
    parser.add_argument("--force", action="store_true", help="rebuild even if reusable")
    return parser


def summary_table(result: PrepareResult) -> str:
    """Plain-text summary of a prepare run: counts, rejections by reason, shards."""
    manifest = result.manifest
    counts = manifest["counts"]
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    rows = [
        ("shards", f"{result.out_dir} ({'reused' if result.reused else 'built'})"),
        ("time", f"{result.seconds:.1f} s"),
        ("images in", counts["images_in"]),
        ("  written", counts["images_written"]),
        ("  rejected", counts["images_rejected"]),
        ("  negative (no annotations)", counts["negative_images_written"]),
        ("annotations in", counts["annotations_in"]),
        ("  written", counts["annotations_written"]),
        ("  rejected", counts["annotations_rejected"]),
        ("  crowd (written)", counts["crowd_annotations_written"]),
        ("categories", len(manifest["categories"])),
        ("shard files", f"{counts['shards']} ({shard_bytes / 1e6:.1f} MB)"),
    ]
    rows += [(f"rejected {code}", n) for code, n in manifest["rejections_by_code"].items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def main(args: argparse.Namespace) -> PrepareResult:
    from pipeline.prepare import PrepareConfig, prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    given = {name: getattr(args, name) for name in DEFAULTS if getattr(args, name) is not None}
    config = PrepareConfig(**given)
    result = prepare(args.annotations, args.images, args.out, config, force=args.force)
    print(summary_table(result))
    if result.reused:
        print(
            f"Reused the existing shards in {result.out_dir} (same input and config; "
            "--force rebuilds)."
        )
    elif (
        result.manifest["counts"]["images_rejected"]
        or result.manifest["counts"]["annotations_rejected"]
    ):
        print(f"Rejected records and reasons: {Path(result.out_dir) / 'manifest.json'}")
    return result


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    from pipeline.coco import CocoError
    from pipeline.prepare import PrepareError

    try:
        main(parsed)
    except (CocoError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
