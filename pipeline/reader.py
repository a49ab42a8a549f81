"""Training-side reader: Parquet shards -> decoded, augmented model batches.

    ds = training_dataset(shards_dir, cfg.data, seed=None)      # Ray Dataset, lazy
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)
    # in the loop:
    for images, targets in iter_model_batches(ray.train.get_dataset_shard("train"), 4):
        losses = model(images, targets)

Decoding (JPEG, RLE masks) and augmentation (scale jitter over `DataConfig.train_size`,
horizontal flip with `DataConfig.flip_prob`) run in Ray Data workers (`map_batches` of
`pipeline.decode.decode_batch`), not in the training loop. The collate (`collate_packed`)
turns the workers' buffers into uint8 tensors in Ray Data's prefetch threads; they travel to
the device as uint8 images and bit-packed masks, and become the model's inputs there
(`to_model_inputs`: float images, unpacked masks). `iter_model_batches` yields:

- `images`: list of float32 [3, H, W] tensors in 0..1; sizes vary within a batch. The
  reader does NOT pad: the model pads a list of images to its size divisibility in one
  place.
- `targets`: list of dicts, one per image: `labels` int64 [N] (1..C), `boxes` float32
  [N, 4] xyxy (tight box of the mask, COCO convention: x1 = last column + 1, so
  `boxes == masks_to_boxes(masks) + [0, 0, 1, 1]`), `masks` uint8 [N, H, W], `iscrowd`
  bool [N], `image_id` int, `orig_size` (height, width) of the image in the annotation
  file (what predictions are rescaled to for COCO results).

Masks arrive bit-packed from the workers (`pipeline.decode`, which imports no torch) and
are unpacked on the device (`unpack_masks`), the one pass over N x H x W.

Randomness: with `seed=None` every pass draws fresh augmentations (what training wants:
each epoch re-executes the dataset); with an int seed the augmentation of an image is a
pure function of (seed, image_id), the same every epoch, for tests and debugging.

Evaluation helpers: `read_manifest`, `category_map` (contiguous id -> COCO id), and
`image_sizes` (image id -> original (height, width)).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data.collate_fn
import torch

from pep_model.config import DataConfig
from pipeline import storage
from pipeline.coco import CategoryMap
from pipeline.decode import DECODED_SCHEMA, decode_batch
from pipeline.prepare import read_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "category_map",
    "collate",
    "collate_packed",
    "decode_batch",
    "image_sizes",
    "iter_model_batches",
    "local_batches",
    "open_shards",
    "read_manifest",
    "shard_files",
    "to_model_inputs",
    "training_dataset",
    "unpack_masks",
]

_INV_255 = np.float32(1.0 / 255.0)
_MAP_BATCH_ROWS = 4  # images per map_batches call: crowded images are heavy


# ---------------------------------------------------------------- shards and metadata


def shard_files(shards_dir: str | os.PathLike) -> list[str]:
    """Paths (URIs for shards on cloud storage) of the Parquet shards listed in the
    manifest, in order."""
    return [storage.join(shards_dir, s["file"]) for s in read_manifest(shards_dir)["shards"]]


def open_shards(shards_dir: str | os.PathLike) -> ray.data.Dataset:
    """The raw shard rows (schema: `pipeline.prepare.SHARD_SCHEMA`) as a Ray Dataset."""
    files = shard_files(shards_dir)
    if not files:
        raise ValueError(f"{shards_dir}: the manifest lists no shards (no images were written)")
    return ray.data.read_parquet(files, file_extensions=["parquet"])


def _shards_mb(shards_dir: str | os.PathLike) -> float:
    """Size of the shard files, in MiB, as the manifest records them."""
    return sum(s["bytes"] for s in read_manifest(shards_dir)["shards"]) / 2**20


def category_map(shards_dir: str | os.PathLike) -> CategoryMap:
    """Contiguous class ids <-> COCO category ids (and names) of the shards."""
    return CategoryMap.from_dict(read_manifest(shards_dir)["categories"])


def image_sizes(shards_dir: str | os.PathLike) -> dict[int, tuple[int, int]]:
    """Image id -> original (height, width), read from the shards' small columns only."""
    sizes: dict[int, tuple[int, int]] = {}
    for path in shard_files(shards_dir):
        table = storage.open_parquet(path).read(columns=["image_id", "orig_height", "orig_width"])
        for image_id, h, w in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            sizes[image_id] = (h, w)
    return sizes


