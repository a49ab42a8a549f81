"""Serve a PEP model over HTTP with Ray Serve; with an alias URI, follow the MLflow registry.

    python jobs/serve_pep.py                                   # models:/pep@champion, port 8000
    python jobs/serve_pep.py --model models:/pep/3 --port 8080 --tracking-uri http://mlflow:5000
    python jobs/serve_pep.py --model work/runs/pep/checkpoint_epoch_0009 --max-replicas 4
    curl -s --data-binary @image.jpg -H 'Content-Type: image/jpeg' localhost:8000/predict

`--model` is a registry alias (`models:/<name>@<alias>`, the default `models:/pep@champion`:
the replicas look the alias up every `--poll-interval-s` and switch to its new version
without dropping requests; a version that fails to load leaves the old one serving, as
`GET /model` says), a version (`models:/pep/3`), a run's model (`runs:/<id>/model`), or a
checkpoint file or Ray Train checkpoint directory (local or s3://). The same application
runs with `serve run pipeline.serve:app_builder model=...` or a `serve deploy` config.

Endpoints: `POST /predict` (image bytes or multipart; `?score_threshold=&max_instances=`,
`&format=png` for the overlay), `GET /healthz`, `GET /model`, `GET /` (a page to try it).
The job deploys the app on the Ray instance of RAY_ADDRESS (else a new local one), prints the
URLs and keeps serving until Ctrl-C (`--detach`: leave it running on the cluster and exit).
Exit status 2 when the model source cannot be served (unknown model, alias or file).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python jobs/x.py`

from pipeline import cli  # noqa: E402

APP_NAME = "pep"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument(
        "--model",
        default="models:/pep@champion",
        metavar="SOURCE",
        help="MLflow URI (models:/<name>@<alias> is followed as it moves; models:/<name>/<n>, "
        "runs:/<id>/model) or checkpoint file/dir, local or s3:// (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else work/mlflow.db)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument(
        "--use-gpu",
        choices=["auto", "true", "false"],
        default="auto",
        help="one GPU per replica (auto: when the cluster has GPUs)",
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=1.0,
        help="CPUs (and torch threads) per replica (default: %(default)s)",
    )
    batching = parser.add_argument_group("batching and backpressure")
    batching.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="images per forward pass at most (default: %(default)s)",
    )
    batching.add_argument(
        "--batch-wait-timeout-s",
        type=float,
        default=0.01,
        help="how long a batch waits to fill (default: %(default)s)",
    )
    batching.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=16,
        help="requests a replica holds at once (default: %(default)s)",
    )
    batching.add_argument(
        "--max-queued-requests",
        type=int,
        default=64,
        help="requests waiting for a replica; beyond: 503 (default: %(default)s)",
    )
    batching.add_argument(
        "--max-image-pixels",
        type=int,
        default=40_000_000,
        help="larger images are refused with 413 (default: %(default)s)",
    )
    scaling = parser.add_argument_group("replicas")
    scaling.add_argument("--min-replicas", type=int, default=1)
    scaling.add_argument(
        "--max-replicas",
        type=int,
        default=1,
        help="above --min-replicas: autoscaling between the two",
    )
    scaling.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=8.0,
        help="autoscaling target per replica (default: %(default)s)",
    )
    parser.add_argument(
        "--poll-interval-s",
        type=float,
        default=10.0,
        help="registry alias look-up period (default: %(default)s)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="deploy and exit; the app keeps running on the Ray cluster",
    )
    cli.add_verbose_flag(parser, "MLflow's own logs")
    return parser


def options_from_args(args: argparse.Namespace):
    from pipeline.serve import ServeOptions

    return ServeOptions(
        model=args.model,
        tracking_uri=args.tracking_uri,
        use_gpu=args.use_gpu,
        num_cpus=args.num_cpus,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        poll_interval_s=args.poll_interval_s,
        max_image_pixels=args.max_image_pixels,
    )


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipeline.inference import InferenceError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        cli.quiet_library_logs()
    from pipeline.serve import build_app

    try:
        app = build_app(options_from_args(args))  # checks the model source before Ray starts
    except (InferenceError, ValidationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # a replica could not start (e.g. a checkpoint on S3 missing)
        print(f"error: the application did not start: {e}", file=sys.stderr)
        serve.delete(APP_NAME)
        return 2
    url = f"http://{args.host}:{args.port}"
    print(
        f"\nserving {args.model} at {url}/ (page), {url}/predict, {url}/model, {url}/healthz\n"
        f"try:     curl -s --data-binary @image.jpg -H 'Content-Type: image/jpeg' "
        f"'{url}/predict?score_threshold=0.3'"
    )
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
