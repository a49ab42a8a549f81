"""Training-side reader: Parquet shards -> decoded, augmented model batches.

    ds = training_dataset(shards_dir, cfg.data, seed=None)      # Ray Dataset, lazy
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)
    # in the loop:
    for images, targets in iter_model_batches(ray.train.get_dataset_shard("train"), 4):
        losses = model(images, targets)

Decoding (JPEG, RLE masks) and augmentation (scale jitter over `DataConfig.train_size`,
horizontal flip with `DataConfig.flip_prob`) run in Ray Data workers (`map_batches` of
`pipeline.decode.decode_batch`), not in the training loop. The collate
(`iter_model_batches`) only turns the workers' buffers into tensors:

- `images`: list of float32 [3, H, W] tensors in 0..1; sizes vary within a batch. The
  reader does NOT pad: the model pads a list of images to its size divisibility in one
  place.
- `targets`: list of dicts, one per image: `labels` int64 [N] (1..C), `boxes` float32
  [N, 4] xyxy (tight box of the mask, COCO convention: x1 = last column + 1, so
  `boxes == masks_to_boxes(masks) + [0, 0, 1, 1]`), `masks` uint8 [N, H, W], `iscrowd`
  bool [N], `image_id` int, `orig_size` (height, width) of the image in the annotation
  file (what predictions are rescaled to for COCO results).

Masks arrive bit-packed from the workers (`pipeline.decode`, which imports no torch); the
collate's `np.unpackbits` is the one pass over N x H x W.

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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pep_model.config import DataConfig
from pipeline.coco import CategoryMap
from pipeline.decode import DECODED_SCHEMA, decode_batch
from pipeline.prepare import read_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "category_map",
    "collate",
    "decode_batch",
    "image_sizes",
    "iter_model_batches",
    "local_batches",
    "open_shards",
    "read_manifest",
    "shard_files",
    "training_dataset",
]

_INV_255 = np.float32(1.0 / 255.0)
_MAP_BATCH_ROWS = 4  # images per map_batches call: crowded images are heavy


# ---------------------------------------------------------------- shards and metadata


def shard_files(shards_dir: str | os.PathLike) -> list[str]:
    """Paths of the Parquet shards listed in the manifest, in order."""
    shards_dir = Path(shards_dir)
    return [str(shards_dir / s["file"]) for s in read_manifest(shards_dir)["shards"]]


def open_shards(shards_dir: str | os.PathLike) -> ray.data.Dataset:
    """The raw shard rows (schema: `pipeline.prepare.SHARD_SCHEMA`) as a Ray Dataset."""
    files = shard_files(shards_dir)
    if not files:
        raise ValueError(f"{shards_dir}: the manifest lists no shards (no images were written)")
    return ray.data.read_parquet(files, file_extensions=["parquet"])


def _shards_mb(shards_dir: str | os.PathLike) -> float:
    """Size of the shard files on disk, in MiB (local paths; remote ones count as large)."""
    try:
        return sum(os.path.getsize(f) for f in shard_files(shards_dir)) / 2**20
    except OSError:
        return float("inf")


def category_map(shards_dir: str | os.PathLike) -> CategoryMap:
    """Contiguous class ids <-> COCO category ids (and names) of the shards."""
    return CategoryMap.from_dict(read_manifest(shards_dir)["categories"])


def image_sizes(shards_dir: str | os.PathLike) -> dict[int, tuple[int, int]]:
    """Image id -> original (height, width), read from the shards' small columns only."""
    sizes: dict[int, tuple[int, int]] = {}
    for path in shard_files(shards_dir):
        table = pq.read_table(path, columns=["image_id", "orig_height", "orig_width"])
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


def collate(batch: pa.Table | pa.RecordBatch) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Decoded rows (`DECODED_SCHEMA`) -> (images, targets) as the model takes them."""
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
            # to float in 0..1 with numpy: single-threaded, no OpenMP start-up per image
            images.append(torch.from_numpy(np.multiply(pixels, _INV_255, dtype=np.float32)))
            labels = _list_values(cols["labels"], i).astype(np.int64)
            n = len(labels)
            packed = np.frombuffer(cols["masks"][i].as_buffer(), np.uint8)
            masks = np.unpackbits(packed, count=n * h * w).reshape(n, h, w)  # N x H x W
            targets.append(
                {
                    "labels": torch.from_numpy(labels),
                    "boxes": torch.from_numpy(
                        _list_values(cols["boxes"], i).astype(np.float32).reshape(n, 4)
                    ),
                    "masks": torch.from_numpy(masks),
                    "iscrowd": torch.from_numpy(_list_values(cols["iscrowd"], i).astype(bool)),
                    "image_id": int(image_id),
                    "orig_size": orig_size,
                }
            )
    return images, targets


def iter_model_batches(
    dataset_or_shard: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """Model batches from a `training_dataset` or its Ray Train shard
    (`ray.train.get_dataset_shard("train")`): (images, targets) as `collate` gives."""
    batches = dataset_or_shard.iter_batches(
        batch_size=batch_size,
        batch_format="pyarrow",
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        yield collate(batch)


def _local_rows(shards_dir: str | os.PathLike, rows: int) -> Iterable[pa.Table]:
    for path in shard_files(shards_dir):
        parquet = pq.ParquetFile(path)
        for rb in parquet.iter_batches(batch_size=rows):
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
