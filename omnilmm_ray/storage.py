"""Thin helpers over fsspec: resolve URIs, fingerprint files, write objects atomically."""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI -> (filesystem, path). Credentials/endpoint come from the environment (AWS_ENDPOINT_URL, ...)."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path back to a full URI (fsspec strips the protocol)."""
    return fs.unstrip_protocol(path) if not isinstance(fs, LocalFileSystem) else path


def fingerprint(info: dict[str, Any]) -> str:
    """What identifies one version of a file: size plus version id, ETag or mtime (whichever the store gives)."""
    version = info.get("VersionId") or info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if not version:
        mtime = (
            info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified")
        )
        version = mtime.isoformat() if hasattr(mtime, "isoformat") else str(mtime)
    return f"{info.get('size')}:{str(version).strip(chr(34))}"


def read_whole(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """One whole object in one request. s3fs's `cat_file` asks for the size first (a HEAD before every GET,
    to split big objects into concurrent ranges: s3fs/core.py `_cat_file`); a read from byte 0 on is a
    single ranged GET on every fsspec store."""
    try:
        return fs.cat_file(path, start=0)
    except FileNotFoundError:
        raise
    except OSError:  # a store that refuses the range (an empty object may answer 416): the plain read
        return fs.cat_file(path)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the whole object or nothing.

    Object stores give this for free (a PUT or a completed multipart upload is atomic); a local or mounted
    filesystem needs a temporary name and a rename.
    """
    if isinstance(fs, LocalFileSystem):
        with open_atomic(fs, path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)  # one PUT


TMP_PREFIX = ".tmp-"  # a local atomic write in progress; one a crash interrupted is left under this name


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str):
    """A file to stream into that readers see whole or not at all (see write_bytes_atomic): a temporary name
    and a rename locally; on object stores the upload completes only when the file is closed."""
    if not isinstance(fs, LocalFileSystem):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            # fsspec's `with` would close, and so publish, what was written before the error (its
            # AbstractBufferedFile.__exit__ always calls close()); discard aborts the upload instead.
            f.discard()
            f.closed = True  # nor may garbage collection close it (AbstractBufferedFile.__del__)
            raise
        f.close()
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temp_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The temporary files of local atomic writes under `root`, at any depth: writes in progress, or ones a
    kill interrupted. Object stores have none (a PUT, or a multipart upload, is published whole or not)."""
    if not isinstance(fs, LocalFileSystem):
        return []
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.startswith(TMP_PREFIX)]


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def write_parquet_atomic(
    fs: fsspec.AbstractFileSystem, path: str, t: pa.Table, row_group_size: int | None = None
) -> None:
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes_atomic(fs, path, buf.getvalue())
