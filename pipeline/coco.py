"""Reading and validating COCO instance annotations.

The annotation JSON is read once (on the driver) by `load_coco_json`, which fails with a
`CocoFormatError` naming the file and the problem (with JSON line/column) when the file is
unusable as a whole. `index_coco` then checks every image and annotation record on its own:
a bad record becomes a `Rejection` (kind, index in the JSON array, id, short code, reason)
and the good ones are grouped per image. Mask decoding (`decode_segmentation`), resizing
(`resize_mask`) and RLE encoding (`encode_rle`) run in the Ray Data workers of
`pipeline.prepare`; they raise `AnnotationError` with the reason of a rejection.

Masks follow pycocotools: polygons and uncompressed RLE are rasterised with `frPyObjects`,
compressed RLE is checked (counts add up to height x width) before it is decoded, because
pycocotools' C decoder trusts its input.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


class CocoError(Exception):
    """Base class of the errors raised for COCO input."""


class CocoFormatError(CocoError):
    """The annotation file as a whole is unusable (missing, not JSON, wrong structure)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class AnnotationError(CocoError):
    """One annotation record is invalid; `code` is a short key, `reason` the full text."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> contiguous class ids 1..C (0 is background, as in torchvision).

    Contiguous ids follow the order of the COCO ids, so the map is the same for any file with
    the same categories. `to_coco` maps model outputs back for COCO results.
    """

    coco_ids: tuple[int, ...]  # coco_ids[k - 1] is the COCO id of contiguous id k
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: list[dict[str, Any]]) -> CategoryMap:
        """Build the map from a COCO `categories` list (sorted by COCO id)."""
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (contiguous ids are 1..C)."""
        return len(self.coco_ids)

    def to_contiguous(self, coco_id: int) -> int:
        """Contiguous id (1..C) of a COCO category id; KeyError when unknown."""
        return self._forward[coco_id]

    def to_coco(self, contiguous_id: int) -> int:
        """COCO category id of a contiguous id (1..C)."""
        if not 1 <= contiguous_id <= len(self.coco_ids):
            raise KeyError(f"contiguous class id {contiguous_id} is not in 1..{self.num_classes}")
        return self.coco_ids[contiguous_id - 1]

    def name(self, contiguous_id: int) -> str:
        """Category name of a contiguous id (1..C)."""
        return self.names[contiguous_id - 1]

    @property
    def _forward(self) -> dict[int, int]:
        return {coco_id: k + 1 for k, coco_id in enumerate(self.coco_ids)}

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON form kept in the shard manifest: one entry per class."""
        return [
            {"contiguous_id": k + 1, "coco_id": coco_id, "name": name}
            for k, (coco_id, name) in enumerate(zip(self.coco_ids, self.names))
        ]

    @classmethod
    def from_dict(cls, entries: list[dict[str, Any]]) -> CategoryMap:
        """Inverse of `to_dict`."""
        ordered = sorted(entries, key=lambda e: e["contiguous_id"])
        if [e["contiguous_id"] for e in ordered] != list(range(1, len(ordered) + 1)):
            raise ValueError("category map: contiguous ids are not 1..C")
        return cls(tuple(int(e["coco_id"]) for e in ordered), tuple(e["name"] for e in ordered))


