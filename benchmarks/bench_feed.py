"""Can the reader feed a GPU? Reader throughput per CPU at COCO sizes, beside a GPU's appetite.

    python benchmarks/bench_feed.py [--sizes 1024 1333] [--source-size 640] [--images 16]
        [--rounds 2]

Generated crowded scenes (`pipeline.synth`, ~7 objects per image; COCO has 7.3) of
`--source-size` px (COCO's images are ~640 x 480) are prepared into shards as the COCO
recipe prepares them (`max_size` 1333: never upscaled, so stored at their size), then the two
sides of the training input are timed in this process, one thread, image by image, for each
`--sizes` training size:

- reader CPU (a Ray Data worker's `map_batches`: `pipeline.decode.decode_batch`): JPEG
  decode, the resize to `train_size` (configs/coco_r50_1x.yaml: [1333], an upscale here as
  for COCO), flip, masks rasterised and bit-packed. Its images/s is what one reader CPU
  delivers.
- the training process, per batch: `collate_packed` (uint8 images, packed masks; runs in Ray
  Data's prefetch threads) and `to_model_inputs` on the CPU (float images, unpacked masks;
  on a GPU it runs there, after the copy), against the former `collate` (both on the
  training thread), and the bytes a batch carries to the device either way.

The GPU side is a published figure, not measured here: detectron2's R50-FPN Mask R-CNN 1x
trains at ~0.2 s/iter for 16 images on 8 V100s, ~10 images/s per GPU (`--gpu-images-per-s`).
The last table reads `cluster.yaml`: the CPUs each GPU of a node type has, against 2x the
reader CPUs that feed one GPU (the target: decoding keeps up with room for the driver, Ray
Data's other work and a faster GPU). Times are medians over `--rounds` passes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline import reader, synth  # noqa: E402
from pipeline.decode import decode_batch  # noqa: E402
from pipeline.prepare import PrepareConfig, prepare  # noqa: E402

DETECTRON2_IMAGES_PER_S_PER_GPU = 16 / 0.2 / 8  # R50-FPN Mask R-CNN 1x on V100s
HEADROOM = 2.0  # CPUs per GPU wanted, as a multiple of the reader CPUs that feed it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1333])
    parser.add_argument("--source-size", type=int, default=640, help="generated image side")
    parser.add_argument("--images", type=int, default=16, help="generated images per size")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training batch")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes (median)")
    parser.add_argument("--gpu-images-per-s", type=float, default=DETECTRON2_IMAGES_PER_S_PER_GPU)
    parser.add_argument("--cluster", default=str(ROOT / "cluster.yaml"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_feed"))
    return parser


def make_shards(work: Path, size: int, images: int) -> Path:
    """Generated scenes of `size` px prepared into shards as the COCO recipe does (reused)."""
    coco = work / f"coco-{size}-{images}"
    shards = work / f"shards-{size}-{images}"
    if not synth.is_current(coco):
        synth.make_dataset(coco, images=images, size=size, seed=0, val_fraction=0.0)
    prepare(
        coco / "train" / "annotations.json",
        coco / "train" / "images",
        shards,
        PrepareConfig(max_size=1333),
    )
    return shards


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shards: Path, size: int, batch_size: int, rounds: int) -> dict[str, float]:
    """Per-image reader time, per-batch training-process times and bytes, for one size."""
    rows = pa.concat_tables(list(reader._local_rows(shards, 1000)))
    n = rows.num_rows
    kwargs = {"train_size": [size], "flip_prob": 0.5, "seed": 0}
    decoded = decode_batch(rows, **kwargs)
    reader_s = _median_time(lambda: decode_batch(rows, **kwargs), rounds)
    batches = [decoded.slice(i, batch_size) for i in range(0, n, batch_size)]

    def packed():
        return [reader.collate_packed(b) for b in batches]

    def on_cpu():
        return [reader.to_model_inputs(*p, "cpu") for p in packed_batches]

    def former():  # the collate before: float conversion and unpacking on the training thread
        out = []
        for b in batches:
            images, targets = reader.collate_packed(b)
            images = [torch.from_numpy(np.multiply(i.numpy(), np.float32(1 / 255))) for i in images]
            for t in targets:
                count = int(np.prod(t["mask_shape"]))
                bits = np.unpackbits(t["masks_packed"].numpy(), count=count)
                t["masks"] = torch.from_numpy(bits.reshape(t["mask_shape"]))
            out.append((images, targets))
        return out

    packed_batches = packed()
    objects = sum(int(np.prod(t["mask_shape"][:1])) for _, ts in packed_batches for t in ts)
    new_bytes = sum(
        i.numel() + t["masks_packed"].numel() for ims, ts in packed_batches for i, t in zip(ims, ts)
    )
    old_bytes = sum(4 * i.numel() + int(np.prod(t["mask_shape"])) for ims, ts in packed_batches
                    for i, t in zip(ims, ts))  # fmt: skip
    return {
        "images": n,
        "objects_per_image": objects / n,
        "reader_images_per_s": n / reader_s,
        "collate_packed_ms": 1000 * _median_time(packed, rounds) / len(batches),
        "to_model_inputs_cpu_ms": 1000 * _median_time(on_cpu, rounds) / len(batches),
        "former_collate_ms": 1000 * _median_time(former, rounds) / len(batches),
        "mb_per_batch_new": new_bytes / len(batches) / 2**20,
        "mb_per_batch_former": old_bytes / len(batches) / 2**20,
    }


def cluster_cpus_per_gpu(cluster_yaml: str | Path) -> dict[str, float]:
    """CPUs per GPU of each GPU node type in a cluster launcher config."""
    config = yaml.safe_load(Path(cluster_yaml).read_text())
    out = {}
    for name, node in config["available_node_types"].items():
        resources = node.get("resources", {})
        if resources.get("GPU"):
            out[name] = resources["CPU"] / resources["GPU"]
    return out


def report(results: dict[int, dict[str, float]], gpu_rate: float, cluster: dict[str, float]):
    lines = [
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread",
        "",
        "| training size (longer side) | objects/img | reader img/s per CPU | reader CPUs per GPU "
        f"({gpu_rate:.0f} img/s) | collate_packed ms/batch | to_model_inputs on CPU ms/batch "
        "| former collate ms/batch | MiB/batch to device (former) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    needed = {}
    for size, r in results.items():
        needed[size] = gpu_rate / r["reader_images_per_s"]
        lines.append(
            f"| {size} | {r['objects_per_image']:.1f} | {r['reader_images_per_s']:.2f} "
            f"| {needed[size]:.1f} | {r['collate_packed_ms']:.1f} "
            f"| {r['to_model_inputs_cpu_ms']:.1f} | {r['former_collate_ms']:.1f} "
            f"| {r['mb_per_batch_new']:.1f} ({r['mb_per_batch_former']:.1f}, "
            f"{r['mb_per_batch_former'] / r['mb_per_batch_new']:.1f}x) |"
        )
    worst = max(needed.values())
    lines += [
        "",
        f"cluster.yaml: CPUs per GPU against {HEADROOM:g}x the {worst:.1f} reader CPUs that "
        f"feed one GPU at {max(results)} px ({HEADROOM * worst:.1f})",
        "",
        "| node type | CPUs per GPU | enough |",
        "|---|---|---|",
    ]
    for name, cpus in cluster.items():
        lines.append(f"| {name} | {cpus:g} | {'yes' if cpus >= HEADROOM * worst else 'NO'} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[int, dict[str, float]]:
    torch.set_num_threads(1)
    shards = make_shards(Path(args.work), args.source_size, args.images)
    results = {size: measure(shards, size, args.batch_size, args.rounds) for size in args.sizes}
    print(report(results, args.gpu_images_per_s, cluster_cpus_per_gpu(args.cluster)))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
