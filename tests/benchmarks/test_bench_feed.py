"""benchmarks/bench_feed.py: reader throughput per CPU beside a GPU's appetite, and the
cluster's CPUs per GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_feed")


def test_cluster_yaml_gives_each_gpu_its_cpus(bench):
    assert bench.cluster_cpus_per_gpu(ROOT / "cluster.yaml") == {
        "gpu_worker": 8,
        "gpu_worker_4x": 12,
    }


def test_measures_the_reader_and_the_bytes_a_batch_carries(bench, ray_session, tmp_path, capsys):
    args = bench.get_args_parser().parse_args(
        ["--sizes", "96", "128", "--source-size", "64", "--images", "4", "--rounds", "1"]
        + ["--work", str(tmp_path), "--gpu-images-per-s", "10"]
    )
    results = bench.main(args)
    out = capsys.readouterr().out
    assert set(results) == {96, 128}
    for size, r in results.items():
        assert r["images"] == 4 and r["reader_images_per_s"] > 0
        # uint8 images (1/4 of float32) and packed masks (about 1/8 of uint8) cross to the
        # device: between 4x (no masks) and 8x (masks only) less
        assert r["objects_per_image"] > 0
        assert 4.0 < r["mb_per_batch_former"] / r["mb_per_batch_new"] < 8.0
        row = next(line for line in out.splitlines() if line.startswith(f"| {size} |"))
        needed = 10 / r["reader_images_per_s"]
        assert f"| {needed:.1f} |" in row
    assert "| gpu_worker | 8 | yes |" in out and "| gpu_worker_4x | 12 | yes |" in out
