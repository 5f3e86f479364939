"""Content-hash reuse: a compact index of each sealed run's captioned rows, looked up in batches.

    OUTPUT/run=<id>/_reuse/<prefix>.parquet   sha256 (32 bytes), prompt, file (shard id), row: sorted by
                                              (sha256, prompt) in small row groups, split by sha256 prefix
    OUTPUT/run=<id>/_reuse/_index.json        written last: an index is complete only with it

The index is written when a run is sealed, before `_SUCCESS`, from the run's committed shard files, so a
crash anywhere before the seal loses nothing: the resumed run writes it again. A sealed run without one
(sealed before this index existed) gets it built once by the next job (`open_index`). Lookups run in a CPU
stage a batch at a time: for each sealed run, newest first, only the row groups whose sha256 range holds a
query are read (footers are cached per worker process), and captions are read only for the hits. No
process holds the history: the driver passes a list of runs, and a lookup holds a few row groups.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnilmm_ray.storage import join, read_json, read_whole, resolve, write_json, write_parquet_atomic

log = logging.getLogger(__name__)

INDEX_DIR = "_reuse"
MANIFEST = "_index.json"
ROW_GROUP = 2048  # a query that falls in a run's sha256 range reads about one row group (~90 KB)
ROWS_PER_FILE = 2_000_000  # above this a run's index is split by the first hex digits of sha256
BUILD_ROWS = 4_000_000  # index rows sorted in memory at once (~100 B each); a bigger run takes passes
THREADS = 16
CAPTION_FIELDS = ["caption", "input_tokens", "output_tokens", "finish_reason"]
INDEX_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.binary(32)),
        pa.field("prompt", pa.string()),
        pa.field("file", pa.dictionary(pa.int32(), pa.string())),
        pa.field("row", pa.int32()),
    ]
)
HITS_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("input_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
    ]
)


def _prefixes(chars: int) -> list[str]:
    return [""] if chars == 0 else [f"{i:0{chars}x}" for i in range(16**chars)]


def _index_rows(fs, run_path: str, sid: str, *, lo: str, hi: str) -> pa.Table:
    """A shard file's successful rows whose hex sha256 lies in [lo, hi], as INDEX_SCHEMA."""
    t = pq.read_table(
        pa.BufferReader(read_whole(fs, join(run_path, f"{sid}.parquet"))),
        columns=["sha256", "prompt", "error"],
    )
    t = t.append_column("row", pa.array(np.arange(len(t), dtype=np.int32)))
    sha = t.column("sha256")
    ok = pc.and_(pc.is_null(t.column("error")), pc.is_valid(sha))
    ok = pc.and_(ok, pc.and_(pc.greater_equal(sha, lo), pc.less_equal(sha, hi)))
    t = t.filter(ok)
    digests = pa.array([bytes.fromhex(s) for s in t.column("sha256").to_pylist()], pa.binary(32))
    files = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(t), np.int32)), pa.array([sid]))
    return pa.table([digests, t.column("prompt"), files, t.column("row")], schema=INDEX_SCHEMA)


