"""Worker side of the training reader: shard rows -> decoded, augmented rows (no torch).

`decode_batch` is the `map_batches` function of `pipeline.reader.training_dataset`. It lives
apart from the reader so that the Ray Data processes that run it (and the coordinator that
unpickles it) import numpy, PIL and pyarrow only, not torch and torchvision (which take
seconds to import in every new worker process), nor pycocotools (its RLE decoding is
`pipeline.rle`'s numpy), so it also runs where only those are installed.

Masks travel between the workers and the collate bit-packed (`np.packbits` of [N, H, W]),
8x less than uint8 through the object store; crowded images have hundreds of masks. The
workers decode, resize (nearest neighbour, pixel centres aligned) and flip the masks on
the list of foreground pixels of all RLEs of an image at once, writing the packed bits
directly, so their cost grows with the objects' area, not with N x H x W. Instances whose
mask vanishes under a downscale are dropped from that sample (they have no pixel to learn
from).

Randomness: with `seed=None` every call draws fresh augmentations; with an int seed the
augmentation of an image is a pure function of (seed, image_id).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.rle import rles_pixels

__all__ = ["DECODED_SCHEMA", "decode_batch", "decode_sample", "transform_masks"]

DECODED_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # uint8 [3, height, width], C order
        ("labels", pa.list_(pa.int32())),
        ("boxes", pa.list_(pa.float32())),  # N * 4, xyxy
        ("iscrowd", pa.list_(pa.bool_())),
        ("masks", pa.large_binary()),  # np.packbits of uint8 [N, height, width]
    ]
)
"""Rows of `training_dataset`: what the workers hand to the collate."""


def _forward_index(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For nearest-neighbour resizing (pixel centres aligned): the output pixels
    [lo[i], hi[i]) that take their value from input pixel i (empty when downscaling
    skips it)."""
    source = ((np.arange(out_len) + 0.5) * (in_len / out_len)).astype(np.int64)
    source = np.minimum(source, in_len - 1)  # output pixel -> input pixel, non-decreasing
    inputs = np.arange(in_len)
    return np.searchsorted(source, inputs, "left"), np.searchsorted(source, inputs, "right")


def _augment_params(
    image_id: int,
    height: int,
    width: int,
    train_size: list[int] | None,
    flip_prob: float,
    seed: int | None,
) -> tuple[int, int, bool]:
    """(out_height, out_width, flip) of one image; train_size None means no augmentation."""
    if not train_size:
        return height, width, False
    rng = np.random.default_rng(None if seed is None else [seed, image_id])
    longer = int(rng.choice(train_size))
    scale = longer / max(height, width)
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    return out_h, out_w, bool(rng.random() < flip_prob)


def transform_masks(
    counts: list[str | bytes],
    height: int,
    width: int,
    out_height: int,
    out_width: int,
    flip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode RLE masks, resize (nearest) and flip them, straight into packed bits.

    Returns (packed, boxes, keep): `np.packbits` of uint8 [K, out_height, out_width] for the
    K kept instances, their tight xyxy boxes float32 [K, 4] (x1 = last column + 1), and
    the bool [N] of instances that still have pixels. Works on the foreground pixels only,
    so the cost grows with the objects' area, not N x H x W.
    """
    n = len(counts)
    inst, rows, cols = rles_pixels(counts, height)
    if (out_height, out_width) != (height, width):
        # Each input pixel covers a block of output pixels (0 x 0 to 2 x 2 for jitter
        # within [0.5, 2]); expand the pixel list into those blocks.
        row_lo, row_hi = _forward_index(out_height, height)
        col_lo, col_hi = _forward_index(out_width, width)
        n_rows, n_cols = (row_hi - row_lo)[rows], (col_hi - col_lo)[cols]
        per_pixel = n_rows * n_cols
        src = np.repeat(np.arange(len(rows)), per_pixel)
        j = np.arange(len(src)) - np.repeat(np.cumsum(per_pixel) - per_pixel, per_pixel)
        inst = inst[src]
        rows = row_lo[rows][src] + j // n_cols[src]
        cols = col_lo[cols][src] + j % n_cols[src]
    if flip:
        cols = out_width - 1 - cols
    pixels = np.bincount(inst, minlength=n)
    keep = pixels > 0
    new_index = np.cumsum(keep) - 1
    kept = int(keep.sum())
    packed = np.zeros((kept * out_height * out_width + 7) // 8, np.uint8)
    flat = (new_index[inst] * out_height + rows) * out_width + cols
    np.bitwise_or.at(packed, flat >> 3, (128 >> (flat & 7)).astype(np.uint8))
    boxes = np.zeros((kept, 4), np.float32)
    if kept:
        first = (np.cumsum(pixels) - pixels)[keep]  # pixels are grouped by instance
        boxes[:, 0] = np.minimum.reduceat(cols, first)
        boxes[:, 1] = np.minimum.reduceat(rows, first)
        boxes[:, 2] = np.maximum.reduceat(cols, first) + 1
        boxes[:, 3] = np.maximum.reduceat(rows, first) + 1
    return packed, boxes, keep


def decode_sample(
    row: dict[str, Any], train_size: list[int] | None, flip_prob: float, seed: int | None
) -> dict[str, Any]:
    """Decode one shard row and augment it: image uint8 [3, H, W], masks bit-packed.

    `train_size=None` decodes at the shard size without flipping (evaluation).
    """
    h, w = row["height"], row["width"]
    out_h, out_w, flip = _augment_params(row["image_id"], h, w, train_size, flip_prob, seed)
    image = Image.open(io.BytesIO(row["image"]))
    image = image.convert("RGB") if image.mode != "RGB" else image
    if (out_h, out_w) != (h, w):
        image = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)  # H x W x 3
    if flip:
        pixels = pixels[:, ::-1]
    packed, boxes, keep = transform_masks(row["masks"], h, w, out_h, out_w, flip)
    return {
        "image_id": row["image_id"],
        "orig_height": row["orig_height"],
        "orig_width": row["orig_width"],
        "height": out_h,
        "width": out_w,
        "image": np.ascontiguousarray(pixels.transpose(2, 0, 1)),  # 3 x H x W
        "labels": np.asarray(row["labels"], np.int32)[keep],
        "boxes": boxes,
        "iscrowd": np.asarray(row["iscrowd"], bool)[keep],
        "masks_packed": packed,
    }


def decode_batch(
    batch: pa.Table,
    train_size: list[int] | None = None,
    flip_prob: float = 0.0,
    seed: int | None = None,
) -> pa.Table:
    """`map_batches` function: shard rows in, decoded (and augmented) rows out."""
    columns = ["image_id", "orig_height", "orig_width", "height", "width", "image"]
    columns += ["labels", "iscrowd", "masks"]
    out: dict[str, list[Any]] = {name: [] for name in DECODED_SCHEMA.names}
    for row in batch.select(columns).to_pylist():
        sample = decode_sample(row, train_size, flip_prob, seed)
        for name in ("image_id", "orig_height", "orig_width", "height", "width", "labels"):
            out[name].append(sample[name])
        out["iscrowd"].append(sample["iscrowd"])
        out["image"].append(sample["image"].tobytes())
        out["boxes"].append(sample["boxes"].reshape(-1))
        out["masks"].append(sample["masks_packed"].tobytes())
    return pa.table(
        {
            name: pa.array(values, type=DECODED_SCHEMA.field(name).type)
            for name, values in out.items()
        }
    )
