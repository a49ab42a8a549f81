"""Ray Data preprocessing of a COCO dataset into Parquet shards plus a manifest.

`prepare(annotations, images_dir, out_dir, PrepareConfig(max_size=512))` reads the
annotation JSON once on the driver (`pipeline.coco`), checks every record, groups the
annotations per image, and hands one record per image to Ray Data (`from_items` +
`map_batches`): the workers read and validate each image, convert it to RGB, resize it so
the longer side is <= `max_size` (aspect kept), rasterise and resize its masks, and return
one row per image with a status. The processed rows are materialised once in the object
store (Ray spills to disk beyond its size) so that the status columns can be gathered on
the driver before the write; rejected rows are listed in the manifest and the good ones
written with `write_parquet`, in input order, so the same input and config give the same
shard files byte for byte.

Layout of `out_dir`::

    manifest.json            source fingerprint, config, category map, counts, shard list,
                             every rejected record with its reason
    shard-00000-0.parquet    a few hundred rows each (PrepareConfig.rows_per_shard)
    ...

Shard schema (one row per image; coordinates and masks at the resized size):

    image_id      int64
    file_name     string                    as in the annotation file
    image         binary                    JPEG, RGB, quality 95 (see below)
    orig_height   int32, orig_width int32   size in the annotation file / on disk
    height        int32, width int32        size of `image` (longer side <= max_size)
    labels        list<int32>               contiguous class ids 1..C (0 = background)
    boxes         list<fixed_size_list<float32, 4>>
                                            xyxy, tight box of the resized mask, COCO
                                            convention: x1 = last mask column + 1
    iscrowd       list<bool>                crowd regions: ignored by training losses,
                                            used by COCOeval
    masks         list<string>              COCO compressed RLE counts at height x width
    ann_ids       list<int64>               the annotations' `id` (null when absent)
    areas         list<float32>             mask area in pixels at height x width

Images are stored as JPEG (quality 95): decoding is several times faster than PNG at a
fraction of the size, which is what the training reader pays for every epoch; the loss is
below the noise of the augmentation. An image that needs no resizing and already is an RGB
JPEG is copied byte for byte (no second generation loss). Boxes come from the masks, so
they always agree with them; the JSON's `bbox` is only checked to be finite.

Rejections (image: missing file, undecodable, size differs from the JSON; annotation:
unknown ids, malformed or empty segmentation, mask vanishing at the resized size, ...)
carry a short `code` and a full `reason`. The counts reconcile:
`images_in = images_written + images_rejected` and the same for annotations.

Re-running with the same source fingerprint (hash of the annotation file and of the image
folder's file list with sizes and mtimes) and config reuses the shards; `force=True`
rebuilds. Shards are written to a temporary sibling folder that replaces `out_dir` only
when complete, so an interrupted run never leaves a half-valid `out_dir`.

`out_dir` is a folder every Ray node writes to (local for one machine) or a cloud URI
(`s3://bucket/shards/train`, the endpoint from `AWS_ENDPOINT_URL` as AWS tools read it).
On cloud storage the shards are written to a temporary sibling prefix, then moved into
place with the manifest last (object stores have no folder rename): a folder without its
manifest is never taken for shards. The ground truth travels with them there
(`annotations.json`, named by the manifest's `source.annotations_copy`), so that any node
can score predictions on them (`ground_truth`).
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray
from PIL import Image
from pycocotools import mask as mask_utils
from ray.data.datasource import FilenameProvider, SaveMode
from ray.data.expressions import col

from pipeline import storage
from pipeline.coco import (
    AnnotationError,
    CocoFormatError,
    CocoIndex,
    Rejection,
    index_coco,
    load_coco_json,
    resize_rle,
    resized_size,
    rle_box,
    to_rgb,
    to_rle,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GROUND_TRUTH_COPY = "annotations.json"  # beside shards on cloud storage
SHARD_PATTERN = "shard-*.parquet"

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("image", pa.binary()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("labels", pa.list_(pa.int32())),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("iscrowd", pa.list_(pa.bool_())),
        ("masks", pa.list_(pa.string())),
        ("ann_ids", pa.list_(pa.int64())),
        ("areas", pa.list_(pa.float32())),
    ]
)
"""Columns of the Parquet shards (see the module docstring)."""

_STATUS_FIELDS = [
    ("index", pa.int64()),  # position of the image record in the JSON's `images`
    ("status", pa.string()),  # "ok" | "rejected"
    ("code", pa.string()),
    ("reason", pa.string()),
    ("ann_rejects", pa.string()),  # JSON list of Rejection dicts for this image's annotations
]
_WORKER_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [pa.field(n, t) for n, t in _STATUS_FIELDS])
_IMAGES_PER_BLOCK = 16  # input records per Ray Data block in the preprocessing pass
_ROW_GROUP_ROWS = 32  # Parquet row group: readers stream a shard in pieces of this size


class PrepareError(Exception):
    """prepare() cannot run: missing image folder, unusable output folder."""


@dataclass(frozen=True)
class PrepareConfig:
    """What the shards depend on besides the input (recorded in the manifest)."""

    max_size: int = 512  # longer side after resize (aspect kept); never upscaled
    jpeg_quality: int = 95
    rows_per_shard: int = 256


@dataclass
class PrepareResult:
    """What prepare() did: where the shards are, their manifest, and whether it reused them."""

    out_dir: Path | str  # a local folder or a URI, as given
    manifest: dict[str, Any]
    reused: bool
    seconds: float
    rebuild_reason: str | None = None  # why the shards were (re)built, None when reused


def fingerprint_source(annotations: str | os.PathLike, images_dir: str | os.PathLike) -> str:
    """SHA-256 of the annotation file's bytes and the image folder's files (names, sizes,
    mtimes); cheap enough to run before every prepare, and changes with any input edit."""
    digest = hashlib.sha256()
    with open(annotations, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    images_dir = Path(images_dir)
    entries = []
    for root, _dirs, files in os.walk(images_dir):
        for name in files:
            path = Path(root, name)
            st = path.stat()
            entries.append(
                f"{path.relative_to(images_dir).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}"
            )
    digest.update("\n".join(sorted(entries)).encode())
    return digest.hexdigest()


def read_manifest(shards_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shards folder (local or a URI); `PrepareError` when there is none."""
    path = storage.join(shards_dir, MANIFEST_NAME)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise PrepareError(f"{path}: no manifest (not a shards folder, run prepare)") from None
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: corrupt manifest: {e}") from None
    except (OSError, ValueError) as e:
        raise PrepareError(f"{path}: cannot read the manifest: {e}") from None


