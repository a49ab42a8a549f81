"""Predict instance masks on images: COCO results JSON and an overlay PNG per image.

    python jobs/predict_pep.py --model models:/pep@champion --out predictions photos/ x.jpg
    python jobs/predict_pep.py --model work/runs/pep/checkpoint_.../checkpoint.pt --out out img/

`--model` is a checkpoint file, a Ray Train checkpoint directory, or an MLflow model URI
(`models:/m-<id>`, `models:/<name>@<alias>`, `models:/<name>/<version>`,
`runs:/<run_id>/model`) fetched from `--tracking-uri` (else MLFLOW_TRACKING_URI, else
work/mlflow.db). Folders are expanded to their image files, sorted. For each image,
`<out>/<stem>.json` holds its COCO results (RLE masks, xywh boxes at the original size) and
`<out>/<stem>.png` the image with coloured masks and `class score` captions. Unreadable images
are skipped and listed. Exit status 2 on a bad model source or no input images, 1 when no
image could be read.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python jobs/x.py`

from pipeline import cli  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument(
        "--model",
        required=True,
        metavar="SOURCE",
        help="checkpoint file or Ray Train checkpoint dir (local or s3://...), or MLflow URI "
        "(models:/..., runs:/...)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for models:/ and runs:/ (default: MLFLOW_TRACKING_URI, "
        "else work/mlflow.db)",
    )
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--max-instances", type=int, default=100, help="instances per image")
    parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument("--use-gpu", choices=["auto", "true", "false"], default="auto")
    parser.add_argument(
        "--categories",
        default=None,
        metavar="JSON",
        help="COCO annotation JSON or shards manifest.json: results get its COCO category ids "
        "(and an annotation JSON's image ids, by file name); default: contiguous class ids",
    )
    cli.add_verbose_flag(parser, "MLflow's own logs and download progress bars")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    return parser


def main(args: argparse.Namespace) -> int:
    from pep_model import CheckpointError
    from pipeline.inference import InferenceError
    from pipeline.predict import predict_images, read_category_file, resolve_model_source

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        cli.quiet_library_logs()
    with tempfile.TemporaryDirectory(prefix="pep-model-") as download_dir:
        try:
            checkpoint, categories = resolve_model_source(
                args.model, args.tracking_uri, dst_dir=download_dir
            )
            image_ids = None
            if args.categories:
                categories, image_ids = read_category_file(args.categories)
            records = predict_images(
                args.inputs,
                checkpoint,
                score_threshold=args.score_threshold,
                max_instances=args.max_instances,
                out_dir=args.out,
                categories=categories,
                use_gpu=args.use_gpu,
                image_ids=image_ids,
            )
        except (CheckpointError, InferenceError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    done = [r for r in records if "skipped" not in r]
    skipped = [r for r in records if "skipped" in r]
    print(
        f"\nmodel:     {args.model}\n"
        f"images:    {len(done)} predicted, {len(skipped)} skipped\n"
        f"instances: {sum(r['instances'] for r in done)} (score >= {args.score_threshold}, "
        f"at most {args.max_instances} per image)\n"
        f"written:   {Path(args.out).resolve()}/<stem>.json (COCO results) and <stem>.png "
        f"(overlays)"
    )
    for record in skipped:
        print(f"skipped:   {record['skipped']}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
