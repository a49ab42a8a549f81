"""Training throughput with 1 vs 2 Ray Train workers (same data, same global batch), one run.

    python benchmarks/bench_scaling.py [--images 64] [--size 128] [--epochs 3] [--global-batch 4]

Each configuration trains the tiny PEP on the same generated shards: 1 worker x 1 torch
thread, 2 workers x 1 thread each (DDP over gloo), and 1 worker x 2 threads
(`train.cpus_per_worker=2`, the other way to use two cores). Throughput is images/s summed
over workers, from the steady-state epochs (epoch 1 onwards: epoch 0 includes start-up).
Prints all three, the ratios, the measured per-step time that the scaling estimate in
BENCHMARKS.md is computed from, and the time workers waited for data.

It also accounts for the machine's CPU over the steady-state window (from the end of epoch 0
to the end of the last epoch: when each epoch's checkpoint directory appears): a sampler reads
every process's CPU time once a second and groups processes by Ray's process titles into
training workers, the data path (Ray Data's SplitCoordinator and decode tasks), the rest of
Ray, and others. Throughput per core the training workers actually got separates the cost of
data parallelism itself from the cores that other processes take on a small machine.

The same three setups also run without Ray, as plain PyTorch processes on pre-decoded batches
(`train_one_epoch` over a list): 1 process x 1 thread, 2 processes x 1 thread at the same
time, each on half of the batches with half the batch size (data parallelism without the
all-reduce), the same two processes as PyTorch DDP over gloo (`find_unused_parameters`, as
the Ray Train workers run it), and 1 process x 2 threads. That is what this machine gives the
model itself, with and without the gradient all-reduce.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from pep_model import build_model, load_config
from pipeline import reader
from pipeline.prepare import PrepareConfig, prepare
from pipeline.synth import make_dataset
from pipeline.train import build_lr_scheduler, build_optimizer, run_training, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ((1, 1), (2, 1), (1, 2))  # (workers, torch threads per worker)
PLAIN_SETUPS = ((1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False))  # (..., DDP)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--out", help="also write the measurements to this JSON file")
    parser.add_argument(
        "--plain-worker",
        nargs=6,
        metavar=("SHARDS", "WORKERS", "THREADS", "DDP", "RANK", "READY_DIR"),
        help=argparse.SUPPRESS,  # internal: one plain-PyTorch process of the reference runs
    )
    return parser


def bench_config(workers: int, threads: int, args):
    return load_config(
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


def process_title(process: psutil.Process) -> str:
    """A short name: Ray's title for its workers (`ray::RayTrainWorker`,
    `ray::SplitCoordinator`, `ray::IDLE`, ...), else the program or script name."""
    if process.pid == os.getpid():
        return "driver"
    args = [arg for arg in process.cmdline() if arg]
    if not args:
        return process.name()
    if args[0].startswith("ray::"):
        return args[0].split(".")[0] if "(" not in args[0] else args[0]
    script = next((arg for arg in args[1:] if arg.endswith(".py")), args[0])
    return os.path.basename(script)


def process_group(title: str) -> str:
    """train workers, data path (Ray Data's coordinator and decode tasks), other Ray, other."""
    if title == "driver":
        return title
    if "RayTrainWorker" in title:
        return "train workers"
    if any(key in title for key in ("SplitCoordinator", "MapBatches", "ReadParquet", "::IDLE")):
        return "data path"  # idle Ray task workers are where the decode tasks ran
    ray_programs = ("raylet", "gcs_server", "dashboard.py", "monitor.py", "log_monitor.py")
    if title.startswith("ray::") or title in ray_programs:
        return "other Ray"
    return "other"


class CpuSampler(threading.Thread):
    """Every process's cumulative CPU seconds, once per `interval`, with wall times; and when
    each directory matching `watch` (a glob) first appeared."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self.appeared: dict[str, float] = {}
        self.watch: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            now = time.time()
            if self.watch:  # the run keeps only its last checkpoints: note them as they come
                for path in glob.glob(self.watch):
                    self.appeared.setdefault(path, now)
            snapshot = {}
            for process in psutil.process_iter():
                try:
                    times = process.cpu_times()
                    snapshot[process.pid] = (process_title(process), times.user + times.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.samples.append((now, snapshot))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def cores(self, start: float, end: float, by=process_group) -> dict[str, float]:
        """Mean cores used between two wall times, per `by(title)` (a process counts under
        its last title: Ray's task workers change title as they run), plus `idle`."""
        before = [snap for t, snap in self.samples if t <= start]
        inside = [snap for t, snap in self.samples if start < t <= end]
        if not before or not inside:
            raise RuntimeError("the CPU sampler has no samples around the steady-state window")
        base = before[-1]
        last: dict[int, tuple[str, float]] = {}
        for snap in inside:  # a process that exits inside the window keeps its last reading
            last.update(snap)
        span = end - start
        used: dict[str, float] = collections.defaultdict(float)
        for pid, (title, cpu) in last.items():
            used[by(title)] += cpu - (base[pid][1] if pid in base else 0.0)
        result = {name: seconds / span for name, seconds in used.items()}
        result["idle"] = max(0.0, (os.cpu_count() or 1) - sum(result.values()))
        return result


def measure(
    shards: str, workers: int, threads: int, args, storage: str, sampler: CpuSampler
) -> dict[str, float]:
    cfg = bench_config(workers, threads, args)
    name = f"scale-{workers}x{threads}"
    run_dir = Path(storage) / name
    sampler.watch = str(run_dir / "checkpoint_epoch_*")
    start = time.perf_counter()
    run = run_training(cfg, shards, storage_path=storage, name=name, num_workers=workers)
    wall = time.perf_counter() - start
    # Epoch k ends when its checkpoint directory appears: the steady window is epochs 1..
    window = (
        sampler.appeared[str(run_dir / "checkpoint_epoch_0000")],
        sampler.appeared[str(run_dir / f"checkpoint_epoch_{args.epochs - 1:04d}")],
    )
    cores = sampler.cores(*window)
    by_title = sampler.cores(*window, by=lambda title: title)
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
        # rank 0's own CPU accounting (its process time / epoch time), times the workers
        "worker_cores": statistics.mean(steady["cpu_cores"]) * workers,
        **{f"cores/{group}": value for group, value in cores.items()},
        "top": sorted(by_title.items(), key=lambda kv: -kv[1])[:8],
    }


def plain_worker(args) -> None:
    """One process of the no-Ray reference: decode first, then time `args.epochs - 1` passes
    over this rank's batches; prints its metrics as JSON."""
    shards, workers, threads, ddp, rank, ready_dir = args.plain_worker
    workers, threads, ddp, rank = int(workers), int(threads), ddp == "ddp", int(rank)
    torch.set_num_threads(threads)
    torch.manual_seed(rank)
    cfg = bench_config(workers, threads, args)
    model = build_model(cfg.model)
    if ddp:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{ready_dir}/rendezvous", rank=rank, world_size=workers
        )
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, 1000)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = list(reader.local_batches(shards, cfg.data, cfg.train.batch_size, augment=True))
    batches = batches[rank::workers]
    cpu = torch.device("cpu")
    train_one_epoch(model, optimizer, scheduler, batches[:2], cpu, cfg, scaler)  # warm-up
    # start timing together: every process has built its model and decoded its batches
    Path(ready_dir, f"ready{rank}").touch()
    while sum(name.startswith("ready") for name in os.listdir(ready_dir)) < workers:
        time.sleep(0.05)
    epochs = [
        train_one_epoch(model, optimizer, scheduler, batches, cpu, cfg, scaler)
        for _ in range(max(1, args.epochs - 1))
    ]
    print(json.dumps({key: statistics.mean(e[key] for e in epochs) for key in epochs[0]}))
    if ddp:
        torch.distributed.destroy_process_group()


