"""Training throughput with 1 vs 2 Ray Train workers (same data, same global batch), one run.

    python benchmarks/bench_scaling.py [--images 64] [--epochs 3] [--global-batch 4]

Each configuration trains the tiny PEP on the same generated shards with one torch thread
per worker; throughput is images/s summed over workers, from the steady-state epochs
(epoch 1 onwards: epoch 0 includes start-up). Prints both, the ratio, and the measured
per-step time that the scaling estimate in BENCHMARKS.md is computed from.
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    return parser


def measure(shards: str, workers: int, args, storage: str) -> dict[str, float]:
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
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
        cfg, shards, storage_path=storage, name=f"scale-{workers}", num_workers=workers
    )
    wall = time.perf_counter() - start
    frame = run.result.metrics_dataframe
    steady = frame[frame["epoch"] >= 1]
    # rank 0 reports its own images/s; every worker processes the same share.
    per_worker = statistics.mean(steady["images_per_s"])
    step_s = statistics.mean(steady["epoch_time_s"] / steady["steps"])
    return {"images_per_s": per_worker * workers, "step_s": step_s, "wall_s": wall}


def main(args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per worker (inherited by Ray workers)
    # One logical CPU more than the cores: with 2 workers holding 1 CPU each on a 2-core
    # machine, Ray Data's read/decode tasks would get no CPU at all and training would wait
    # forever (measured: stuck in "backpressured: ResourceBudget").
    ray.init(num_cpus=os.cpu_count() + 1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
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
        results = {w: measure(str(shards), w, args, str(Path(tmp) / "runs")) for w in (1, 2)}
    print(
        f"machine: {os.cpu_count()} CPUs; {args.images} images of {args.size} px, "
        f"global batch {args.global_batch}, epochs {args.epochs} (steady state: epochs 1..)"
    )
    print(f"{'workers':>8} {'images/s':>10} {'s/step':>8} {'wall s':>8}")
    for w, r in results.items():
        print(f"{w:>8} {r['images_per_s']:>10.2f} {r['step_s']:>8.3f} {r['wall_s']:>8.1f}")
    ratio = results[2]["images_per_s"] / results[1]["images_per_s"]
    print(f"ratio 2 workers / 1 worker: {ratio:.2f}x (target >= 1.6)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
