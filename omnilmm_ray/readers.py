"""Read one shard into sample rows: WebDataset tar, Parquet with image bytes, or a group of loose files.

Every image becomes exactly one row, numbered by `sample_index` in shard order; what cannot be read
becomes an error row. The last row of a shard is its end marker (see schema.py).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from omnilmm_ray import schema
from omnilmm_ray.config import InputConfig
from omnilmm_ray.sources import IMAGE_EXTS, INVALID_NAME, Shard, escape_name, load_listing
from omnilmm_ray.storage import join, read_whole, resolve

log = logging.getLogger(__name__)

BLOCK_ROWS = 64


def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    d, b = posixpath.split(name)
    stem, _, ext = b.partition(".")
    return posixpath.join(d, stem), ext.lower()


class ShardTruncated(Exception):
    """The shard's bytes end before its format says they should: an upload or copy cut short."""


class _CheckedTarInfo(tarfile.TarInfo):
    """Python's stream reader ends an archive quietly where a member header is missing, cut or corrupt, so a
    tar cut at a member boundary would read as a complete, shorter one. A tar is complete only when it ends
    with its end-of-archive marker: two zero blocks (writers may pad further with zeros)."""

    @classmethod
    def fromtarfile(cls, tar):
        at = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            second = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(second) < tarfile.BLOCKSIZE:
                raise ShardTruncated(
                    f"the tar ends at byte {tar.fileobj.tell()}, inside its end-of-archive marker at byte {at}"
                ) from None
            if second.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"a lone zero block at byte {at}, followed by data") from None
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            raise ShardTruncated(
                f"the tar ends at byte {tar.fileobj.tell()}, where a member header or the end-of-archive "
                f"marker should start (byte {at})"
            ) from None
        except tarfile.InvalidHeaderError as e:
            if at == 0:  # not a tar at all: tarfile says so
                raise
            raise tarfile.ReadError(f"invalid member header at byte {at}: {e}") from None


class _NotAFile:
    """A tar member that is no regular file (a symbolic or hard link, a device, a FIFO): never followed."""

    def __init__(self, m: tarfile.TarInfo):
        what = "a symbolic link" if m.issym() else "a hard link" if m.islnk() else "not a regular file"
        self.reason = f"tar member {escape_name(m.name)} is {what}"
        if m.issym() or m.islnk():
            self.reason += f" to {escape_name(m.linkname)}; links are not followed"


