"""Train PEP with Ray Train, evaluate COCO AP, track in MLflow.

With no arguments: the embedded default (generated crowded scenes, configs/tiny.yaml, a
local Ray instance, a local MLflow store under ./work). On a cluster:

    ray job submit --working-dir . -- python jobs/train_pep.py --config configs/coco_r50_1x.yaml \
        --data /shared/coco-shards --storage-path s3://bucket/runs --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import argparse
import logging
import sys

from pep_model import ConfigError, load_config
from pipeline import experiment
from pipeline.train import RunExistsError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.02 (repeatable)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="shards root (train/ and val/ shard folders) or a COCO folder with "
        "train/annotations.json + train/images and val/...; default: generated crowded scenes",
    )
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers")
    parser.add_argument("--use-gpu", choices=["auto", "true", "false"], default=None)
    parser.add_argument(
        "--storage-path",
        default=None,
        help="where runs and checkpoints go: a local dir (default ./work/runs) or a shared / "
        "cloud URI for multi-node clusters",
    )
    parser.add_argument("--name", default=None, help="run name (default: pep-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run --name")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--experiment", default="pep", help="MLflow experiment name")
    parser.add_argument("--work-dir", default="work", help="local folder for data/shards/stores")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = experiment.train_and_evaluate(
            cfg,
            data=args.data,
            work_dir=args.work_dir,
            storage_path=args.storage_path,
            name=args.name,
            resume=args.resume,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            tracking_uri=args.tracking_uri,
            experiment_name=args.experiment,
        )
    except (RunExistsError, experiment.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