def build_index(run_uri: str, shard_ids: list[str], rows: int, storage_options: dict | None = None) -> dict:
    """Write a run's index from its committed shard files; `rows` (its row count, or a bound) sizes the
    split. Memory holds about BUILD_ROWS index rows at most: a bigger run is read in passes by prefix."""
    fs, run_path = resolve(run_uri, storage_options)
    chars = 0
    while rows > ROWS_PER_FILE * 16**chars and chars < 3:
        chars += 1
    prefixes = _prefixes(chars)
    passes = max(1, min(len(prefixes), -(-rows // BUILD_ROWS)))
    step = -(-len(prefixes) // passes)
    files, total = [], 0
    with ThreadPoolExecutor(THREADS) as ex:
        for i in range(0, len(prefixes), step):
            group = prefixes[i : i + step]
            lo, hi = group[0].ljust(64, "0"), group[-1].ljust(64, "f")
            t = pa.concat_tables(
                [
                    INDEX_SCHEMA.empty_table(),
                    *ex.map(functools.partial(_index_rows, fs, run_path, lo=lo, hi=hi), shard_ids),
                ]
            )
            t = t.sort_by([("sha256", "ascending"), ("prompt", "ascending")])
            starts = np.searchsorted(
                _digests(t.column("sha256")), [bytes.fromhex(p.ljust(64, "0")) for p in group[1:]]
            )
            bounds = [0, *starts.tolist(), len(t)]
            for p, a, b in zip(group, bounds, bounds[1:]):
                name = f"{p or 'all'}.parquet"
                write_parquet_atomic(fs, join(run_path, INDEX_DIR, name), t.slice(a, b - a), ROW_GROUP)
                files.append(name)
                total += b - a
            del t
    manifest = {"prefix_chars": chars, "rows": total, "files": files}
    write_json(fs, join(run_path, INDEX_DIR, MANIFEST), manifest)
    return manifest


def _digests(col) -> np.ndarray:
    """A binary(32) column as a sorted-comparable numpy array of 32-byte strings."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(col) == 0:
        return np.array([], dtype="S32")
    buf = col.buffers()[1]
    return np.frombuffer(buf, dtype="S32", count=len(col), offset=col.offset * 32)


def open_index(output_uri: str, sealed: list[str], plan_of, storage_options: dict | None = None):
    """The reuse index over sealed runs (`plan_of(run id)` gives a plan), building it for runs sealed
    without one; None when no run has a captioned row."""
    runs = []
    for rid in reversed(sealed):  # newest first: the freshest caption of the same bytes wins
        run_uri = join(output_uri, f"run={rid}")
        fs, run_path = resolve(run_uri, storage_options)
        manifest = read_json(fs, join(run_path, INDEX_DIR, MANIFEST))
        if manifest is None:
            plan = plan_of(rid)
            summary = read_json(fs, join(run_path, "_summary.json")) or {}
            rows = summary.get("rows") or sum(len(s.get("members") or ()) or 10_000 for s in plan["shards"])
            log.info("run %s was sealed without a reuse index; building it once", rid)
            manifest = build_index(run_uri, [s["shard_id"] for s in plan["shards"]], rows, storage_options)
        if manifest["rows"]:
            runs.append((run_uri, manifest["prefix_chars"]))
    return ReuseIndex(runs, storage_options) if runs else None


@functools.lru_cache(maxsize=1024)
def _footer(path: str, opts: str) -> pq.FileMetaData:
    fs, p = resolve(path, json.loads(opts))
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).metadata


def _row_groups(meta: pq.FileMetaData, shas: list[bytes]) -> list[int]:
    """Row groups whose sha256 range holds one of the sorted `shas`."""
    out = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(0).statistics
        if st is None or not st.has_min_max:
            out.append(g)
            continue
        i = bisect.bisect_left(shas, st.min)
        if i < len(shas) and shas[i] <= st.max:
            out.append(g)
    return out


class ReuseIndex:
    """The sealed runs' indexes, newest first: a few URIs, so it travels to CPU workers as an argument."""

    def __init__(self, runs: list[tuple[str, int]], storage_options: dict | None = None):
        self.runs = runs
        self.opts = json.dumps(storage_options or {}, sort_keys=True)

    def _probe(self, run_uri: str, chars: int, queries: pa.Table) -> pa.Table:
        """(sha256 binary, prompt) queries -> matching index rows of one run."""
        shas = sorted(set(queries.column("sha256").to_pylist()))
        by_file: dict[str, list[bytes]] = {}
        for s in shas:
            by_file.setdefault(s.hex()[:chars] or "all", []).append(s)

        def probe(item):
            name, wanted = item
            path = join(run_uri, INDEX_DIR, f"{name}.parquet")
            meta = _footer(path, self.opts)
            groups = _row_groups(meta, wanted)
            if not groups:
                return INDEX_SCHEMA.empty_table()
            fs, p = resolve(path, json.loads(self.opts))
            with fs.open(p, "rb") as f:
                t = pq.ParquetFile(f, metadata=meta).read_row_groups(groups)
            return t.filter(pc.is_in(t.column("sha256"), pa.array(wanted, pa.binary(32))))

        with ThreadPoolExecutor(min(THREADS, len(by_file))) as ex:
            found = pa.concat_tables([INDEX_SCHEMA.empty_table(), *ex.map(probe, by_file.items())])
        found = found.set_column(2, "file", found.column("file").cast(pa.string()))
        return found.join(queries, ["sha256", "prompt"], join_type="inner")

    def lookup(self, queries: pa.Table) -> pa.Table:
        """(sha256 hex, prompt) rows -> HITS_SCHEMA: the caption of each pair an earlier run captioned."""
        q = (
            queries.select(["sha256", "prompt"])
            .filter(pc.is_valid(queries.column("sha256")))
            .group_by(["sha256", "prompt"])
            .aggregate([])
        )
        q = pa.table(
            {
                "sha256": pa.array([bytes.fromhex(s) for s in q.column("sha256").to_pylist()], pa.binary(32)),
                "prompt": q.column("prompt"),
            }
        )
        hits = []
        for run_uri, chars in self.runs:
            if not len(q):
                break
            found = (
                self._probe(run_uri, chars, q)
                .group_by(["sha256", "prompt"], use_threads=False)
                .aggregate([("file", "first"), ("row", "first")])
            )
            if len(found):
                hits.append((run_uri, found))
                q = q.join(found.select(["sha256", "prompt"]), ["sha256", "prompt"], join_type="left anti")
        out = [HITS_SCHEMA.empty_table()]
        for run_uri, found in hits:
            out += [self._captions(run_uri, found)]
        return pa.concat_tables(out)

    def _captions(self, run_uri: str, found: pa.Table) -> pa.Table:
        fs, run_path = resolve(run_uri, json.loads(self.opts))
        parts = []
        for f in pc.unique(found.column("file_first")).to_pylist():
            mine = found.filter(pc.equal(found.column("file_first"), f))
            with fs.open(join(run_path, f"{f}.parquet"), "rb") as fh:
                t = pq.read_table(fh, columns=CAPTION_FIELDS).take(mine.column("row_first"))
            sha = pa.array([s.hex() for s in mine.column("sha256").to_pylist()], pa.string())
            parts.append(pa.table([sha, mine.column("prompt"), *t.columns], schema=HITS_SCHEMA))
        t = pa.concat_tables(parts)
        return t.filter(pc.is_valid(t.column("caption")))  # only successful rows are indexed; be sure


def apply_reuse(batch: pa.Table, index: ReuseIndex, prompt: str) -> pa.Table:
    """PIXELS rows -> the same rows plus caption fields and `cached`: a row whose (sha256, prompt) an
    earlier run captioned gets that caption and loses its pixels, so the engine stage skips it."""
    n = len(batch)
    sha = batch.column("sha256")
    queries = pa.table({"sha256": sha, "prompt": pa.array([prompt] * n, pa.string())})
    ok = pc.and_(pc.is_valid(sha), pc.is_null(batch.column("error")))
    hits = index.lookup(queries.filter(ok)) if n else HITS_SCHEMA.empty_table()
    by_sha = {r["sha256"]: r for r in hits.to_pylist()}
    found = [by_sha.get(s) if good else None for s, good in zip(sha.to_pylist(), ok.to_pylist())]
    cached = pa.array([f is not None for f in found], pa.bool_())
    for name in CAPTION_FIELDS:
        batch = batch.append_column(
            HITS_SCHEMA.field(name), pa.array([f and f[name] for f in found], HITS_SCHEMA.field(name).type)
        )
    pixels = pc.if_else(cached, pa.scalar(None, batch.schema.field("pixels").type), batch.column("pixels"))
    batch = batch.set_column(batch.schema.get_field_index("pixels"), "pixels", pixels)
    return batch.append_column("cached", cached)
