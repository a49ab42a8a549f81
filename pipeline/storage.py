"""Local paths and cloud URIs (`s3://`, `gs://`, ...) through one door: pyarrow's filesystems.

pyarrow (and through it Ray Train and Ray Data) reads the endpoint and credentials the way
AWS tools do: `AWS_ENDPOINT_URL` for an S3-compatible server (MinIO, Ceph, R2, a loopback
test server), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_REGION`, or an instance
profile. Nothing here adds a flag of its own.

    fs, path = filesystem("s3://bucket/runs")
    local = fetch_checkpoint("s3://bucket/runs/r1/checkpoint_epoch_0009", "/tmp/ckpt")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.fs

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# pyarrow's filesystem type names -> the URI scheme users write
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}


class StorageError(FileNotFoundError):
    """A path or URI cannot be read: missing, or the storage cannot be reached."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` other than `file://` (which is a local path)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def filesystem(path: str | os.PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI."""
    text = str(path)
    if "://" in text:
        return pyarrow.fs.FileSystem.from_uri(text)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(text)


def uri(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """The URI of `path` in `fs` (a plain path for the local filesystem): what Ray Train's
    `Checkpoint.path` lacks for cloud storage (`bucket/key` there)."""
    scheme = _SCHEMES.get(fs.type_name)
    if scheme is None:
        return path
    return f"{scheme}://{path.lstrip('/')}"


def fetch_checkpoint(source: str, dst_dir: str | os.PathLike) -> Path:
    """Download a checkpoint file, or a Ray Train checkpoint directory's `checkpoint.pt`, from
    a URI into `dst_dir`; returns the local file. Raises StorageError naming the URI."""
    try:
        fs, path = filesystem(source)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise StorageError(f"{source}: cannot reach the storage: {e}") from e
    if info.type == pyarrow.fs.FileType.Directory:
        path = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
        info = fs.get_file_info(path)
    if info.type != pyarrow.fs.FileType.File:
        raise StorageError(f"{source}: checkpoint not found")
    local = Path(dst_dir) / Path(path).name
    local.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(
        path, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()
    )
    logger.info("checkpoint %s -> %s (%.1f MB)", source, local, local.stat().st_size / 1e6)
    return local
