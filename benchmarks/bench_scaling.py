"""Training throughput with 1 vs 2 Ray Train workers (same data, same global batch), one run.

    python benchmarks/bench_scaling.py [--images 64] [--size 128] [--epochs 3] [--global-batch 4]

Each configuration trains the tiny PEP on the same generated shards: 1 worker x 1 torch
thread, 2 workers x 1 thread each (DDP over gloo), and 1 worker x 2 threads
(`train.cpus_per_worker=2`, the other way to use two cores). Throughput is images/s summed
over workers, from the steady-state epochs (epoch 1 onwards: epoch 0 includes start-up).
Prints all three, the ratios, the measured per-step time that the scaling estimate in
BENCHMARKS.md is computed from, and the time workers waited for data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from pep_model import load_config
from pipeline.prepare import PrepareConfig, prepare
from pipeline.synth import make_dataset
from pipeline.train import run_training

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ((1, 1), (2, 1), (1, 2))  # (workers, torch threads per worker)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    return parser


def measure(shards: str, workers: int, threads: int, args, storage: str) -> dict[str, float]:
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"train.cpus_per_worker={threads}",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.global_batch // workers}",
            f"data.train_size=[{args.size}]",
            "train.milestones=[1000]",
            "train.warmup_iters=5",
            "train.max_failures=0",
        ],
    )
    start = time.perf_counter()
    run = run_training(
        cfg, shards, storage_path=storage, name=f"scale-{workers}x{threads}", num_workers=workers
    )
    wall = time.perf_counter() - start
    frame = run.result.metrics_dataframe
    steady = frame[frame["epoch"] >= 1]
    # rank 0 reports its own images/s; every worker processes the same share.
    per_worker = statistics.mean(steady["images_per_s"])
    step_s = statistics.mean(steady["epoch_time_s"] / steady["steps"])
    wait = statistics.mean(steady["data_wait_s"] / steady["epoch_time_s"])
    return {
        "images_per_s": per_worker * workers,
        "step_s": step_s,
        "wall_s": wall,
        "data_wait": wait,
    }


def main(args: argparse.Namespace) -> None:
    # One logical CPU more than the cores: with 2 workers holding 1 CPU each on a 2-core
    # machine, Ray Data's read/decode tasks would get no CPU at all and training would wait
    # forever (measured: stuck in "backpressured: ResourceBudget"). Each worker sets its
    # torch threads to its train.cpus_per_worker.
    ray.init(num_cpus=os.cpu_count() + 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, images=args.images, size=args.size, seed=0, val_fraction=0.0)
        shards = Path(tmp) / "shards"
        prepare(
            data / "train" / "annotations.json",
            data / "train" / "images",
            shards,
            PrepareConfig(max_size=args.size),
        )
        runs = str(Path(tmp) / "runs")
        results = {(w, t): measure(str(shards), w, t, args, runs) for w, t in SETUPS}
    print(
        f"machine: {os.cpu_count()} CPUs; {args.images} images of {args.size} px, "
        f"global batch {args.global_batch}, epochs {args.epochs} (steady state: epochs 1..)"
    )
    print(
        f"{'workers x threads':>18} {'images/s':>10} {'s/step':>8} {'data wait':>10} {'wall s':>8}"
    )
    for (w, t), r in results.items():
        print(
            f"{f'{w} x {t}':>18} {r['images_per_s']:>10.2f} {r['step_s']:>8.3f} "
            f"{r['data_wait']:>9.0%} {r['wall_s']:>8.1f}"
        )
    base = results[(1, 1)]["images_per_s"]
    print(
        f"ratio 2 workers / 1 worker: {results[(2, 1)]['images_per_s'] / base:.2f}x (target >= 1.6)"
    )
    print(f"ratio 1 worker x 2 threads / 1 x 1: {results[(1, 2)]['images_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
