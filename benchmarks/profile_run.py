"""Where the time of one tiny `train_pep` run goes, end to end (issue 17).

    python benchmarks/profile_run.py [--images 40] [--size 96] [--epochs 1] [--set KEY=VALUE]

Runs `jobs/train_pep.py` as a user does (a new process, a local Ray started by the job, its
quiet console) on generated data in a fresh work folder, and splits its wall time into
phases from what the run itself records, read afterwards:

- the job's console lines, stamped with their arrival time here (PYTHONUNBUFFERED);
- Ray's session folder (named after the time `ray.init` started the local head, and the
  driver's pid), Ray Train's storage (the driver's and the worker's storage probe files,
  the controller's `.validate_storage_marker`, each checkpoint file);
- the MLflow run: its start and end time, every metric's timestamp (the rank-0 worker logs
  each epoch's metrics with `epoch_time_s` and `data_wait_s`, validation logs `val/...`, the
  driver logs `time/train_s` and `time/eval_s` after the evaluation), the artifacts' file
  times and the logged model's creation time.

Phases are the gaps between consecutive records, so they add up to the total; each row names
its source. "Epochs" are the workers' `epoch_time_s`; the fixed cost is the total minus them.
After the run, the last checkpoint is evaluated again in this process without Ray Data
(`inference.evaluate_checkpoint_local`, model load + inference + COCOeval) to show how much of
the run's evaluation was that work and how much starting Ray Data and the model replicas.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "profile"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="generated images (train + val)")
    parser.add_argument("--size", type=int, default=96, help="generated image size (px)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--root", default=str(ROOT), help="project checkout whose job runs (default: this one)"
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="relative to --root")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--work-dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--verbose", action="store_true", help="pass --verbose to the job")
    parser.add_argument("--out", default=None, help="also write the phases as JSON here")
    parser.add_argument("--no-recheck", action="store_true", help="skip the in-process re-eval")
    return parser


def run_job(args: argparse.Namespace, work: Path) -> tuple[float, float, int, list]:
    """Start the job, stamp its console lines; returns (start, end, pid, [(time, line)])."""
    sets = [
        f"data.generated_images={args.images}",
        f"data.generated_size={args.size}",
        f"data.max_size={args.size}",
        f"data.train_size=[{args.size}]",
        f"train.epochs={args.epochs}",
        *args.overrides,
    ]
    root = Path(args.root).resolve()
    cmd = [sys.executable, str(root / "jobs" / "train_pep.py"), "--config", str(root / args.config)]
    cmd += ["--work-dir", str(work), "--name", RUN_NAME]
    cmd += [item for s in sets for item in ("--set", s)]
    cmd += ["--verbose"] if args.verbose else []
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    lines = []
    start = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work
    )
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    proc.wait()
    end = time.time()
    (work / "console.log").write_text("".join(f"{t - start:8.2f}  {line}\n" for t, line in lines))
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise SystemExit(f"the job failed (rc {proc.returncode}):\n{tail}")
    return start, end, proc.pid, lines


def ray_session_start(pid: int) -> float | None:
    """When `ray.init` in process `pid` started its local head: Ray names the session folder
    `session_<local date>_<time>_<microseconds>_<driver pid>`."""
    for path in Path(tempfile.gettempdir(), "ray").glob(f"session_*_{pid}"):
        m = re.match(r"session_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)_(\d+)_\d+$", path.name)
        if m:
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d_%H-%M-%S")
            return stamp.timestamp() + int(m.group(2)) / 1e6
    return None


def first_line(lines: list, pattern: str) -> float | None:
    regex = re.compile(pattern)
    return next((t for t, line in lines if regex.search(line)), None)


def last_line(lines: list, pattern: str) -> float | None:
    regex = re.compile(pattern)
    return next((t for t, line in reversed(lines) if regex.search(line)), None)


def mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def collect(args, work: Path, start: float, end: float, pid: int, lines: list) -> dict:
    """The run's records -> named marks (absolute times) and values."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("pep").experiment_id], f"tags.ray_run_name = '{RUN_NAME}'"
    )
    run_id = run.info.run_id

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    def logged_at(key: str) -> float | None:
        points = history(key)
        return points[-1].timestamp / 1000 if points else None

    epochs = [{"end": m.timestamp / 1000, "time": m.value} for m in history("epoch_time_s")]
    waits = [m.value for m in history("data_wait_s")]
    storage = work / "runs" / RUN_NAME
    probes = storage / ".storage_probe"
    checkpoints = sorted(storage.glob("checkpoint_epoch_*/checkpoint.pt"), key=mtime)
    train_s, eval_s = history("time/train_s"), history("time/eval_s")
    eval_end = eval_s[-1].timestamp / 1000
    train_end = eval_end - eval_s[-1].value
    val_ends = [m.timestamp / 1000 for m in history("val/segm/AP")]
    model_id = run.data.tags["model_uri"].removeprefix("models:/")
    model = client.get_logged_model(model_id)
    marks = {
        "start": start,
        "ray_session": ray_session_start(pid),
        "data_start": first_line(lines, r"pipeline\.(experiment: generating|prepare: )"),
        "data_end": last_line(lines, r"pipeline\.experiment: (built|reused) shards"),
        "run_start": run.info.start_time / 1000,
        "train_start": train_end - train_s[-1].value,
        "probe_driver": min((p.stat().st_mtime for p in probes.glob("driver-*")), default=None),
        "fit_start": first_line(lines, rf"pipeline\.train: training {RUN_NAME}"),
        "controller": mtime(storage / ".validate_storage_marker"),
        "probe_worker": min((p.stat().st_mtime for p in probes.glob("worker-*")), default=None),
        "epoch0_start": epochs[0]["end"] - epochs[0]["time"],
        "epochs_end": epochs[-1]["end"],
        "checkpoint": checkpoints[-1].stat().st_mtime,
        "validation_end": max((t for t in val_ends if t <= train_end), default=None),
        "train_end": train_end,
        "predicted": first_line(lines, r"pipeline\.inference: Predicted"),
        "eval_end": eval_end,
        "model_start": model.creation_timestamp / 1000,
        "run_end": run.info.end_time / 1000,
        "summary": first_line(lines, r"^MLflow run: "),
        "end": end,
    }
    return {
        "marks": marks,
        "epochs": epochs,
        "data_wait_s": waits,
        "train_s": train_s[-1].value,
        "eval_s": eval_s[-1].value,
        "checkpoint_path": str(checkpoints[-1]),
        "val_shards": str(next((work / "shards").glob("*/val"))),
        "run_id": run_id,
        "validation_runs": len(val_ends),
        "validation_beside_training": sum(t <= train_end for t in val_ends),
    }


