"""Serving on loopback: the Ray Serve app (`pipeline.serve`) against `mlflow models serve` of
the same logged model, at concurrency 1, 4 and 16.

    python benchmarks/bench_serve.py [--model SOURCE --tracking-uri URI] [--images 16]
        [--requests 48] [--concurrency 1 4 16] [--replicas 2] [--num-cpus 1]
        [--max-batch-size 8] [--mlflow-workers 1] [--serve-url URL]

The images are the first `--images` nuclei val images (sorted names; ../shared/data/nuclei,
JPEGs of 256 x 256 to 1272 x 603 px), sent in turn. Each side gets `--requests` timed
requests per concurrency level (after a warm-up pass over the images), from that many client
threads on this machine. Both servers are up for the whole run and measured in turn, level by
level (an idle server takes no CPU to speak of), so that a change in the machine's load
during the run falls on both sides. Ray Serve gets the raw JPEG bytes at `/predict`; MLflow gets
what its scoring server takes, a `dataframe_split` JSON with the image base64-encoded, at
`/invocations`; both with the same `params` (score_threshold, max_instances). The warm-up
pass checks that both answer the same number of instances per image.

Without `--model`, a random-init model of `configs/nuclei.yaml`'s architecture is logged in
a temporary SQLite store. Its scores are all ~0.01, so `--score-threshold 0` makes each image
send its `pre_topk` (1000) best pixels through the mask head and `--max-instances 100` keeps
100 instances to encode: a heavy case, where most of an image's time goes to per-candidate
work that a batch does not share (only the backbone, FPN and heads run batched).
`--serve-url` measures a Ray Serve app that already runs (the tests do) instead of starting
one. Prints p50/p99 latency and images/s per side and level, and the ratios.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "nuclei" / "val" / "images"
APP_NAME = "pep-bench"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model source (default: random init)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of --model")
    parser.add_argument("--data", default=str(DEFAULT_IMAGES), help="folder of JPEG images")
    parser.add_argument("--images", type=int, default=16, help="first N images (sorted)")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--score-threshold", type=float, default=0.0)
    parser.add_argument("--max-instances", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs (threads) per replica")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--mlflow-workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--serve-url", default=None, help="a running Ray Serve app to measure")
    parser.add_argument("--skip-mlflow", action="store_true", help="measure Ray Serve only")
    parser.add_argument("--work", default=None, help="folder for the generated model's store")
    return parser


# ----------------------------------------------------------------------------- the model


def random_model(work: Path) -> tuple[str, str]:
    """(model URI, tracking URI): configs/nuclei.yaml's architecture, random init, logged."""
    import mlflow
    import torch

    from pep_model import build_model, load_config, save_checkpoint
    from pipeline import tracking

    config = load_config(ROOT / "configs" / "nuclei.yaml", ["model.num_classes=1"])
    torch.manual_seed(0)
    checkpoint = work / "pep.pt"
    save_checkpoint(checkpoint, build_model(config.model), config)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    tracking.set_experiment("bench-serve", uri)
    with mlflow.start_run():
        info = tracking.log_pep_model(checkpoint, {1: "nucleus"})
    return info.model_uri, uri


# ----------------------------------------------------------------------------- load


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_load(send, images: list[bytes], requests_n: int, concurrency: int) -> dict:
    """`requests_n` calls of send(session, image) from `concurrency` threads; latencies."""
    local = threading.local()
    latencies: list[float] = []
    failures: list[str] = []

    def one(index: int) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        try:
            send(local.session, images[index % len(images)])
            latencies.append(time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - counted and shown
            failures.append(str(e)[:200])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {
        "concurrency": concurrency,
        "requests": requests_n,
        "failed": len(failures),
        "images_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "errors": failures[:3],
    }


def serve_sender(url: str, params: dict):
    def send(session: requests.Session, image: bytes) -> int:
        r = session.post(f"{url}/predict", params=params, data=image,
                         headers={"Content-Type": "image/jpeg"}, timeout=120)  # fmt: skip
        r.raise_for_status()
        return len(r.json())

    return send


def mlflow_sender(url: str, params: dict):
    def send(session: requests.Session, image: bytes) -> int:
        payload = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]},
            "params": params,
        }
        r = session.post(f"{url}/invocations", data=json.dumps(payload),
                         headers={"Content-Type": "application/json"}, timeout=120)  # fmt: skip
        r.raise_for_status()
        return len(r.json()["predictions"])

    return send