def _decode_kwargs(data_cfg: DataConfig, augment: bool, seed: int | None) -> dict[str, Any]:
    return {
        "train_size": list(data_cfg.train_size) if augment else None,
        "flip_prob": data_cfg.flip_prob if augment else 0.0,
        "seed": seed,
    }


def training_dataset(
    shards_dir: str | os.PathLike,
    data_cfg: DataConfig,
    seed: int | None = None,
    augment: bool = True,
) -> ray.data.Dataset:
    """Shards -> decoded (and, with `augment`, scale-jittered and flipped) rows.

    Decoding is lazy (it runs again every epoch, so augmentations differ); with `augment`,
    shards up to `data_cfg.cache_shards_mb` are read here once and their encoded rows kept in
    Ray's object store. Pass the result to `TorchTrainer(datasets={"train": ...})`; each
    worker reads its part with `ray.train.get_dataset_shard("train")` and
    `iter_model_batches`.
    """
    rows = open_shards(shards_dir)
    if augment and _shards_mb(shards_dir) <= data_cfg.cache_shards_mb:
        # Each epoch re-executes the dataset; without this it also lists and reads the files
        # again (measured: ~6 s before the first batch of every epoch on 48 images, 0.3 s
        # when the encoded rows are kept). Decoding and augmentation still run every epoch.
        rows = rows.materialize()
    return rows.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=_MAP_BATCH_ROWS,
        num_cpus=data_cfg.reader_cpus,
        fn_kwargs=_decode_kwargs(data_cfg, augment, seed),
    )


# ---------------------------------------------------------------- collate


def _list_values(column: pa.Array, i: int) -> np.ndarray:
    offsets = column.offsets
    start, end = offsets[i].as_py(), offsets[i + 1].as_py()
    return column.values[start:end].to_numpy(zero_copy_only=False)


def collate_packed(
    batch: pa.Table | pa.RecordBatch, pin_memory: bool = False
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Decoded rows (`DECODED_SCHEMA`) -> (images, targets) as they travel to the device:
    uint8 images [3, H, W] and bit-packed masks (`masks_packed`, `mask_shape` (N, H, W)),
    4x and 8x less than float32 images and uint8 masks. `to_model_inputs` makes them what
    the model takes, on the device. `pin_memory`: page-locked, for asynchronous copies to a
    GPU."""
    images: list[torch.Tensor] = []
    targets: list[dict[str, Any]] = []
    record_batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
    for rb in record_batches:
        cols = {name: rb.column(name) for name in DECODED_SCHEMA.names}
        ids = cols["image_id"].to_pylist()
        heights, widths = cols["height"].to_pylist(), cols["width"].to_pylist()
        orig = zip(cols["orig_height"].to_pylist(), cols["orig_width"].to_pylist())
        for i, (image_id, h, w, orig_size) in enumerate(zip(ids, heights, widths, orig)):
            pixels = np.frombuffer(cols["image"][i].as_buffer(), np.uint8).reshape(3, h, w)
            labels = _list_values(cols["labels"], i).astype(np.int64)
            n = len(labels)
            packed = np.frombuffer(cols["masks"][i].as_buffer(), np.uint8)
            image, packed = torch.from_numpy(pixels.copy()), torch.from_numpy(packed.copy())
            if pin_memory:
                image, packed = image.pin_memory(), packed.pin_memory()
            images.append(image)
            targets.append(
                {
                    "labels": torch.from_numpy(labels),
                    "boxes": torch.from_numpy(
                        _list_values(cols["boxes"], i).astype(np.float32).reshape(n, 4)
                    ),
                    "masks_packed": packed,
                    "mask_shape": (n, h, w),
                    "iscrowd": torch.from_numpy(_list_values(cols["iscrowd"], i).astype(bool)),
                    "image_id": int(image_id),
                    "orig_size": orig_size,
                }
            )
    return images, targets


_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # np.packbits order


def unpack_masks(packed: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """`np.packbits` bytes -> uint8 masks of `shape` (N, H, W), on the bytes' device."""
    count = shape[0] * shape[1] * shape[2]
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_VALUES.to(packed.device)).ne(0)
    return bits.reshape(-1)[:count].reshape(shape).to(torch.uint8)