@dataclass
class Rejection:
    """One input record that is not written to the shards, and why."""

    kind: str  # "image" | "annotation"
    index: int  # position in the JSON's `images` / `annotations` array
    id: Any  # the record's `id` (None when missing)
    code: str  # short key, e.g. "missing_file", "unknown_category"
    reason: str  # full human-readable reason
    image_id: Any = None
    file_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest (image fields only where they apply)."""
        out = {"kind": self.kind, "index": self.index, "id": self.id, "code": self.code}
        if self.kind == "annotation":
            out["image_id"] = self.image_id
        else:
            out["file_name"] = self.file_name
        out["reason"] = self.reason
        return out


@dataclass
class ImageRecord:
    """A structurally valid image record and its structurally valid annotations."""

    index: int
    image_id: int
    file_name: str
    width: int
    height: int
    annotations: list[dict[str, Any]] = field(default_factory=list)  # each gets "_index"


@dataclass
class CocoIndex:
    """The checked content of an annotation file, ready for per-image processing."""

    categories: CategoryMap
    images: list[ImageRecord]  # in file order
    rejections: list[Rejection]
    images_in: int
    annotations_in: int


def load_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read an annotation file; raise `CocoFormatError` naming the file and the problem.

    Requires a top-level object with an `images` list and a `categories` list; a missing
    `annotations` key means no annotations (as in COCO's test-set image-info files).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CocoFormatError(path, "annotation file not found") from None
    except OSError as e:
        raise CocoFormatError(path, f"cannot read annotation file: {e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CocoFormatError(path, f"not valid JSON: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CocoFormatError(
            path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise CocoFormatError(path, f"expected a JSON object at the top, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise CocoFormatError(path, f"lacks the '{key}' key (not a COCO instances file?)")
        if not isinstance(data[key], list):
            raise CocoFormatError(path, f"'{key}' must be a list, got {type(data[key]).__name__}")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise CocoFormatError(path, "'annotations' must be a list")
    return data


def _category_map(categories: list[Any], path: str) -> CategoryMap:
    seen: set[int] = set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or "name" not in cat:
            raise CocoFormatError(path, f"categories[{i}] needs an integer 'id' and a 'name'")
        if cat["id"] in seen:
            raise CocoFormatError(path, f"categories[{i}]: duplicate category id {cat['id']}")
        seen.add(cat["id"])
    if not categories:
        raise CocoFormatError(path, "'categories' is empty")
    return CategoryMap.from_categories(categories)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_image(img: Any) -> str | None:
    """Reason an image record is structurally invalid, or None."""
    if not isinstance(img, dict):
        return "image record is not a JSON object"
    if not _is_int(img.get("id")):
        return f"missing or non-integer 'id' ({img.get('id')!r})"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return "missing or empty 'file_name'"
    for key in ("width", "height"):
        if not _is_int(img.get(key)) or img[key] <= 0:
            return f"missing or invalid '{key}' ({img.get(key)!r})"
    return None


def check_segmentation(segmentation: Any, height: int, width: int) -> None:
    """Structural checks of a COCO segmentation; raise `AnnotationError` when invalid.

    Polygons need >= 3 finite points each (pycocotools would read a 2-point polygon as a
    box); RLE needs `size` equal to the image's [height, width]; uncompressed counts must be
    non-negative and add up to height x width.
    """
    if segmentation is None or segmentation == [] or segmentation == {}:
        raise AnnotationError("missing_segmentation", "missing segmentation")
    if isinstance(segmentation, list):
        for k, poly in enumerate(segmentation):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise AnnotationError("bad_polygon", f"polygon {k} is not a list of numbers")
            if not all(math.isfinite(v) for v in poly):
                raise AnnotationError(
                    "non_finite", f"polygon {k} has non-finite coordinates (NaN or inf)"
                )
            if len(poly) % 2:
                raise AnnotationError(
                    "bad_polygon", f"polygon {k} has an odd number of coordinates ({len(poly)})"
                )
            if len(poly) < 6:
                raise AnnotationError(
                    "short_polygon", f"polygon {k} has {len(poly) // 2} points (< 3)"
                )
        return
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise AnnotationError(
            "bad_segmentation", "segmentation is neither a polygon list nor an RLE object"
        )
    size = segmentation.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise AnnotationError("bad_rle", f"RLE 'size' must be [height, width], got {size!r}")
    if size != [height, width]:
        raise AnnotationError(
            "rle_size_mismatch",
            f"RLE size {size} (height, width) differs from the image's [{height}, {width}]",
        )
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            raise AnnotationError("bad_rle", "uncompressed RLE counts must be integers >= 0")
        if sum(counts) != height * width:
            raise AnnotationError(
                "bad_rle",
                f"uncompressed RLE counts add up to {sum(counts)}, expected {height * width}",
            )
    elif not isinstance(counts, str | bytes):
        raise AnnotationError("bad_rle", f"RLE 'counts' has type {type(counts).__name__}")


def check_annotation(
    ann: Any, images: dict[int, ImageRecord], categories: CategoryMap
) -> tuple[str, str] | None:
    """(code, reason) why an annotation record is structurally invalid, or None.

    Checks what can be checked without pixels: the ids, the category, the segmentation's
    structure and a finite bbox (when present).
    """
    if not isinstance(ann, dict):
        return "bad_record", "annotation record is not a JSON object"
    image_id = ann.get("image_id")
    if image_id not in images or not _is_int(image_id):
        return "unknown_image", f"unknown image id {image_id!r}"
    category_id = ann.get("category_id")
    if not _is_int(category_id) or category_id not in categories.coco_ids:
        return "unknown_category", f"unknown category id {category_id!r}"
    if ann.get("iscrowd", 0) not in (0, 1):  # also accepts False/True
        return "bad_iscrowd", f"iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}"
    bbox = ann.get("bbox")
    if bbox is not None and (
        not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox)
    ):
        return "bad_bbox", f"bbox must be 4 numbers, got {bbox!r}"
    if bbox is not None and not all(math.isfinite(v) for v in bbox):
        return "non_finite", f"bbox has non-finite coordinates {bbox}"
    image = images[image_id]
    try:
        check_segmentation(ann.get("segmentation"), image.height, image.width)
    except AnnotationError as e:
        return e.code, e.reason
    return None


def index_coco(data: dict[str, Any], path: str | os.PathLike = "<annotations>") -> CocoIndex:
    """Check every record of a loaded annotation file and group annotations per image.

    Raises `CocoFormatError` for problems of the file as a whole (bad categories); every bad
    image or annotation record becomes a `Rejection`, nothing is dropped silently. The
    annotations of a rejected image record are rejected with that image's reason.
    """
    path = str(path)
    categories = _category_map(data["categories"], path)
    rejections: list[Rejection] = []
    images: dict[int, ImageRecord] = {}
    rejected_images: dict[Any, str] = {}  # image id -> reason, for their annotations
    for i, img in enumerate(data["images"]):
        reason = _check_image(img)
        code = "bad_image_record"
        if reason is None and img["id"] in images:
            code, reason = "duplicate_image", f"duplicate image id {img['id']}"
        if reason is not None:
            image_id = img.get("id") if isinstance(img, dict) else None
            file_name = img.get("file_name") if isinstance(img, dict) else None
            rejections.append(Rejection("image", i, image_id, code, reason, file_name=file_name))
            if _is_int(image_id) and image_id not in images:
                rejected_images[image_id] = reason
            continue
        images[img["id"]] = ImageRecord(i, img["id"], img["file_name"], img["width"], img["height"])

    seen_ann_ids: dict[Any, int] = {}
    for i, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        problem: tuple[str, str] | None
        if _is_int(image_id) and image_id in rejected_images and image_id not in images:
            problem = "image_rejected", f"image rejected: {rejected_images[image_id]}"
        elif ann_id is not None and ann_id in seen_ann_ids:
            problem = (
                "duplicate_annotation",
                (f"duplicate annotation id {ann_id} (first at index {seen_ann_ids[ann_id]})"),
            )
        else:
            problem = check_annotation(ann, images, categories)
        if problem is not None:
            rejections.append(Rejection("annotation", i, ann_id, *problem, image_id=image_id))
            continue
        if ann_id is not None:
            seen_ann_ids[ann_id] = i
        images[image_id].annotations.append({**ann, "_index": i})
    return CocoIndex(
        categories=categories,
        images=sorted(images.values(), key=lambda r: r.index),
        rejections=rejections,
        images_in=len(data["images"]),
        annotations_in=len(data["annotations"]),
    )


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths (int64, background first) of COCO compressed RLE counts, vectorised.

    Raises `AnnotationError` when the string is not a valid encoding (a bad character, a
    truncated last run, or a negative run).
    """
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if len(c) == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() >= 64 or c[-1] & 0x20:
        raise AnnotationError("bad_rle", "compressed RLE counts are malformed")
    last = np.flatnonzero((c & 0x20) == 0)  # last character of each run
    first = np.r_[0, last[:-1] + 1]
    shift = 5 * (np.arange(len(c)) - np.repeat(first, last - first + 1))
    x = np.add.reduceat((c & 0x1F) << shift, first)
    negative = (c[last] & 0x10) != 0  # sign bit of the last 5-bit group
    x[negative] |= -1 << (shift[last[negative]] + 5)
    runs = x.copy()  # runs[m] = x[m] + runs[m - 2] for m > 2 (delta coding)
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    if (runs < 0).any():
        raise AnnotationError("bad_rle", "compressed RLE counts are malformed")
    return runs


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A compressed pycocotools RLE of a checked segmentation (polygons are merged)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    total = int(rle_counts(counts).sum())
    if total != height * width:
        raise AnnotationError(
            "bad_rle", f"compressed RLE counts add up to {total}, expected {height * width}"
        )
    return {"size": [height, width], "counts": counts}


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Binary mask (uint8 [height, width]) of a segmentation; `AnnotationError` if empty."""
    check_segmentation(segmentation, height, width)
    mask = mask_utils.decode(to_rle(segmentation, height, width))
    if not mask.any():
        raise AnnotationError("zero_area", "zero-area mask")
    return np.ascontiguousarray(mask)


def rle_pixels(counts: str | bytes, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the foreground pixels of a compressed RLE mask of the given height,
    in column-major order; the cost grows with the object's area, not the image's."""
    runs = rle_counts(counts)
    ends = np.cumsum(runs)
    fg_start, fg_len = (ends - runs)[1::2], runs[1::2]
    total = int(fg_len.sum())
    pos = np.repeat(fg_start - (np.cumsum(fg_len) - fg_len), fg_len) + np.arange(total)
    return pos % height, pos // height


