"""Local paths and cloud URIs (`s3://`, `gs://`, ...) through one door: pyarrow's filesystems.

pyarrow (and through it Ray Train and Ray Data) reads the endpoint and credentials the way
AWS tools do: `AWS_ENDPOINT_URL` for an S3-compatible server (MinIO, Ceph, R2, a loopback
test server), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_REGION`, or an instance
profile. Nothing here adds a flag of its own.

    fs, path = filesystem("s3://bucket/runs")
    local = fetch_checkpoint("s3://bucket/runs/r1/checkpoint_epoch_0009", "/tmp/ckpt")
    shard = open_parquet(join("s3://bucket/shards/train", "shard-00000-0.parquet"))
    gt = local_file("s3://bucket/shards/val/annotations.json")   # cached download
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import pyarrow.fs
import pyarrow.parquet as pq

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


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for a local path or a URI (where `os.path.join` would not do)."""
    text = str(base)
    if is_uri(text):
        return "/".join([text.rstrip("/"), *names])
    return os.path.join(text, *names)


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path`, a local path or a URI (`pathlib` would mangle `s3://`)."""
    text = str(path).rstrip("/")
    if is_uri(text):
        return text.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(text))


def read_text(path: str | os.PathLike) -> str:
    """The text of a local file or an object; FileNotFoundError when there is none."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a local file or an object (parents created as needed)."""
    fs, inner = filesystem(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    """A Parquet file, local or behind a URI, opened for reading (metadata, row groups)."""
    fs, inner = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))


def local_file(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path as is; an object behind a URI downloaded once into `cache_dir` (default:
    the system temp folder), keyed by its URI, size and modification time, so that a task
    that reads the same ground truth every epoch downloads it once per machine."""
    if not is_uri(path):
        return Path(path)
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type != pyarrow.fs.FileType.File:
        raise StorageError(f"{path}: not found")
    key = hashlib.sha256(f"{path}\t{info.size}\t{info.mtime_ns}".encode()).hexdigest()[:16]
    local = Path(cache_dir or tempfile.gettempdir()) / "pep-downloads" / key / Path(inner).name
    if not local.is_file() or local.stat().st_size != info.size:
        _download(fs, inner, local, str(path))
    return local


def _download(fs: pyarrow.fs.FileSystem, inner: str, local: Path, shown: str) -> None:
    """Copy one file of `fs` to `local` through a partial file: whole or absent, also with
    several readers on the machine."""
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f".{local.name}.{os.getpid()}")
    pyarrow.fs.copy_files(
        inner,
        str(partial),
        source_filesystem=fs,
        destination_filesystem=pyarrow.fs.LocalFileSystem(),
    )
    partial.replace(local)
    logger.info("%s -> %s (%.1f MB)", shown, local, local.stat().st_size / 1e6)


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
    _download(fs, path, local, f"checkpoint {source}")
    return local