def _tar_samples(f, stats: dict) -> Iterator[dict]:
    """Consecutive members sharing a key form one sample (img2dataset's layout); a member repeating an
    extension the sample already has starts a new sample with the same key, so no image is dropped."""
    key, parts = None, {}

    def flush():
        images = [e for e in parts if e.rpartition(".")[2] in IMAGE_EXTS]
        img_ext = next(
            (e for e in images if not isinstance(parts[e], _NotAFile)), images[0] if images else None
        )
        if img_ext is None:
            stats["skipped_at"].append(stats["samples"])
            return None
        stats["samples"] += 1
        if (safe := escape_name(key)) != key:
            return {"key": safe, **schema.error("invalid_name", f"tar member name {safe!r} is not UTF-8")}
        if isinstance(parts[img_ext], _NotAFile):
            return {"key": key, **schema.error("not_a_file", parts[img_ext].reason)}
        side = {e: v for e, v in parts.items() if isinstance(v, bytes)}  # a linked sidecar is ignored
        return {
            "key": key,
            "image": parts[img_ext],
            "metadata": side["json"].decode("utf-8", "replace") if "json" in side else None,
            "text": side["txt"].decode("utf-8", "replace") if "txt" in side else None,
        }

    with tarfile.open(fileobj=f, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
        try:
            for m in tar:
                if m.isdir():
                    continue
                k, ext = _wds_key(m.name)
                if (k != key or ext in parts) and parts:
                    if (s := flush()) is not None:
                        yield s
                    parts = {}
                key = k
                if not m.isfile():
                    parts[ext] = _NotAFile(m)
                    continue
                pad = -m.size % tarfile.BLOCKSIZE
                try:
                    data = tar.extractfile(m).read()
                    # The padding to the next block is read here so that a cut inside it is seen too.
                    pad -= len(tar.fileobj.read(pad))
                except tarfile.ReadError:  # a cut inside the data (stream mode may also return it short)
                    data = b""
                end = tar.fileobj.tell()
                if len(data) != m.size:
                    raise ShardTruncated(
                        f"the tar ends at byte {end}, inside member {escape_name(m.name)} "
                        f"({min(end - m.offset_data, m.size)} of {m.size} bytes)"
                    )
                parts[ext] = data
                if pad:
                    raise ShardTruncated(
                        f"the tar ends at byte {end}, in the padding after member {escape_name(m.name)}"
                    )
        except (ShardTruncated, tarfile.ReadError):
            # The members of the last key were read whole; its sidecars may be missing, its image is not.
            if parts and (s := flush()) is not None:
                yield s
            raise
    if parts and (s := flush()) is not None:
        yield s


def _image_column(pf: pq.ParquetFile, cfg: InputConfig, uri: str) -> str:
    names = pf.schema_arrow.names
    for c in cfg.parquet_image_columns:
        if c in names:
            return c
    raise ValueError(
        f"no image column among {cfg.parquet_image_columns} in {uri} (columns: {names}); "
        "set input.parquet_image_columns"
    )


def _parquet_samples(f, cfg: InputConfig, uri: str) -> Iterator[dict]:
    pf = pq.ParquetFile(f)
    col = _image_column(pf, cfg, uri)
    i = 0
    # One row group at a time: a batch spanning row groups would lose the rows read before a corrupt one.
    batches = (b for g in range(pf.num_row_groups) for b in pf.iter_batches(batch_size=256, row_groups=[g]))
    for batch in batches:
        rows = batch.to_pylist()
        for r in rows:
            img = r.pop(col)
            if isinstance(img, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
                img = img.get("bytes")
            key = r.pop(cfg.parquet_key_column, None)
            meta = {k: v for k, v in r.items() if not isinstance(v, bytes)}
            yield {
                "key": str(key) if key is not None else f"{i:09d}",
                "image": img,
                "metadata": json.dumps(meta, default=str) if meta else None,
                "text": None,
            }
            i += 1


def _file_samples(shard: Shard, cfg: InputConfig) -> Iterator[dict]:
    shard = load_listing(shard)  # a compact plan's shard: its file list, one GET per shard
    fs, root = resolve(shard.uri, cfg.storage_options)
    listed = shard.sidecars or (None,) * len(shard.members)
    for key, exts in zip(shard.members, listed):
        path = join(root, key)
        stem = path.rpartition(".")[0]
        side = {"json": None, "txt": None}
        # The plan lists the sidecars beside each image; only a plan made before it did makes us probe.
        for ext in ("json", "txt") if exts is None else [e for e in exts.split(",") if e]:
            try:
                side[ext] = read_whole(fs, f"{stem}.{ext}").decode("utf-8", "replace")
            except (FileNotFoundError, IsADirectoryError):
                side[ext] = None
        try:
            img = read_whole(fs, path)
        except FileNotFoundError:
            yield {
                "key": key,
                "source": join(shard.uri, key),
                **schema.error("missing_file", f"{path} vanished"),
            }
            continue
        yield {
            "key": key,
            "source": join(shard.uri, key),
            "image": img,
            "metadata": side["json"],
            "text": side["txt"],
        }


def _samples(shard: Shard, cfg: InputConfig, stats: dict) -> Iterator[dict]:
    if shard.format == INVALID_NAME:  # one input file whose name is not UTF-8 (sources.py): never opened
        reason = f"file name {shard.members[0]!r} is not UTF-8 (shown escaped); rename the file"
        yield {"key": shard.members[0], "source": shard.uri, **schema.error("invalid_name", reason)}
        return
    if shard.format == "files":
        yield from _file_samples(shard, cfg)
        return
    fs, path = resolve(shard.uri, cfg.storage_options)
    with fs.open(path, "rb") as f:
        yield from (_tar_samples(f, stats) if shard.format == "tar" else _parquet_samples(f, cfg, shard.uri))


def read_shard(
    shard: Shard, cfg: InputConfig, skip: set[int] | frozenset = frozenset()
) -> Iterator[pa.Table]:
    """Yield SAMPLE_SCHEMA blocks for one shard, then its end marker.

    `skip`: sample indices already committed by an earlier attempt (counted, not emitted); `shard.retry`:
    only those indices are emitted, and reading stops after the last one. A transient read error restarts
    the shard and skips the samples already passed; a shard that stays unreadable or is cut short ends with
    one `shard_unreadable` / `shard_truncated` error row, always emitted, whose kind the end marker repeats
    (or raises, if input.on_unreadable_shard=fail).
    """
    n, rows = 0, []  # n: samples passed so far, emitted or skipped
    stop = shard.retry.last() if shard.retry else None
    failed = None

    def emit(row: dict) -> None:
        if row["sample_index"] not in skip:
            rows.append({"source": shard.uri, "shard_id": shard.shard_id, **row})

    for attempt in range(cfg.read_attempts):
        stats = {"samples": 0, "skipped_at": []}
        try:
            for i, s in enumerate(_samples(shard, cfg, stats)):
                if stop is not None and i > stop:
                    break
                if i < n:
                    continue
                if s.get("image") is None and "error" not in s:
                    s.update(schema.error("missing_image", "null image bytes"))
                if shard.wants(i):
                    emit({"sample_index": i, **s})
                n += 1
                if len(rows) >= BLOCK_ROWS:
                    yield schema.table(rows, schema.SAMPLE_SCHEMA)
                    rows = []
            break
        except (OSError, EOFError, tarfile.TarError, pa.ArrowException, ValueError, ShardTruncated) as e:
            permanent = isinstance(
                e,
                (FileNotFoundError, PermissionError, ValueError, tarfile.ReadError, EOFError, ShardTruncated),
            )
            if permanent or attempt == cfg.read_attempts - 1:
                failed = "shard_truncated" if isinstance(e, ShardTruncated) else "shard_unreadable"
                if cfg.on_unreadable_shard == "fail":
                    raise RuntimeError(f"shard {shard.uri} {failed[6:]}: {e}") from e
                log.warning("shard %s %s after %d samples: %s", shard.uri, failed[6:], n, e)
                reason = f"after {n} samples: {type(e).__name__}: {e}"
                emit({"sample_index": n, **schema.error(failed, reason)})
                n += 1
                break
            log.warning("shard %s: transient read error (%s), retry %d", shard.uri, e, attempt + 1)
            time.sleep(0.5 * 2**attempt)
    # Samples without an image have no index; under a retry only those past `start` are new to the output.
    first_new = 0 if shard.retry is None else shard.retry.start
    rows.append(
        {
            "source": shard.uri,
            "shard_id": shard.shard_id,
            "sample_index": -1,
            "shard_rows": n,
            "shard_skipped": sum(1 for p in stats["skipped_at"] if first_new is not None and p >= first_new),
            "error_kind": failed,
        }
    )
    yield schema.table(rows, schema.SAMPLE_SCHEMA)