def _resample_crop(
    rows: np.ndarray, cols: np.ndarray, height: int, width: int, out_height: int, out_width: int
) -> np.ndarray:
    """Resize the mask with foreground pixels (rows, cols) from height x width to the output
    size like PIL resizes the image (bilinear, antialiased), threshold 0.5.

    Only a crop around the object is resampled, with the same pixel mapping as a resize of
    the whole image, so the cost grows with the object, not the image. Returns uint8
    [out_height, out_width] in Fortran order (what pycocotools encodes without a copy).
    """
    out = np.zeros((out_height, out_width), np.uint8, order="F")
    if len(rows) == 0:
        return out
    sx, sy = width / out_width, height / out_height  # source pixels per output pixel
    # Output region the object can touch (one extra pixel for the filter support).
    ox0 = max(0, math.floor(cols.min() / sx) - 1)
    ox1 = min(out_width, math.ceil((cols.max() + 1) / sx) + 1)
    oy0 = max(0, math.floor(rows.min() / sy) - 1)
    oy1 = min(out_height, math.ceil((rows.max() + 1) / sy) + 1)
    # Source crop covering that region plus the filter support.
    mx, my = math.ceil(sx) + 1, math.ceil(sy) + 1
    cx0, cx1 = max(0, math.floor(ox0 * sx) - mx), min(width, math.ceil(ox1 * sx) + mx)
    cy0, cy1 = max(0, math.floor(oy0 * sy) - my), min(height, math.ceil(oy1 * sy) + my)
    crop = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
    crop[rows - cy0, cols - cx0] = 255
    box = (ox0 * sx - cx0, oy0 * sy - cy0, ox1 * sx - cx0, oy1 * sy - cy0)
    resized = Image.fromarray(crop).resize(
        (ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=box
    )
    out[oy0:oy1, ox0:ox1] = np.asarray(resized) >= 128
    return out


def resize_mask(mask: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """Resize a binary uint8 [H, W] mask as PIL resizes the image (bilinear, threshold 0.5)."""
    height, width = mask.shape
    if (out_height, out_width) == (height, width):
        return mask.astype(np.uint8, copy=False)
    rows, cols = np.nonzero(mask)
    return _resample_crop(rows, cols, height, width, out_height, out_width)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image; 16/32-bit grayscale is scaled linearly from 0..65535."""
    if image.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs open as one of these)
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) with the longer side <= max_size, aspect kept, never upscaled."""
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_rle(
    counts: str | bytes, height: int, width: int, out_height: int, out_width: int
) -> np.ndarray:
    """`resize_mask` of a compressed RLE without decoding the full-size mask: the
    foreground pixels come straight from the runs (cost grows with the object's area)."""
    rows, cols = rle_pixels(counts, height)
    return _resample_crop(rows, cols, height, width, out_height, out_width)


def encode_rle(mask: np.ndarray) -> str:
    """COCO compressed RLE counts (ASCII string) of a binary uint8 [H, W] mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return rle["counts"].decode("ascii")


def decode_rle(counts: str | bytes, height: int, width: int) -> np.ndarray:
    """Binary uint8 [height, width] mask of compressed RLE counts written by `encode_rle`."""
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [height, width], "counts": counts})


def decode_rles(counts: list[str | bytes], height: int, width: int) -> np.ndarray:
    """Masks uint8 [N, height, width] (C-contiguous) of N compressed RLE counts."""
    if len(counts) == 0:
        return np.zeros((0, height, width), np.uint8)
    rles = [
        {"size": [height, width], "counts": c.encode("ascii") if isinstance(c, str) else c}
        for c in counts
    ]
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))  # N x H x W


def rle_box(counts: str | bytes, height: int, width: int) -> list[float]:
    """Tight xyxy box of an RLE mask, COCO convention (x1 = last column + 1)."""
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    x, y, w, h = mask_utils.toBbox({"size": [height, width], "counts": counts}).tolist()
    return [x, y, x + w, y + h]
