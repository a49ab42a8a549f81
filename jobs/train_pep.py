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

from pipeline import cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    cli.add_config_flags(parser, cli.project_config("tiny.yaml"))
    cli.add_data_flag(parser)
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers")
    parser.add_argument("--name", default=None, help="run name (default: pep-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the run --name")
    cli.add_verbose_flag(
        parser,
        "Ray's, Ray Train/Data's and MLflow's own logs and progress bars (a local Ray started "
        "by the job hides them; one line per epoch is printed either way)",
    )
    cli.add_run_flags(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from pep_model import ConfigError, load_config
    from pipeline import experiment
    from pipeline.train import RunExistsError

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
            quiet=not args.verbose,
        )
    except (RunExistsError, experiment.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
