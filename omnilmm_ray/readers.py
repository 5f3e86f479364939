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
from omnilmm_ray.sources import IMAGE_EXTS, Shard
from omnilmm_ray.storage import join, resolve

log = logging.getLogger(__name__)

BLOCK_ROWS = 64


def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    d, b = posixpath.split(name)
    stem, _, ext = b.partition(".")
    return posixpath.join(d, stem), ext.lower()


def _tar_samples(f, stats: dict) -> Iterator[dict]:
    """Consecutive members sharing a key form one sample (img2dataset's layout)."""
    key, parts = None, {}

    def flush():
        img_ext = next((e for e in parts if e.rpartition(".")[2] in IMAGE_EXTS), None)
        if img_ext is None:
            stats["skipped"] += 1
            return None
        meta = parts.get("json")
        return {
            "key": key,
            "image": parts[img_ext],
            "metadata": meta.decode("utf-8", "replace") if meta is not None else None,
            "text": parts["txt"].decode("utf-8", "replace") if "txt" in parts else None,
        }

    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = _wds_key(m.name)
            if k != key and parts:
                if (s := flush()) is not None:
                    yield s
                parts = {}
            key = k
            data = tar.extractfile(m).read()
            if len(data) != m.size:  # stream mode returns short reads silently at a cut-off end of file
                raise tarfile.ReadError(f"unexpected end of data in {m.name} ({len(data)} of {m.size} bytes)")
            parts[ext] = data
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
    for batch in pf.iter_batches(batch_size=256):
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
    fs, root = resolve(shard.uri, cfg.storage_options)
    for key in shard.members:
        path = join(root, key)
        stem = path.rpartition(".")[0]
        side = {}
        for ext in ("json", "txt"):
            try:
                side[ext] = fs.cat_file(f"{stem}.{ext}").decode("utf-8", "replace")
            except (FileNotFoundError, IsADirectoryError):
                side[ext] = None
        try:
            img = fs.cat_file(path)
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

    `skip`: sample indices already committed by an earlier attempt (counted, not emitted). A transient read
    error restarts the shard and skips the samples already passed; a shard that stays unreadable ends with
    one `shard_unreadable` error row (or raises, if input.on_unreadable_shard=fail).
    """
    n, rows = 0, []  # n: samples passed so far, emitted or skipped

    def emit(row: dict) -> None:
        if row["sample_index"] not in skip:
            rows.append({"source": shard.uri, "shard_id": shard.shard_id, **row})

    for attempt in range(cfg.read_attempts):
        stats = {"skipped": 0}
        try:
            for i, s in enumerate(_samples(shard, cfg, stats)):
                if i < n:
                    continue
                if s.get("image") is None and "error" not in s:
                    s.update(schema.error("missing_image", "null image bytes"))
                emit({"sample_index": i, **s})
                n += 1
                if len(rows) >= BLOCK_ROWS:
                    yield schema.table(rows, schema.SAMPLE_SCHEMA)
                    rows = []
            break
        except (OSError, EOFError, tarfile.TarError, pa.ArrowException, ValueError) as e:
            permanent = isinstance(
                e, (FileNotFoundError, PermissionError, ValueError, tarfile.ReadError, EOFError)
            )
            if permanent or attempt == cfg.read_attempts - 1:
                if cfg.on_unreadable_shard == "fail":
                    raise RuntimeError(f"shard {shard.uri} unreadable: {e}") from e
                log.warning("shard %s unreadable after %d samples: %s", shard.uri, n, e)
                reason = f"after {n} samples: {type(e).__name__}: {e}"
                emit({"sample_index": n, **schema.error("shard_unreadable", reason)})
                n += 1
                break
            log.warning("shard %s: transient read error (%s), retry %d", shard.uri, e, attempt + 1)
            time.sleep(0.5 * 2**attempt)
    rows.append(
        {
            "source": shard.uri,
            "shard_id": shard.shard_id,
            "sample_index": -1,
            "shard_rows": n,
            "shard_skipped": stats["skipped"],
        }
    )
    yield schema.table(rows, schema.SAMPLE_SCHEMA)
