"""Register a run's PEP model in the MLflow registry; move @champion only when it wins.

    python jobs/promote_pep.py                                           # best run of `pep`
    python jobs/promote_pep.py --run-id 3f2a...                          # one run
    python jobs/promote_pep.py --experiment pep --metric segm/AP         # the best run
    python jobs/promote_pep.py --experiment pep-sweep --parent-run-id P  # best trial of a sweep
    python jobs/promote_pep.py --experiment pep --dry-run                # decide, change nothing

The candidate's model becomes a new version of `--model-name` (default `pep`), tagged with
the decision (`promotion.decision`, `promotion.reason`, `promotion.metric`, `promotion.value`,
`promotion.champion_value`, `data_fingerprint`, `source_run_id`, ...). The alias `champion`
moves to it only when its metric beats the champion's on the same evaluation set (equal
`data_fingerprint` run tags); the replaced champion gets `previous`. A candidate that loses
or is refused is registered all the same (an audit trail; aliases untouched). Serve the
winner with `mlflow.pyfunc.load_model("models:/pep@champion")` or
`jobs/predict_pep.py --model models:/pep@champion`.

Exit status: 0 a decision was made (promoted, first champion, already champion, or the
champion was kept because the candidate does not beat it); 2 bad input (no such run or
experiment, no logged model, metric or data fingerprint); 3 refused (the candidate and the
champion were evaluated on different data, or the champion's metric cannot be read).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python jobs/x.py`

from pipeline import cli  # noqa: E402

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-id", default=None, help="promote this run's model")
    source.add_argument(
        "--experiment",
        default=None,
        help="promote the best run of this MLflow experiment (default without --run-id: "
        f"{cli.DEFAULT_EXPERIMENT!r}, where jobs/train_pep.py logs)",
    )
    parser.add_argument(
        "--parent-run-id",
        default=None,
        help="with --experiment: only children of this run (a sweep or ablation parent)",
    )
    parser.add_argument(
        "--metric",
        default=cli.DEFAULT_METRIC,
        help="run metric to compare, as in the AP table (default: %(default)s)",
    )
    parser.add_argument(
        "--mode",
        choices=["max", "min"],
        default="max",
        help="max: higher is better (AP, the default); min: lower is better (a loss)",
    )
    parser.add_argument(
        "--model-name",
        default=cli.DEFAULT_MODEL_NAME,
        help="registered model name (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else <work-dir>/mlflow.db)",
    )
    parser.add_argument("--work-dir", default="work", help="where the default local store is")
    parser.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    return parser


def main(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from pipeline import registry, tracking

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.parent_run_id and not args.experiment:
        print("error: --parent-run-id needs --experiment", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.run_id is None and args.experiment is None:
        args.experiment = cli.DEFAULT_EXPERIMENT  # the best run of the default training
    uri = tracking.resolve_tracking_uri(args.tracking_uri, default_dir=args.work_dir)
    try:
        decision = registry.promote(
            uri,
            run_id=args.run_id,
            experiment=args.experiment,
            parent_run_id=args.parent_run_id,
            metric=args.metric,
            mode=args.mode,
            model_name=args.model_name,
            dry_run=args.dry_run,
        )
    except (registry.PromotionError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(decision.report())
    print(f"store:      {uri}")
    if decision.refused:
        print(f"error: promotion refused: {decision.reason}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
