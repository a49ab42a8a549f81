"""Ray Tune sweep of PEP's loss weights (alpha..delta, Eq. 8) and score threshold, in MLflow.

With no arguments: a small sweep on the embedded default (generated crowded scenes,
configs/tiny.yaml with a reduced budget, see DEMO_OVERRIDES) on a local Ray instance, about
15 minutes on a 2-core CPU. On a cluster:

    ray job submit --working-dir . -- python jobs/sweep_pep.py --config configs/coco_r50_1x.yaml \
        --data /shared/coco-shards --storage-path s3://bucket/sweeps --name coco-weights \
        --tracking-uri http://mlflow:5000 --num-samples 32 --workers-per-trial 4 --use-gpu true
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import cli

DEFAULT_CONFIG = cli.project_config("tiny.yaml")
# The no-argument demo: configs/tiny.yaml on fewer, smaller images and fewer epochs, so that
# 5 trials (ASHA stops the weak ones early) fit in about 15 minutes on 2 CPU cores.
DEMO_OVERRIDES = [
    "data.generated_images=100",
    "data.generated_size=128",
    "data.max_size=128",
    "data.train_size=[128]",
    "train.epochs=4",
    "train.milestones=[3]",
    "train.warmup_iters=10",
    "eval.every_epochs=2",
    "train.cpus_per_worker=1",  # two 1-core trials side by side (as measured), not one 2-core
]


def _range(text: str) -> tuple[str, tuple[float, float]]:
    """`alpha=0.25:4` -> ("alpha", (0.25, 4.0))."""
    try:
        name, bounds = text.split("=", 1)
        low, high = (float(v) for v in bounds.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--range {text!r}: expected NAME=LOW:HIGH, e.g. alpha=0.25:4"
        ) from None
    if name not in cli.LOSS_WEIGHTS:
        raise argparse.ArgumentTypeError(
            f"--range {text!r}: {name!r} is not a loss weight ({', '.join(cli.LOSS_WEIGHTS)})"
        )
    if not 0 < low < high:
        raise argparse.ArgumentTypeError(
            f"--range {text!r}: a log-uniform range needs 0 < LOW < HIGH"
        )
    return name, (low, high)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    cli.add_config_flags(
        parser,
        None,
        config_help="YAML config (default: configs/tiny.yaml with the demo budget "
        f"{' '.join(DEMO_OVERRIDES)})",
        set_help="override a config value (repeatable); the candidate score thresholds are "
        "eval.score_thresholds, e.g. --set 'eval.score_thresholds=[0.05,0.2,0.4]'",
    )
    parser.add_argument(
        "--range",
        dest="ranges",
        type=_range,
        action="append",
        default=[],
        metavar="NAME=LOW:HIGH",
        help="log-uniform range of a loss weight (alpha, beta, gamma, delta); default "
        f"{cli.DEFAULT_WEIGHT_RANGE[0]:g}:{cli.DEFAULT_WEIGHT_RANGE[1]:g} for each (repeatable)",
    )
    cli.add_data_flag(parser)
    parser.add_argument("--num-samples", type=int, default=5, help="trials to run")
    parser.add_argument(
        "--workers-per-trial", type=int, default=None, help="Ray Train workers per trial"
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: as many as the cluster's CPUs/GPUs fit)",
    )
    parser.add_argument(
        "--no-early-stop",
        action="store_true",
        help="run every trial to the end (default: ASHA stops weak trials between epochs)",
    )
    parser.add_argument(
        "--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped"
    )
    parser.add_argument(
        "--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/N of trials per rung"
    )
    parser.add_argument(
        "--no-model", action="store_true", help="do not log a model with every trial's run"
    )
    cli.add_verbose_flag(
        parser,
        "Ray's, Tune's (status tables), Ray Train/Data's and MLflow's own logs (a local Ray "
        "started by the job hides them; one line per ended trial is printed either way)",
    )
    parser.add_argument("--name", default="pep-sweep", help="sweep name")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep --name (unfinished and errored trials; with its saved settings)",
    )
    cli.add_run_flags(
        parser,
        storage_help="where the Tune experiment and the trials' checkpoints go: a local dir "
        "(default ./work/sweeps) or a shared / cloud URI for multi-node clusters",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    from pep_model import ConfigError, load_config
    from pipeline import experiment, sweep

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = args.overrides if args.config else DEMO_OVERRIDES + args.overrides
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = sweep.run_sweep(
            cfg,
            data=args.data,
            work_dir=args.work_dir,
            storage_path=args.storage_path,
            name=args.name,
            resume=args.resume,
            ranges=dict(args.ranges),
            num_samples=args.num_samples,
            workers_per_trial=args.workers_per_trial,
            max_concurrent=args.max_concurrent,
            use_gpu=args.use_gpu,
            tracking_uri=args.tracking_uri,
            experiment_name=args.experiment,
            early_stop=not args.no_early_stop,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            log_model=not args.no_model,
            quiet=not args.verbose,
        )
    except (sweep.SweepExistsError, sweep.SweepNotFoundError, experiment.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0 if summary.best is not None else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
