"""The paper's Table 2: train and evaluate Baseline, +excavating, +purifying and PEP.

Every variant x seed trains with the same data, config and schedule (only model.excavate,
model.purify and train.seed differ), as Ray tasks side by side as far as resources allow.
MLflow gets a parent run (table `ablation.md`, numbers `ablation.json`) with one child run
per variant x seed. With no arguments: the generated crowded scenes and
configs/ablation_tiny.yaml (~15 minutes on a 2-core CPU, two runs at a time). On a cluster:

    ray job submit --working-dir . -- python jobs/ablation_pep.py \
        --config configs/coco_r50_1x.yaml --seeds 1 2 3 --data /shared/coco-shards \
        --storage-path s3://bucket/runs --tracking-uri http://mlflow:5000 --use-gpu true
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    cli.add_config_flags(
        parser,
        cli.project_config("ablation_tiny.yaml"),
        set_help="override a config value for all variants, e.g. --set train.epochs=4 (repeatable)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="train.seed values, one run each"
    )
    cli.add_data_flag(parser)
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers per run")
    parser.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="runs side by side (default: as many as the cluster's CPUs/GPUs hold; a local "
        "Ray started by the job holds one run per --num-workers cores, e.g. 2 on 2 cores)",
    )
    parser.add_argument(
        "--name", default=None, help="ablation name; runs are <name>-<variant>-s<seed>"
    )
    cli.add_run_flags(parser, experiment="pep-ablation")
    parser.add_argument(
        "--log-models", action="store_true", help="also log each run's model to MLflow"
    )
    parser.add_argument(
        "--overlays", type=int, default=4, help="overlay PNGs logged per run (0: none)"
    )
    cli.add_verbose_flag(
        parser,
        "Ray's, Ray Train/Data's and MLflow's own logs (a local Ray started by the job hides "
        "them; a line per started and finished run is printed either way)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    from pep_model import ConfigError, load_config
    from pipeline import ablation, experiment
    from pipeline.train import RunExistsError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ablation.check_overrides(args.overrides)
        cfg = load_config(args.config, args.overrides)
        result = ablation.run_ablation(
            cfg,
            seeds=args.seeds,
            data=args.data,
            work_dir=args.work_dir,
            storage_path=args.storage_path,
            name=args.name,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            tracking_uri=args.tracking_uri,
            experiment_name=args.experiment,
            max_parallel=args.max_parallel,
            log_model=args.log_models,
            overlays=args.overlays,
            quiet=not args.verbose,
        )
    except (ConfigError, ablation.AblationError, experiment.DataError, RunExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(result.table())
    print()
    print(f"MLflow parent run: {result.parent_run_id} ({result.name}, table: ablation.md)")
    print(f"took:              {result.wall_seconds:.0f} s, {result.max_parallel} run(s) at a time")
    print(f"look:              mlflow ui --backend-store-uri {result.tracking_uri}")
    if result.failed:
        print(f"error: {len(result.failed)} run(s) failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