def to_model_inputs(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device | str
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """`collate_packed`'s batch on `device`, as the model takes it: float32 images in 0..1,
    uint8 masks [N, H, W]. On a GPU the conversions run there, after the copy of the small
    buffers; on the CPU with numpy (`np.unpackbits` and a float32 multiply: 14 against 40 ms
    per batch of two 1333-px images with torch's ops, benchmarks/bench_feed.py), with the
    same values."""
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    out_images, out_targets = [], []
    for img, target in zip(images, targets):
        if on_cpu:
            out_images.append(torch.from_numpy(np.multiply(img.numpy(), _INV_255)))
        else:
            img = img.to(device, non_blocking=True)
            out_images.append(img.to(torch.float32).mul_(float(_INV_255)))
        moved = {
            k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in target.items()
            if k not in ("masks_packed", "mask_shape")
        }
        if "masks_packed" in target:
            shape = target["mask_shape"]
            if on_cpu:
                count = shape[0] * shape[1] * shape[2]
                bits = np.unpackbits(target["masks_packed"].numpy(), count=count)
                moved["masks"] = torch.from_numpy(bits.reshape(shape))
            else:
                packed = target["masks_packed"].to(device, non_blocking=True)
                moved["masks"] = unpack_masks(packed, shape)
        out_targets.append(moved)
    return out_images, out_targets


def collate(batch: pa.Table | pa.RecordBatch) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Decoded rows (`DECODED_SCHEMA`) -> (images, targets) as the model takes them, on the
    CPU: `to_model_inputs` of `collate_packed`."""
    return to_model_inputs(*collate_packed(batch), "cpu")


class PackedCollate(ray.data.collate_fn.ArrowBatchCollateFn):
    """`collate_packed` as Ray Data's collate hook: with prefetching it runs in Ray Data's
    threads, off the training loop's."""

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory

    def __call__(self, batch: pa.Table) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        return collate_packed(batch, self.pin_memory)


def iter_model_batches(
    dataset_or_shard: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    prefetch_batches: int = 2,
    device: torch.device | str | None = None,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """Model batches from a `training_dataset` or its Ray Train shard
    (`ray.train.get_dataset_shard("train")`): (images, targets) as `collate` gives, on
    `device` (default: the CPU).

    `collate_packed` runs in Ray Data's prefetch threads (`iter_torch_batches`' collate
    hook); the copy to the device and the conversions (`to_model_inputs`) in this thread,
    on the device. Batches for a GPU are pinned.
    """
    device = torch.device(device or "cpu")
    batches = dataset_or_shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=PackedCollate(pin_memory=device.type == "cuda"),
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        prefetch_batches=prefetch_batches,
    )
    for images, targets in batches:
        yield to_model_inputs(images, targets, device)


def _local_rows(shards_dir: str | os.PathLike, rows: int) -> Iterable[pa.Table]:
    for path in shard_files(shards_dir):
        for rb in storage.open_parquet(path).iter_batches(batch_size=rows):
            yield pa.Table.from_batches([rb])


def local_batches(
    shards_dir: str | os.PathLike,
    data_cfg: DataConfig,
    batch_size: int,
    augment: bool = False,
    seed: int | None = 0,
    use_ray: bool = False,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """Model batches without Ray Train, in shard order (unit tests, evaluation, tools).

    `use_ray=False` decodes in this process with the same functions the Ray Data workers
    run; `use_ray=True` goes through `training_dataset` (needs a Ray instance).
    """
    kwargs = _decode_kwargs(data_cfg, augment, seed)
    if use_ray:
        yield from iter_model_batches(
            training_dataset(shards_dir, data_cfg, seed=seed, augment=augment), batch_size
        )
        return
    for table in _local_rows(shards_dir, batch_size):
        yield collate(decode_batch(table, **kwargs))
