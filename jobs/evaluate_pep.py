"""Evaluate a PEP checkpoint: Ray Data inference over shards, COCO mask/box AP (pycocotools).

    python jobs/evaluate_pep.py --checkpoint work/runs/pep/checkpoint.pt --data work/shards/val \
        [--max-dets 400] [--score-thresholds 0.05 0.1 0.2 0.3] [--num-replicas 2] \
        [--use-gpu auto] [--batch-size 4] [--out results.json]

`--data` is a shards folder (from jobs/prepare_coco.py) or a COCO annotation JSON with
`--images`, which is prepared on the fly (shards reused on re-runs). The ground truth is the
original annotation file named in the shards' manifest (or `--annotations`). The model
predicts once at the lowest `--score-thresholds` value with its output cap raised to
`--max-dets`, and every threshold is scored from those predictions. Exit status 2 on
unusable input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python jobs/x.py`

from pipeline import cli  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="PEP checkpoint file (.pt) or Ray Train checkpoint dir (local or s3://...), or "
        "MLflow model URI (models:/..., runs:/...)",
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ URIs"
    )
    parser.add_argument(
        "--data", required=True, help="shards folder, or a COCO annotation JSON (with --images)"
    )
    parser.add_argument("--images", default=None, help="image folder when --data is a JSON")
    parser.add_argument(
        "--annotations",
        default=None,
        help="ground-truth COCO JSON (default: the source named in the shards' manifest)",
    )
    parser.add_argument(
        "--prepare-dir",
        default=None,
        help="where to prepare shards for a JSON --data (default: work/eval_shards/<name>)",
    )
    parser.add_argument(
        "--max-dets",
        type=int,
        default=100,
        help="COCOeval maxDets and the model's output cap; raise it for crowded data "
        "(AP is reported at 100 and at this limit)",
    )
    parser.add_argument(
        "--score-thresholds",
        type=float,
        nargs="+",
        default=None,
        help="score thresholds to report AP at, from one prediction pass at the lowest",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="the model's score threshold (default: lowest --score-thresholds, else the "
        "checkpoint's)",
    )
    parser.add_argument("--max-instances", type=int, default=None, help="default: --max-dets")
    parser.add_argument("--num-replicas", type=int, default=1, help="model replicas (actors)")
    parser.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--use-gpu", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call")
    parser.add_argument(
        "--backend",
        choices=["auto", "pycocotools", "faster_coco_eval"],
        default="auto",
        help="COCOeval implementation (faster_coco_eval agrees to 1e-6; auto: when installed)",
    )
    parser.add_argument("--out", default=None, help="write the COCO results JSON here")
    parser.add_argument("--metrics-out", default=None, help="write the metrics JSON here")
    cli.add_verbose_flag(
        parser,
        "Ray's, Ray Data's and MLflow's own logs (a local Ray started by the job hides them)",
    )
    return parser


def resolve_checkpoint(value: str, tracking_uri: str | None = None) -> Path:
    """The local checkpoint file for `--checkpoint`: a file, a Ray Train checkpoint directory,
    or an MLflow model URI (`models:/name@alias`, `runs:/<id>/model`), downloaded."""
    from pipeline.predict import resolve_model_source

    checkpoint, _ = resolve_model_source(value, tracking_uri)
    return checkpoint


def resolve_shards(args: argparse.Namespace, checkpoint: Path) -> Path | str:
    """`--data` as a shards folder (or URI); a COCO JSON is prepared at the checkpoint's
    max_size."""
    from pep_model import read_checkpoint
    from pipeline import storage
    from pipeline.inference import InferenceError
    from pipeline.prepare import PrepareConfig, prepare

    if storage.is_uri(args.data):  # shards on cloud storage, read where they are
        return args.data
    data = Path(args.data)
    if data.is_dir():
        return data
    if data.suffix != ".json" or not data.is_file():
        raise InferenceError(f"{data}: neither a shards folder nor a COCO annotation JSON")
    if args.images is None:
        raise InferenceError(f"{data}: a COCO annotation JSON needs --images (its image folder)")
    max_size = read_checkpoint(checkpoint)["config"].get("data", {}).get("max_size")
    config = PrepareConfig(max_size=max_size) if max_size else PrepareConfig()
    out = Path(args.prepare_dir or Path("work") / "eval_shards" / data.parent.name)
    result = prepare(data, args.images, out, config)
    print(f"shards: {result.out_dir} ({'reused' if result.reused else 'built'})")
    if args.annotations is None:
        args.annotations = str(data)
    return result.out_dir


def main(args: argparse.Namespace) -> tuple[dict, dict]:
    from pipeline import cluster
    from pipeline.evaluate import (
        format_ap_table,
        format_recall_table,
        format_threshold_table,
        scalar_metrics,
    )
    from pipeline.inference import evaluate_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cluster.init_ray(quiet=not args.verbose)  # joins RAY_ADDRESS when set, else starts one
    checkpoint = resolve_checkpoint(args.checkpoint, args.tracking_uri)
    shards = resolve_shards(args, checkpoint)
    metrics, per_threshold = evaluate_checkpoint(
        str(checkpoint),
        shards,
        args.annotations,
        max_dets=args.max_dets,
        score_thresholds=args.score_thresholds,
        batch_size=args.batch_size,
        num_replicas=args.num_replicas,
        use_gpu=args.use_gpu,
        score_threshold=args.score_threshold,
        max_instances=args.max_instances,
        num_cpus_per_replica=args.num_cpus_per_replica,
        backend=args.backend,
        results_path=args.out,
    )
    print(f"\nCOCO AP (%) of {checkpoint} on {shards}:\n")
    print(format_ap_table(metrics))
    if format_recall_table(metrics):
        print("\nRecall (%) at mask IoU 0.5 by visibility:\n")
        print(format_recall_table(metrics))
    if per_threshold:
        print("\nAP (%) per score threshold (one prediction pass):\n")
        print(format_threshold_table(per_threshold))
    if args.metrics_out:
        Path(args.metrics_out).write_text(
            json.dumps(
                {
                    "checkpoint": str(checkpoint),
                    "shards": str(shards),
                    "metrics": scalar_metrics(metrics),
                    "per_threshold": {str(t): scalar_metrics(m) for t, m in per_threshold.items()},
                    "params": metrics["params"],
                    "pr_curve": metrics.get("pr_curve"),
                },
                indent=1,
            )
        )
        print(f"\nmetrics: {args.metrics_out}")
    if args.out:
        print(f"COCO results: {args.out}")
    return metrics, per_threshold


def run(args: argparse.Namespace) -> int:
    """`main` with unusable input reported as one line and exit status 2."""
    from pep_model import CheckpointError
    from pipeline.coco import CocoError
    from pipeline.evaluate import EvaluationError
    from pipeline.inference import InferenceError
    from pipeline.prepare import PrepareError

    try:
        main(args)
    except (
        CheckpointError,
        CocoError,
        EvaluationError,
        InferenceError,
        PrepareError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