# (row, from mark, to mark, source of the boundary)
PHASES = [
    ("python start + imports", "start", "ray_session", "Ray session folder name"),
    ("Ray start (local head)", "ray_session", "data_start", "console: first data line"),
    ("data: generate + shards", "data_start", "data_end", "console: shards built"),
    ("MLflow store + run", "data_end", "run_start", "MLflow run start_time"),
    ("params, config artifact", "run_start", "train_start", "time/train_s"),
    ("training input (read shards)", "train_start", "probe_driver", "storage probe (driver)"),
    ("Ray Train: trainer set-up", "probe_driver", "fit_start", "console: training ..."),
    ("Ray Train: controller start", "fit_start", "controller", ".validate_storage_marker"),
    ("Ray Train: worker group start", "controller", "probe_worker", "storage probe (worker)"),
    ("worker: model, prepare_model", "probe_worker", "epoch0_start", "epoch_time_s"),
    ("epochs (epoch_time_s)", "epoch0_start", "epochs_end", "MLflow epoch metrics"),
    ("checkpoint (save + report)", "epochs_end", "checkpoint", "checkpoint.pt mtime"),
    ("validation task", "checkpoint", "validation_end", "val/segm/AP timestamp"),
    ("Ray Train finish", "validation_end", "train_end", "time/train_s"),
    ("evaluation: predict", "train_end", "predicted", "console: Predicted ..."),
    ("evaluation: COCOeval, metrics", "predicted", "eval_end", "time/eval_s"),
    ("MLflow logging: artifacts", "eval_end", "model_start", "logged model created"),
    ("MLflow: model logging", "model_start", "run_end", "MLflow run end_time"),
    ("summary, teardown, exit", "run_end", "end", "process exit"),
]


def phases(record: dict, slack: float = 0.5) -> list[tuple[str, float, str]]:
    """Consecutive gaps between the marks that exist (a missing mark merges its phase into
    the next one, whose row then names both). Marks derived from durations (`time/train_s`)
    or file times may precede the previous one by clock rounding: up to `slack` s counts
    as 0."""
    marks = record["marks"]
    rows, pending, previous = [], [], marks["start"]
    for name, _, to, source in PHASES:
        pending.append(name)
        if marks.get(to) is None or marks[to] < previous - slack:
            continue
        rows.append((" + ".join(pending), max(0.0, marks[to] - previous), source))
        pending, previous = [], max(previous, marks[to])
    return rows


def recheck(record: dict) -> tuple[float, float]:
    """The run's last checkpoint evaluated again here without Ray Data: (model load +
    inference + COCOeval seconds, segm AP)."""
    from pipeline import inference

    start = time.perf_counter()
    metrics = inference.evaluate_checkpoint_local(
        record["checkpoint_path"], record["val_shards"], use_gpu=False
    )
    return time.perf_counter() - start, metrics["segm/AP"]


def main(args: argparse.Namespace) -> int:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="profile_run_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start, end, pid, lines = run_job(args, work)
    record = collect(args, work, start, end, pid, lines)
    rows = phases(record)
    total = end - start
    epochs = sum(e["time"] for e in record["epochs"])
    print(f"\nwork dir: {work} (console with arrival times: console.log)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print("\n| phase | s | share | boundary from |\n|---|---|---|---|")
    for name, seconds, source in rows:
        print(f"| {name} | {seconds:.1f} | {100 * seconds / total:.0f}% | {source} |")
    print(f"| **total (process start to exit)** | **{total:.1f}** | 100% | |")
    first_wait = record["data_wait_s"][0] if record["data_wait_s"] else float("nan")
    print(
        f"\nepochs: {len(record['epochs'])}, epoch_time_s "
        + ", ".join(f"{e['time']:.1f}" for e in record["epochs"])
        + f" (epoch 1 waited {first_wait:.1f} s for data: the first batch)"
    )
    print(
        f"validation results: {record['validation_runs']} "
        f"({record['validation_beside_training']} from the task beside training)"
    )
    print(f"driver: time/train_s {record['train_s']:.1f}, time/eval_s {record['eval_s']:.1f}")
    result = {"total_s": total, "epochs_s": epochs, "fixed_s": total - epochs, "record": record}
    if not args.no_recheck:
        seconds, ap = recheck(record)
        result["recheck_s"] = seconds
        print(
            f"the same evaluation in one process (model load + inference + COCOeval, no Ray "
            f"Data): {seconds:.1f} s, segm AP {ap:.4f}"
        )
    print(f"\nfixed cost = total - epochs = {total:.1f} - {epochs:.1f} = {total - epochs:.1f} s")
    print(
        f"(with epoch 1's wait for its first batch counted as fixed too: "
        f"{total - epochs + first_wait:.1f} s)"
    )
    result["phases"] = [{"phase": n, "s": s, "source": src} for n, s, src in rows]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