def measure_plain(
    shards: str, workers: int, threads: int, ddp: bool, args, tmp: str
) -> dict[str, float]:
    ready = tempfile.mkdtemp(dir=tmp)
    command = [sys.executable, __file__, "--images", str(args.images), "--size", str(args.size)]
    command += ["--epochs", str(args.epochs), "--global-batch", str(args.global_batch)]
    processes = [
        subprocess.Popen(
            [
                *command,
                "--plain-worker",
                *(shards, str(workers), str(threads), "ddp" if ddp else "-", str(rank), ready),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(workers)
    ]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a plain reference process failed: {outputs}")
    metrics = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    # like a synchronous data-parallel step, the slowest process sets the pace
    slowest = max(m["epoch_time_s"] for m in metrics)
    images = sum(m["images_per_s"] * m["epoch_time_s"] for m in metrics)
    return {
        "images_per_s": images / slowest,
        "step_s": slowest / metrics[0]["steps"],
        "cores": sum(m["cpu_cores"] for m in metrics),
    }


def main(args: argparse.Namespace) -> None:
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
        ray.shutdown()  # `prepare` started one; the plain runs get the machine to themselves
        plain = {
            (w, t, ddp): measure_plain(str(shards), w, t, ddp, args, tmp)
            for w, t, ddp in PLAIN_SETUPS
        }
        # One logical CPU more than the cores: with 2 workers holding 1 CPU each on a 2-core
        # machine, Ray Data's read/decode tasks would get no CPU at all and training would wait
        # forever (measured: stuck in "backpressured: ResourceBudget"). Each worker sets its
        # torch threads to its train.cpus_per_worker.
        ray.init(num_cpus=os.cpu_count() + 1)
        runs = str(Path(tmp) / "runs")
        sampler = CpuSampler()
        sampler.start()
        try:
            results = {(w, t): measure(str(shards), w, t, args, runs, sampler) for w, t in SETUPS}
        finally:
            sampler.stop()
    if args.out:
        rows = {"ray": list(results.items()), "plain": list(plain.items())}
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(report(args, results, plain, os.cpu_count() or 1))


def report(args, results: dict, plain: dict, cpus: int) -> str:
    """The benchmark's printout: Ray Train setups, their CPU split, the plain reference."""
    lines = [
        f"machine: {cpus} CPUs; {args.images} images of {args.size} px, global batch "
        f"{args.global_batch}, epochs {args.epochs} (steady state: epochs 1..)",
        f"{'workers x threads':>18} {'images/s':>10} {'s/step':>8} {'data wait':>10} {'wall s':>8}",
    ]
    for (w, t), r in results.items():
        lines.append(
            f"{f'{w} x {t}':>18} {r['images_per_s']:>10.2f} {r['step_s']:>8.3f} "
            f"{r['data_wait']:>9.0%} {r['wall_s']:>8.1f}"
        )
    base = results[1, 1]["images_per_s"]
    scaling = results[2, 1]["images_per_s"] / base
    lines.append(f"ratio 2 workers / 1 worker: {scaling:.2f}x (target >= 1.6)")
    lines.append(f"ratio 1 worker x 2 threads / 1 x 1: {results[1, 2]['images_per_s'] / base:.2f}x")

    groups = ("train workers", "data path", "other Ray", "driver", "other", "idle")
    lines.append(f"\nCPU over the steady-state window, cores of {cpus}:")
    lines.append(
        f"{'workers x threads':>18} " + " ".join(f"{g:>13}" for g in groups) + "  img/s/core"
    )
    per_core = {}
    for (w, t), r in results.items():
        per_core[w, t] = r["images_per_s"] / r["cores/train workers"]
        lines.append(
            f"{f'{w} x {t}':>18} "
            + " ".join(f"{r.get(f'cores/{g}', 0.0):>13.2f}" for g in groups)
            + f"  {per_core[w, t]:>10.2f}"
        )
        lines.append(f"{'':>18} (the workers' own accounting: {r['worker_cores']:.2f} cores)")
        lines.append(f"{'':>18} " + ", ".join(f"{name} {value:.2f}" for name, value in r["top"]))

    lines.append(
        "\nWithout Ray (plain PyTorch processes on pre-decoded batches; 2 x 1 = two processes "
        "at once, half the batches and half the batch each):"
    )
    lines.append(
        f"{'processes x threads':>20} {'images/s':>10} {'s/step':>8} {'cores':>6} "
        f"{'img/s/core':>11} {'vs 1 x 1':>9}"
    )
    plain_base = plain[1, 1, False]["images_per_s"]
    for (w, t, ddp), r in plain.items():
        label = f"{w} x {t}" + (" DDP" if ddp else (" no all-reduce" if w > 1 else ""))
        lines.append(
            f"{label:>20} {r['images_per_s']:>10.2f} {r['step_s']:>8.3f} {r['cores']:>6.2f} "
            f"{r['images_per_s'] / r['cores']:>11.2f} {r['images_per_s'] / plain_base:>8.2f}x"
        )

    ray_cores = results[2, 1]["cores/train workers"]
    ddp = plain[2, 1, True]
    lines.append(
        f"\n2 x 1 in Ray Train: {scaling:.2f}x; plain DDP on the same cores: "
        f"{ddp['images_per_s'] / plain_base:.2f}x; without the all-reduce: "
        f"{plain[2, 1, False]['images_per_s'] / plain_base:.2f}x"
    )
    lines.append(
        f"Ray Train 2 x 1 vs plain DDP: {results[2, 1]['images_per_s'] / ddp['images_per_s']:.2f}"
        f" = cores {ray_cores:.2f} / {ddp['cores']:.2f} ({ray_cores / ddp['cores']:.2f}) x "
        f"images per core {per_core[2, 1]:.2f} / {ddp['images_per_s'] / ddp['cores']:.2f} "
        f"({per_core[2, 1] / (ddp['images_per_s'] / ddp['cores']):.2f})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    if arguments.plain_worker:
        plain_worker(arguments)
    else:
        main(arguments)
