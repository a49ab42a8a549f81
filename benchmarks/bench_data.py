"""Training-input throughput: Parquet shards + pipeline.reader vs torchvision CocoDetection.

    python benchmarks/bench_data.py [--annotations A.json --images DIR] [--size 256]
        [--batch-size 4] [--workers 2] [--epochs 3]

Both pipelines deliver the same thing to a consumer loop that does nothing else: batches
of `--batch-size` images (longer side `--size`, random horizontal flip) with targets
(labels, boxes, uint8 masks [N, H, W], iscrowd), decoded by `--workers` CPU workers:

(a) the shards (prepared once with jobs/prepare_coco.py's defaults, reused afterwards)
    read by `pipeline.reader.training_dataset` + `iter_model_batches` on a Ray instance
    with `--workers` CPUs;
(b) `torchvision.datasets.CocoDetection` over the original JPEGs and JSON, masks
    rasterised with pycocotools (`COCO.annToMask`, as torchvision's detection references
    do), image resized with PIL and masks with nearest interpolation, in a
    `torch.utils.data.DataLoader` with `--workers` worker processes.

Steady state = images/s over epochs 2.. (the first pays for worker start-up). A second
table gives the single-process cost per image of each stage, to say what dominates.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.datasets import CocoDetection  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from pep_model.config import DataConfig  # noqa: E402
from pipeline.prepare import PrepareConfig, prepare  # noqa: E402
from pipeline.reader import collate, decode_batch, iter_model_batches, training_dataset  # noqa: E402

NUCLEI = Path("/work/shared/data/nuclei/train")
if not NUCLEI.is_dir():
    NUCLEI = ROOT.parent / "shared" / "data" / "nuclei" / "train"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", default=str(NUCLEI / "annotations.json"))
    parser.add_argument("--images", default=str(NUCLEI / "images"))
    parser.add_argument("--shards", default=str(Path(tempfile.gettempdir()) / "bench_data_shards"))
    parser.add_argument("--max-size", type=int, default=PrepareConfig.max_size,
                        help="prepare's longer side (shards)")  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="longer side of the batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of each pipeline")
    parser.add_argument("--epochs", type=int, default=3, help="steady state: epochs 2..")
    return parser


# ------------------------------------------------------------------ (b) torchvision baseline


class CocoMasks:
    """CocoDetection transform: targets as the model takes them, image resized and flipped."""

    def __init__(self, coco, size: int, flip_prob: float) -> None:
        self.coco = coco
        self.size = size
        self.flip_prob = flip_prob
        ids = sorted(coco.getCatIds())
        self.contiguous = {cat_id: k + 1 for k, cat_id in enumerate(ids)}

    def __call__(self, image: Image.Image, anns: list[dict]) -> tuple[torch.Tensor, dict]:
        w, h = image.size
        scale = self.size / max(w, h)
        out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.convert("RGB").resize((out_w, out_h), Image.Resampling.BILINEAR)
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else None
        masks = torch.from_numpy(masks) if anns else torch.zeros((0, h, w), dtype=torch.uint8)
        masks = F.interpolate(masks[None], size=(out_h, out_w), mode="nearest-exact")[0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes *= torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h])
        tensor = pil_to_tensor(image).float().div_(255.0)
        if random.random() < self.flip_prob:
            tensor, masks = tensor.flip(-1), masks.flip(-1)
            boxes = torch.stack(
                [out_w - boxes[:, 2], boxes[:, 1], out_w - boxes[:, 0], boxes[:, 3]], 1
            )
        target = {
            "labels": torch.tensor(
                [self.contiguous[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "boxes": boxes,
            "masks": masks,
            "iscrowd": torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool),
            "image_id": anns[0]["image_id"] if anns else -1,
            "orig_size": (h, w),
        }
        return tensor, target


class _Coco(CocoDetection):
    def __init__(self, images: str, annotations: str, size: int, flip_prob: float) -> None:
        super().__init__(images, annotations)
        self.transform_fn = CocoMasks(self.coco, size, flip_prob)

    def __getitem__(self, index: int):
        image, anns = super().__getitem__(index)
        return self.transform_fn(image, anns)


def _tuple_collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


def torchvision_epochs(args, dataset: _Coco) -> Iterator[Iterable[tuple[list, list]]]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=_tuple_collate,
        persistent_workers=True,
        prefetch_factor=2,
    )
    for _ in range(args.epochs):
        yield loader


# ------------------------------------------------------------------ (a) shards + reader


def shard_epochs(args, data_cfg: DataConfig) -> Iterator[Iterable[tuple[list, list]]]:
    dataset = training_dataset(args.shards, data_cfg, seed=None)
    for _ in range(args.epochs):
        yield iter_model_batches(dataset, args.batch_size, local_shuffle_buffer_size=16)


# ------------------------------------------------------------------ measuring


def consume(epochs: Iterable[Iterable[tuple[list, list]]]) -> dict[str, float]:
    """Pull every batch of every epoch; steady state = images/s over epochs 2.. (the first
    one pays for worker start-up, and its warm-up lets the pipeline buffer ahead)."""
    per_epoch = []
    n_instances = 0
    for batches in epochs:
        start, n_images = time.perf_counter(), 0
        for images, targets in batches:
            n_images += len(images)
            n_instances += sum(len(t["labels"]) for t in targets)
        per_epoch.append((n_images, time.perf_counter() - start))
    if len(per_epoch) < 2:
        raise SystemExit("steady state needs --epochs >= 2")
    steady_images = sum(n for n, _ in per_epoch[1:])
    steady_s = sum(s for _, s in per_epoch[1:])
    return {
        "images": sum(n for n, _ in per_epoch),
        "instances": n_instances,
        "first_epoch_s": per_epoch[0][1],
        "total_s": sum(s for _, s in per_epoch),
        "steady_images_per_s": steady_images / steady_s,
    }


def stage_costs(args, data_cfg: DataConfig, dataset: _Coco, n: int = 64) -> dict[str, float]:
    """Single-process ms per image of each pipeline's stages over the first n images."""
    import pyarrow.parquet as pq

    from pipeline.reader import shard_files

    table = pq.read_table(shard_files(args.shards)[0]).slice(0, n)
    t = time.perf_counter()
    decoded = decode_batch(table, list(data_cfg.train_size), data_cfg.flip_prob, None)
    decode_ms = (time.perf_counter() - t) * 1000 / table.num_rows
    t = time.perf_counter()
    collate(decoded)
    collate_ms = (time.perf_counter() - t) * 1000 / table.num_rows
    t = time.perf_counter()
    for i in range(n):
        dataset[i]
    baseline_ms = (time.perf_counter() - t) * 1000 / n
    return {
        "(a) worker: decode JPEG + RLE, resize, flip, pack": decode_ms,
        "(a) consumer: collate (unpack masks, to float)": collate_ms,
        "(b) worker: CocoDetection + annToMask + resize + flip": baseline_ms,
    }


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    import ray

    torch.set_num_threads(1)
    data_cfg = DataConfig(train_size=[args.size], flip_prob=0.5, reader_cpus=1.0)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prep = prepare(
        args.annotations, args.images, args.shards, PrepareConfig(max_size=args.max_size)
    )
    print(
        f"shards: {args.shards} ({'reused' if prep.reused else f'built in {prep.seconds:.1f} s'})"
    )
    dataset = _Coco(args.images, args.annotations, args.size, 0.5)

    results = {
        "(a) shards + pipeline.reader (Ray Data)": consume(shard_epochs(args, data_cfg)),
        "(b) CocoDetection + pycocotools (DataLoader)": consume(torchvision_epochs(args, dataset)),
    }
    costs = stage_costs(args, data_cfg, dataset)
    ray.shutdown()

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(
        f"data: {args.annotations} ({len(dataset)} images), size {args.size}, batch "
        f"{args.batch_size}, workers {args.workers}, epochs {args.epochs} (steady state: "
        "epochs 2..)\n"
    )
    print(f"{'pipeline':<46} {'images':>7} {'epoch 1 s':>10} {'total s':>8} {'steady img/s':>13}")
    for name, r in results.items():
        print(
            f"{name:<46} {r['images']:>7} {r['first_epoch_s']:>10.1f} {r['total_s']:>8.1f} "
            f"{r['steady_images_per_s']:>13.1f}"
        )
    (a, b) = (r["steady_images_per_s"] for r in results.values())
    print(f"\nratio (a)/(b) at steady state: {a / b:.2f}x")
    print("\nsingle-process cost per image (first 64 images):")
    for name, ms in costs.items():
        print(f"  {name:<56} {ms:7.2f} ms")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