def warm_up(send, images: list[bytes]) -> list[int]:
    """One pass over the images: instances per image (the two servers must agree)."""
    session = requests.Session()
    return [send(session, image) for image in images]


# ----------------------------------------------------------------------------- servers


@contextlib.contextmanager
def ray_serve_app(model: str, tracking_uri: str | None, args, params):
    """A sender to the Ray Serve app (`--serve-url`, else one started on a new local Ray)."""
    if args.serve_url:
        yield serve_sender(args.serve_url.rstrip("/"), params)
        return
    import ray
    from ray import serve

    from pipeline.serve import ServeOptions, build_app

    options = ServeOptions(
        model=model,
        tracking_uri=tracking_uri,
        use_gpu="false",
        num_cpus=args.num_cpus,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=max(2 * args.max_batch_size, max(args.concurrency)),
        max_queued_requests=4 * max(args.concurrency),
        min_replicas=args.replicas,
        max_replicas=args.replicas,
    )
    port = _free_port()
    ray.init(num_cpus=max(os.cpu_count() or 2, int(args.num_cpus * args.replicas)),
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        yield serve_sender(f"http://127.0.0.1:{port}", params)
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def mlflow_models_serve(model: str, tracking_uri: str | None, args, params):
    """A sender to `mlflow models serve -m MODEL --env-manager local` on a free port."""
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # MLflow starts `uvicorn` through the shell
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
               "-w", str(args.mlflow_workers)]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlflow models serve did not start:\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield mlflow_sender(url, params)
        finally:
            process.terminate()
            process.wait(timeout=30)


# ----------------------------------------------------------------------------- report


def report(sides: dict[str, list[dict]], args: argparse.Namespace, n_images: int) -> str:
    lines = [
        f"{n_images} images of {args.data}, {args.requests} requests per level, params "
        f"score_threshold={args.score_threshold} max_instances={args.max_instances}; "
        f"Ray Serve: {args.replicas} replica(s) x {args.num_cpus:g} CPU(s), max_batch_size "
        f"{args.max_batch_size}, wait {args.batch_wait_timeout_s} s; mlflow models serve: "
        f"{args.mlflow_workers} worker(s); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "",
        "| server | concurrency | images/s | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in sides.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} "
                f"| {r['p99_ms']:.0f} | {r['failed']} |"
            )
    if len(sides) == 2:
        (_, serve_rows), (_, mlflow_rows) = sides.items()
        lines += ["", "| concurrency | throughput Ray Serve / MLflow | p99 Ray Serve / MLflow |",
                  "|---|---|---|"]  # fmt: skip
        for s, m in zip(serve_rows, mlflow_rows):
            lines.append(
                f"| {s['concurrency']} | {s['images_per_s'] / m['images_per_s']:.2f}x "
                f"| {s['p99_ms'] / m['p99_ms']:.2f}x |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    files = sorted(Path(args.data).glob("*.jpg"))[: args.images]
    if not files:
        raise SystemExit(f"no JPEG images in {args.data}")
    images = [f.read_bytes() for f in files]
    params = {"score_threshold": args.score_threshold, "max_instances": args.max_instances}
    servers = {"Ray Serve": ray_serve_app}
    if not args.skip_mlflow:
        servers["mlflow models serve"] = mlflow_models_serve
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, contextlib.ExitStack() as up:
        model, tracking_uri = args.model, args.tracking_uri
        if model is None:
            model, tracking_uri = random_model(Path(args.work or tmp))
        # both up at once; each level measured on one, then on the other (alternating, so
        # that a change of the machine's load during the run falls on both sides)
        senders = {
            name: up.enter_context(start(model, tracking_uri, args, params))
            for name, start in servers.items()
        }
        counts = {name: warm_up(send, images) for name, send in senders.items()}
        sides: dict[str, list[dict]] = {name: [] for name in senders}
        for concurrency in args.concurrency:
            for name, send in senders.items():
                sides[name].append(run_load(send, images, args.requests, concurrency))
    agree = len({tuple(c) for c in counts.values()}) == 1
    print(report(sides, args, len(images)))
    print(f"\ninstances per image (warm-up pass): {counts['Ray Serve']}"
          f"{'; both servers agree' if agree else f'; DIFFER: {counts}'}")  # fmt: skip
    return {"sides": sides, "counts": counts, "agree": agree}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
