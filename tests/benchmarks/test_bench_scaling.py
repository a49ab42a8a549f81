"""benchmarks/bench_scaling.py: the CPU sampler that splits the cores between processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


@pytest.fixture(scope="module")
def scaling(load_benchmark):
    return load_benchmark("bench_scaling")


def test_sampler_sees_a_busy_process_use_one_core(scaling):
    sampler = scaling.CpuSampler(interval=0.2)
    sampler.start()
    time.sleep(0.5)
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.6)  # let it start; the window lies wholly inside its busy loop
        start = time.time()
        time.sleep(1.5)
        end = time.time()
        time.sleep(0.3)
    finally:
        busy.wait()
        sampler.stop()
    cores = sampler.cores(start, end)
    # one spinning process: about one core in "other" (a 2-core machine may be shared a bit)
    assert 0.6 < cores["other"] < 1.3
    assert cores["driver"] < 0.5  # this process mostly slept
    # idle is what the processes left of the machine's cores
    assert cores["idle"] >= 0.0
    assert sum(cores.values()) >= psutil.cpu_count() - 1e-9


def test_sampler_notes_when_watched_directories_appear(scaling, tmp_path):
    sampler = scaling.CpuSampler(interval=0.1)
    sampler.watch = str(tmp_path / "checkpoint_epoch_*")
    sampler.start()
    time.sleep(0.3)
    made = time.time()
    (tmp_path / "checkpoint_epoch_0000").mkdir()
    time.sleep(0.4)
    sampler.stop()
    seen = sampler.appeared[str(tmp_path / "checkpoint_epoch_0000")]
    assert made <= seen <= made + 0.35
    assert len(sampler.appeared) == 1


def test_process_groups_follow_ray_titles(scaling):
    assert scaling.process_title(psutil.Process()) == "driver"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.2)
        title = scaling.process_title(psutil.Process(sleeper.pid))
        assert title == Path(sys.executable).name
        assert scaling.process_group(title) == "other"
    finally:
        sleeper.kill()
        sleeper.wait()
    # the titles Ray gives its processes (read from a live Ray 2.60 instance)
    groups = {
        "ray::RayTrainWorker": "train workers",
        "ray::SplitCoordinator": "data path",
        "ray::ReadParquet->MapBatches(decode_batch)": "data path",
        "ray::IDLE": "data path",
        "ray::TrainController": "other Ray",
        "raylet": "other Ray",
        "dashboard.py": "other Ray",
    }
    for title, group in groups.items():
        assert scaling.process_group(title) == group, title


def _ray_row(images_per_s, train_cores):
    return {
        "images_per_s": images_per_s,
        "step_s": 1.0,
        "wall_s": 100.0,
        "data_wait": 0.02,
        "worker_cores": train_cores,
        "cores/train workers": train_cores,
        "cores/other Ray": 0.2,
        "cores/idle": 2 - train_cores - 0.2,
        "top": [("ray::RayTrainWorker", train_cores)],
    }


def test_report_ratios(scaling):
    args = scaling.get_args_parser().parse_args(["--images", "48", "--size", "192"])
    ray_rows = {(1, 1): _ray_row(3.0, 1.0), (2, 1): _ray_row(3.6, 1.6), (1, 2): _ray_row(3.3, 1.6)}
    plain = {
        (1, 1, False): {"images_per_s": 3.0, "step_s": 1.3, "cores": 1.0},
        (2, 1, False): {"images_per_s": 5.1, "step_s": 0.8, "cores": 2.0},
        (2, 1, True): {"images_per_s": 4.5, "step_s": 0.9, "cores": 2.0},
        (1, 2, False): {"images_per_s": 4.5, "step_s": 0.9, "cores": 2.0},
    }
    text = scaling.report(args, ray_rows, plain, cpus=2)
    assert "ratio 2 workers / 1 worker: 1.20x (target >= 1.6)" in text
    assert "ratio 1 worker x 2 threads / 1 x 1: 1.10x" in text
    assert "plain DDP on the same cores: 1.50x; without the all-reduce: 1.70x" in text
    # 3.6 / 4.5 = 0.80 = cores 1.6 / 2.0 (0.80) x per core 2.25 / 2.25 (1.00)
    assert "Ray Train 2 x 1 vs plain DDP: 0.80 = cores 1.60 / 2.00 (0.80)" in text
    assert "(1.00)" in text


def test_window_without_samples_is_refused(scaling):
    sampler = scaling.CpuSampler(interval=0.2)
    with pytest.raises(RuntimeError, match="no samples"):
        sampler.cores(time.time() - 1, time.time())