def ground_truth(shards_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> str:
    """The COCO annotation file the shards were made from: the copy stored beside shards on
    cloud storage, else the source file prepare read (a path on the machine that ran it)."""
    source = (manifest or read_manifest(shards_dir)).get("source", {})
    if source.get("annotations_copy"):
        return storage.join(shards_dir, source["annotations_copy"])
    if not source.get("annotations"):
        raise PrepareError(f"{shards_dir}: the manifest names no source annotation file")
    return source["annotations"]


def _reuse_problem(
    out_dir: Path | str, fingerprint: str, config: PrepareConfig, force: bool
) -> str | None:
    """Why the shards in `out_dir` cannot be reused (None when they can)."""
    if force:
        return "--force given"
    fs, path = storage.filesystem(out_dir)
    if fs.get_file_info(storage.join(path, MANIFEST_NAME)).type != pyarrow.fs.FileType.File:
        return "no previous shards"
    try:
        manifest = read_manifest(out_dir)
    except PrepareError as e:
        return str(e)
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"shard format changed ({manifest.get('format_version')} -> {FORMAT_VERSION})"
    if manifest.get("source", {}).get("fingerprint") != fingerprint:
        return "input changed (annotation file or image folder)"
    if manifest.get("config") != asdict(config):
        return f"config changed ({manifest.get('config')} -> {asdict(config)})"
    expected = {shard["file"]: shard["bytes"] for shard in manifest.get("shards", [])}
    if manifest["source"].get("annotations_copy"):
        expected[manifest["source"]["annotations_copy"]] = None  # any size
    for name, size in expected.items():
        info = fs.get_file_info(storage.join(path, name))
        if info.type != pyarrow.fs.FileType.File or size not in (None, info.size):
            return f"{name} missing or modified"
    return None


def _check_out_dir(out_dir: Path | str) -> None:
    """Refuse to replace a folder that is not ours (it would be deleted)."""
    fs, path = storage.filesystem(out_dir)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.File:
        raise PrepareError(f"{out_dir}: exists and is not a folder")
    if info.type != pyarrow.fs.FileType.Directory:
        return
    names = {entry.base_name for entry in fs.get_file_info(pyarrow.fs.FileSelector(path))}
    if names and MANIFEST_NAME not in names:
        raise PrepareError(
            f"{out_dir}: exists, is not empty and has no {MANIFEST_NAME}; refusing to replace "
            "it (choose an empty or new output folder)"
        )


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set, else starts a local instance


def prepare(
    annotations: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PrepareConfig | None = None,
    force: bool = False,
) -> PrepareResult:
    """Build (or reuse) the Parquet shards of a COCO dataset; see the module docstring.

    Raises `pipeline.coco.CocoFormatError` when the annotation file is unusable and
    `PrepareError` when the image folder is missing or `out_dir` is not replaceable.
    """
    start = time.perf_counter()
    config = config or PrepareConfig()
    annotations, images_dir = Path(annotations), Path(images_dir)
    remote = storage.is_uri(out_dir)
    out_dir = str(out_dir).rstrip("/") if remote else Path(out_dir)
    if not images_dir.is_dir():
        raise PrepareError(f"{images_dir}: image folder not found")
    if not annotations.is_file():
        raise CocoFormatError(annotations, "annotation file not found")
    _check_out_dir(out_dir)
    fingerprint = fingerprint_source(annotations, images_dir)
    problem = _reuse_problem(out_dir, fingerprint, config, force)
    if problem is None:
        manifest = read_manifest(out_dir)
        logger.info("Reusing shards in %s (same input and config)", out_dir)
        return PrepareResult(out_dir, manifest, True, time.perf_counter() - start)
    logger.info("Building shards in %s: %s", out_dir, problem)

    data = load_coco_json(annotations)
    index = index_coco(data, annotations)
    del data
    logger.info(
        "%s: %d images, %d annotations, %d categories; %d records rejected on reading",
        annotations,
        index.images_in,
        index.annotations_in,
        index.categories.num_classes,
        len(index.rejections),
    )
    fs, out_path = storage.filesystem(out_dir)
    tmp_path = storage.join(
        os.path.dirname(out_path), f".{os.path.basename(out_path)}.tmp-{uuid.uuid4().hex[:8]}"
    )
    try:
        manifest = _build(index, images_dir, fs, tmp_path, config)
        fs.create_dir(tmp_path, recursive=True)  # made by the shards' write, if any
        manifest["source"] = {
            "annotations": str(annotations.resolve()),
            "images_dir": str(images_dir.resolve()),
            "fingerprint": fingerprint,
        }
        if remote:  # the ground truth travels with the shards (see the module docstring)
            pyarrow.fs.copy_files(
                str(annotations.resolve()),
                storage.join(tmp_path, GROUND_TRUTH_COPY),
                source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=fs,
            )
            manifest["source"]["annotations_copy"] = GROUND_TRUTH_COPY
        manifest = _ordered_manifest(manifest)
        storage.write_text(
            storage.uri(fs, storage.join(tmp_path, MANIFEST_NAME)),
            json.dumps(manifest, indent=1) + "\n",
        )
        if remote:
            _replace_objects(fs, tmp_path, out_path)
        else:
            _replace_dir(Path(tmp_path), Path(out_path))
    finally:
        _remove_quietly(fs, tmp_path)
    seconds = time.perf_counter() - start
    counts = manifest["counts"]
    logger.info(
        "Wrote %d images (%d rejected) and %d annotations (%d rejected) to %d shards in %.1f s",
        counts["images_written"],
        counts["images_rejected"],
        counts["annotations_written"],
        counts["annotations_rejected"],
        len(manifest["shards"]),
        seconds,
    )
    return PrepareResult(out_dir, manifest, False, seconds, rebuild_reason=problem)


def _replace_dir(new: Path, target: Path) -> None:
    """Move a complete `new` folder to `target`, replacing it with two renames."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_quietly(fs: pyarrow.fs.FileSystem, folder: str) -> None:
    """Remove a temporary folder if it is still there (after a failure: never raises)."""
    try:
        if fs.get_file_info(folder).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(folder)
    except OSError as e:
        logger.warning("could not remove the temporary folder %s: %s", folder, e)


def _replace_objects(fs: pyarrow.fs.FileSystem, new: str, target: str) -> None:
    """`_replace_dir` on an object store: the old manifest goes first and the new one comes
    last, so that an interrupted replacement leaves a prefix that no reader takes for shards
    (and that `prepare` rebuilds)."""
    if fs.get_file_info(target).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir_contents(target)  # ours: `_check_out_dir` found our manifest or nothing
    entries = fs.get_file_info(pyarrow.fs.FileSelector(new))
    entries.sort(key=lambda entry: entry.base_name == MANIFEST_NAME)
    for entry in entries:
        fs.move(entry.path, storage.join(target, entry.base_name))


def _build(
    index: CocoIndex,
    images_dir: Path,
    fs: pyarrow.fs.FileSystem,
    tmp_dir: str,
    config: PrepareConfig,
) -> dict:
    """Run the Ray Data pass, write the good rows into the new folder `tmp_dir` of `fs`
    (which must not exist yet), and return the manifest (sans source)."""
    items = [
        {
            "index": rec.index,
            "image_id": rec.image_id,
            "file_name": rec.file_name,
            "width": rec.width,
            "height": rec.height,
            "anns": json.dumps(rec.annotations),
        }
        for rec in index.images
    ]
    ctx = ray.data.DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shards in input order: deterministic output
    try:
        rows: list[dict[str, Any]] = []
        shards: list[dict[str, Any]] = []
        if items:
            _ensure_ray()
            ds = ray.data.from_items(
                items, override_num_blocks=max(1, math.ceil(len(items) / _IMAGES_PER_BLOCK))
            )
            processed = ds.map_batches(
                process_batch,
                batch_format="pyarrow",
                batch_size=4,
                fn_kwargs={
                    "images_dir": str(images_dir),
                    "category_ids": list(index.categories.coco_ids),
                    "max_size": config.max_size,
                    "jpeg_quality": config.jpeg_quality,
                },
            ).materialize()
            rows = processed.select_columns(
                ["index", "image_id", "file_name", "iscrowd", "status", "code", "reason"]
                + ["ann_rejects"]
            ).take_all()
            n_ok = sum(r["status"] == "ok" for r in rows)
            if n_ok:
                good = processed.filter(expr=col("status") == "ok").drop_columns(
                    [n for n, _ in _STATUS_FIELDS]
                )
                good.repartition(max(1, math.ceil(n_ok / config.rows_per_shard))).write_parquet(
                    storage.uri(fs, tmp_dir),
                    filename_provider=_ShardNames(),
                    # a new folder: stable shard names need no write id there, and nothing is
                    # replaced (Ray Data warns on every "overwrite" of a folder that exists)
                    mode=SaveMode.CREATE,
                    row_group_size=_ROW_GROUP_ROWS,
                )
            shards = _list_shards(fs, tmp_dir)
    finally:
        ctx.execution_options.preserve_order = saved_order
    return _manifest_body(index, rows, shards, config)


class _ShardNames(FilenameProvider):
    """shard-<write task index>-<file index>.parquet: stable names in input order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"shard-{task_index:05d}-{{i}}.parquet"


def _list_shards(fs: pyarrow.fs.FileSystem, folder: str) -> list[dict[str, Any]]:
    entries = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    shards = []
    for entry in sorted(entries, key=lambda entry: entry.base_name):
        if fnmatch.fnmatch(entry.base_name, SHARD_PATTERN):
            rows = pq.read_metadata(entry.path, filesystem=fs).num_rows
            shards.append({"file": entry.base_name, "rows": rows, "bytes": entry.size})
    return shards


def _manifest_body(
    index: CocoIndex, rows: list[dict[str, Any]], shards: list[dict[str, Any]], config
) -> dict[str, Any]:
    """Counts and rejections from the driver-side checks plus the workers' status rows."""
    rejected = [r.to_dict() for r in index.rejections]
    images_written = annotations_written = crowd_written = negatives = 0
    for row in rows:
        rejected.extend(json.loads(row["ann_rejects"]))
        if row["status"] == "ok":
            images_written += 1
            annotations_written += len(row["iscrowd"])
            crowd_written += sum(row["iscrowd"])
            negatives += len(row["iscrowd"]) == 0
        else:
            rejected.append(
                Rejection(
                    "image",
                    row["index"],
                    row["image_id"],
                    row["code"],
                    row["reason"],
                    file_name=row["file_name"],
                ).to_dict()
            )
    rejected.sort(key=lambda r: (r["kind"] != "image", r["index"]))
    images_rejected = sum(r["kind"] == "image" for r in rejected)
    annotations_rejected = sum(r["kind"] == "annotation" for r in rejected)
    counts = {
        "images_in": index.images_in,
        "images_written": images_written,
        "images_rejected": images_rejected,
        "annotations_in": index.annotations_in,
        "annotations_written": annotations_written,
        "annotations_rejected": annotations_rejected,
        "negative_images_written": negatives,
        "crowd_annotations_written": crowd_written,
        "shards": len(shards),
        "shard_rows": sum(s["rows"] for s in shards),
    }
    if (
        images_written + images_rejected != index.images_in
        or (annotations_written + annotations_rejected != index.annotations_in)
        or counts["shard_rows"] != images_written
    ):
        raise RuntimeError(f"prepare: counts do not reconcile (a bug): {counts}")
    return {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "categories": index.categories.to_dict(),
        "counts": counts,
        "rejections_by_code": dict(
            sorted(collections.Counter(f"{r['kind']}:{r['code']}" for r in rejected).items())
        ),
        "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "shards": shards,
        "rejected": rejected,
    }


def _ordered_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ["format_version", "source", "config", "categories", "counts", "rejections_by_code"]
    keys += ["schema", "shards", "rejected"]
    return {k: manifest[k] for k in keys}


# ---------------------------------------------------------------- Ray Data worker side


def process_batch(
    batch: pa.Table,
    images_dir: str,
    category_ids: list[int],
    max_size: int,
    jpeg_quality: int,
) -> pa.Table:
    """`map_batches` function: image records in, one shard row (with status) per image out."""
    contiguous = {coco_id: k + 1 for k, coco_id in enumerate(category_ids)}
    rows = [
        process_image(rec, Path(images_dir), contiguous, max_size, jpeg_quality)
        for rec in batch.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=_WORKER_SCHEMA)


def _empty_row(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "image_id": rec["image_id"],
        "file_name": rec["file_name"],
        "image": b"",
        "orig_height": rec["height"],
        "orig_width": rec["width"],
        "height": 0,
        "width": 0,
        "labels": [],
        "boxes": [],
        "iscrowd": [],
        "masks": [],
        "ann_ids": [],
        "areas": [],
        "index": rec["index"],
        "status": "ok",
        "code": "",
        "reason": "",
        "ann_rejects": "[]",
    }


def _reject_image(rec: dict[str, Any], anns: list[dict], code: str, reason: str) -> dict:
    row = _empty_row(rec)
    row.update(status="rejected", code=code, reason=reason)
    row["ann_rejects"] = json.dumps(
        [
            Rejection(
                "annotation",
                a["_index"],
                a.get("id"),
                "image_rejected",
                f"image rejected: {reason}",
                image_id=rec["image_id"],
            ).to_dict()
            for a in anns
        ]
    )
    return row


def process_image(
    rec: dict[str, Any],
    images_dir: Path,
    contiguous: dict[int, int],
    max_size: int,
    jpeg_quality: int,
) -> dict[str, Any]:
    """Validate, convert and resize one image and its annotations into a shard row."""
    anns = json.loads(rec["anns"])
    path = images_dir / rec["file_name"]
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _reject_image(rec, anns, "missing_file", "missing file")
    except OSError as e:
        return _reject_image(rec, anns, "unreadable_file", f"unreadable file: {e}")
    buffer = io.BytesIO(raw)
    try:
        image = Image.open(buffer)
        image.load()  # raises on truncated data
        source_format = image.format
    except Exception as e:  # PIL raises many types for corrupt files; the reason says which
        message = str(e).replace(repr(buffer), repr(rec["file_name"]))  # no memory address
        return _reject_image(
            rec, anns, "undecodable_image", f"undecodable image: {type(e).__name__}: {message}"
        )
    if image.size != (rec["width"], rec["height"]):
        return _reject_image(
            rec,
            anns,
            "size_mismatch",
            f"image size {image.width}x{image.height} differs from the annotation file's "
            f"{rec['width']}x{rec['height']} (width x height)",
        )
    row = _empty_row(rec)
    W, H = image.size  # noqa: N806 - original size
    w, h = resized_size(W, H, max_size)
    if (w, h) == (W, H) and source_format == "JPEG" and image.mode == "RGB":
        row["image"] = raw  # already what we would write: keep it, no generation loss
    else:
        rgb = to_rgb(image)
        if (w, h) != (W, H):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=jpeg_quality)
        row["image"] = buf.getvalue()
    row["height"], row["width"] = h, w

    rejects = []
    for ann in anns:
        try:
            counts, area = _instance_mask(ann["segmentation"], H, W, h, w)
        except AnnotationError as e:
            rejects.append((ann, e.code, e.reason))
            continue
        except Exception as e:  # a malformed record pycocotools chokes on
            rejects.append((ann, "bad_segmentation", f"{type(e).__name__}: {e}"))
            continue
        row["labels"].append(contiguous[ann["category_id"]])
        row["boxes"].append(rle_box(counts, h, w))
        row["iscrowd"].append(bool(ann.get("iscrowd", 0)))
        row["masks"].append(counts)
        row["ann_ids"].append(ann.get("id") if isinstance(ann.get("id"), int) else None)
        row["areas"].append(area)
    row["ann_rejects"] = json.dumps(
        [
            Rejection(
                "annotation", a["_index"], a.get("id"), code, reason, image_id=rec["image_id"]
            ).to_dict()
            for a, code, reason in rejects
        ]
    )
    return row


def _instance_mask(segmentation: Any, H: int, W: int, h: int, w: int) -> tuple[str, float]:  # noqa: N803
    """Compressed RLE counts and area of one instance at the resized size h x w."""
    rle = to_rle(segmentation, H, W)
    area = int(mask_utils.area(rle))
    if area == 0:
        raise AnnotationError("zero_area", "zero-area mask")
    if (h, w) == (H, W):
        counts = rle["counts"]
        return (counts.decode("ascii") if isinstance(counts, bytes) else counts), float(area)
    small = resize_rle(rle["counts"], H, W, h, w)
    small_rle = mask_utils.encode(small)
    small_area = int(mask_utils.area(small_rle))
    if small_area == 0:
        raise AnnotationError(
            "vanished", f"mask of {area} px vanishes when the image is resized to {w}x{h}"
        )
    return small_rle["counts"].decode("ascii"), float(small_area)
