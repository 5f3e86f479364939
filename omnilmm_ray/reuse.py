"""Content-hash reuse: a compact index of each sealed run's captioned rows, looked up in batches.

    OUTPUT/run=<id>/_reuse/<prefix>.index     Parquet: sha256 (32 bytes), prompt, file (shard id), row, name,
                                              sorted by (sha256, prompt) in small row groups, split by prefix
    OUTPUT/run=<id>/_reuse/_index.json        written last: an index is complete only with it

The key is the prompt as rendered for the sample (a template filled from its metadata), so the same bytes
with other metadata are captioned again. A run with several named prompts has one index row per image and
prompt (`name`: whose `caption_<name>` columns hold the caption; "" for the single `prompt`).

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

from omnilmm_ray.prompts import render_row, templates
from omnilmm_ray.schema import CAPTION_FIELDS, OUTPUT_SCHEMA, prompt_column
from omnilmm_ray.storage import join, read_json, read_whole, resolve, write_json, write_parquet_atomic

log = logging.getLogger(__name__)

INDEX_DIR = "_reuse"
MANIFEST = "_index.json"
# Not ".parquet": a `OUTPUT/**/*.parquet` glob (DuckDB, pyarrow) would read the index rows as captions. An index
# written before says no `suffix` in its manifest and keeps its `.parquet` files, read as they are.
INDEX_SUFFIX = ".index"
# 2: several-prompt runs indexed per prompt (`name`). A version 1 index of such a run holds only its null
# `prompt` column, which no lookup matches: it is built again; one of a single-prompt run is still good.
VERSION = 2
ROW_GROUP = 2048  # a query that falls in a run's sha256 range reads about one row group (~90 KB)
ROWS_PER_FILE = 2_000_000  # above this a run's index is split by the first hex digits of sha256
BUILD_ROWS = 4_000_000  # index rows sorted in memory at once (~100 B each); a bigger run takes passes
THREADS = 16
INDEX_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.binary(32)),
        pa.field("prompt", pa.string()),
        pa.field("file", pa.dictionary(pa.int32(), pa.string())),
        pa.field("row", pa.int32()),
        pa.field("name", pa.dictionary(pa.int32(), pa.string())),
    ]
)
# A lookup's answer: the output table's own columns (schema.py declares each column once).
HITS_SCHEMA = pa.schema([OUTPUT_SCHEMA.field(n) for n in ("sha256", "prompt", *CAPTION_FIELDS)])


def _prefixes(chars: int) -> list[str]:
    return [""] if chars == 0 else [f"{i:0{chars}x}" for i in range(16**chars)]


def _constant(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))


def _index_rows(fs, run_path: str, sid: str, *, lo: str, hi: str, names: list[str]) -> pa.Table:
    """A shard file's successful rows whose hex sha256 lies in [lo, hi], as INDEX_SCHEMA: one index row
    per row and prompt `names` ([""]: the single prompt)."""
    t = pq.read_table(
        pa.BufferReader(read_whole(fs, join(run_path, f"{sid}.parquet"))),
        columns=["sha256", "error", *(prompt_column("prompt", n) for n in names)],
    )
    t = t.append_column("row", pa.array(np.arange(len(t), dtype=np.int32)))
    sha = t.column("sha256")
    ok = pc.and_(pc.is_null(t.column("error")), pc.is_valid(sha))
    ok = pc.and_(ok, pc.and_(pc.greater_equal(sha, lo), pc.less_equal(sha, hi)))
    t = t.filter(ok)
    digests = pa.array([bytes.fromhex(s) for s in t.column("sha256").to_pylist()], pa.binary(32))
    files, prompts = _constant(sid, len(t)), [t.column(prompt_column("prompt", n)) for n in names]
    return pa.concat_tables(
        pa.table([digests, p, files, t.column("row"), _constant(n, len(t))], schema=INDEX_SCHEMA)
        for n, p in zip(names, prompts)
    )


def build_index(
    run_uri: str,
    shard_ids: list[str],
    rows: int,
    storage_options: dict | None = None,
    prompt_names: list[str] | None = None,
) -> dict:
    """Write a run's index from its committed shard files; `rows` (its row count, or a bound) sizes the
    split, `prompt_names` are the run's named prompts (None: the single `prompt`). Memory holds about
    BUILD_ROWS index rows at most: a bigger run is read in passes by prefix."""
    fs, run_path = resolve(run_uri, storage_options)
    names = prompt_names or [""]
    rows *= len(names)  # index rows: one per image and prompt
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
                    *ex.map(
                        functools.partial(_index_rows, fs, run_path, lo=lo, hi=hi, names=names), shard_ids
                    ),
                ]
            )
            t = t.sort_by([("sha256", "ascending"), ("prompt", "ascending")])
            starts = np.searchsorted(
                _digests(t.column("sha256")), [bytes.fromhex(p.ljust(64, "0")) for p in group[1:]]
            )
            bounds = [0, *starts.tolist(), len(t)]
            for p, a, b in zip(group, bounds, bounds[1:]):
                name = f"{p or 'all'}{INDEX_SUFFIX}"
                write_parquet_atomic(fs, join(run_path, INDEX_DIR, name), t.slice(a, b - a), ROW_GROUP)
                files.append(name)
                total += b - a
            del t
    manifest = {
        "version": VERSION,
        "prefix_chars": chars,
        "rows": total,
        "files": files,
        "suffix": INDEX_SUFFIX,
    }
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
        if manifest is None or manifest.get("version", 1) < VERSION:
            plan = plan_of(rid)
            names = list((plan.get("fingerprint") or {}).get("prompts") or ()) or None
            if manifest is None or names:
                summary = read_json(fs, join(run_path, "_summary.json")) or {}
                rows = summary.get("rows") or sum(
                    len(s.get("members") or ()) or 10_000 for s in plan["shards"]
                )
                log.info("run %s was sealed without a current reuse index; building it once", rid)
                ids = [s["shard_id"] for s in plan["shards"]]
                manifest = build_index(run_uri, ids, rows, storage_options, names)
            else:  # same rows as version 2: marked, so that its plan is not read again
                manifest["version"] = VERSION
                write_json(fs, join(run_path, INDEX_DIR, MANIFEST), manifest)
        if manifest["rows"]:
            runs.append((run_uri, manifest["prefix_chars"], manifest.get("suffix", ".parquet")))
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

    def __init__(self, runs: list[tuple], storage_options: dict | None = None):
        """`runs`: (run URI, prefix chars[, file suffix: INDEX_SUFFIX when left out]), newest first."""
        self.runs = runs
        self.opts = json.dumps(storage_options or {}, sort_keys=True)

    def _probe(self, run_uri: str, chars: int, queries: pa.Table, suffix: str = INDEX_SUFFIX) -> pa.Table:
        """(sha256 binary, prompt) queries -> matching index rows of one run."""
        shas = sorted(set(queries.column("sha256").to_pylist()))
        by_file: dict[str, list[bytes]] = {}
        for s in shas:
            by_file.setdefault(s.hex()[:chars] or "all", []).append(s)

        def probe(item):
            name, wanted = item
            path = join(run_uri, INDEX_DIR, f"{name}{suffix}")
            meta = _footer(path, self.opts)
            groups = _row_groups(meta, wanted)
            if not groups:
                return INDEX_SCHEMA.empty_table()
            fs, p = resolve(path, json.loads(self.opts))
            with fs.open(p, "rb") as f:
                t = pq.ParquetFile(f, metadata=meta).read_row_groups(groups)
            if "name" not in t.column_names:  # a version 1 index: single-prompt rows
                t = t.append_column(INDEX_SCHEMA.field("name"), _constant("", len(t)))
            return t.filter(pc.is_in(t.column("sha256"), pa.array(wanted, pa.binary(32))))

        with ThreadPoolExecutor(min(THREADS, len(by_file))) as ex:
            found = pa.concat_tables([INDEX_SCHEMA.empty_table(), *ex.map(probe, by_file.items())])
        found = found.set_column(2, "file", found.column("file").cast(pa.string()))
        found = found.set_column(4, "name", found.column("name").cast(pa.string()))
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
        for run_uri, chars, *suffix in self.runs:
            if not len(q):
                break
            found = (
                self._probe(run_uri, chars, q, *suffix)
                .group_by(["sha256", "prompt"], use_threads=False)
                .aggregate([("file", "first"), ("row", "first"), ("name", "first")])
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
            in_file = found.filter(pc.equal(found.column("file_first"), f))
            names = pc.unique(in_file.column("name_first")).to_pylist()
            with fs.open(join(run_path, f"{f}.parquet"), "rb") as fh:
                t = pq.read_table(fh, columns=[prompt_column(c, n) for n in names for c in CAPTION_FIELDS])
            for n in names:
                mine = in_file.filter(pc.equal(in_file.column("name_first"), n))
                got = t.select([prompt_column(c, n) for c in CAPTION_FIELDS]).take(mine.column("row_first"))
                sha = pa.array([s.hex() for s in mine.column("sha256").to_pylist()], pa.string())
                parts.append(pa.table([sha, mine.column("prompt"), *got.columns], schema=HITS_SCHEMA))
        t = pa.concat_tables(parts)
        return t.filter(pc.is_valid(t.column("caption")))  # only successful rows are indexed; be sure


def apply_reuse(
    batch: pa.Table, index: ReuseIndex, prompt: str, prompts: dict[str, str] | None = None
) -> pa.Table:
    """PIXELS rows -> the same rows plus each prompt's caption fields and `cached`. The job's prompts
    (`prompt`, or the named `prompts`) are rendered per row; a (sha256, rendered prompt) an earlier run
    captioned gets that caption in the prompt's columns (`caption`, or `caption_<name>`...), which the
    engine stage then skips. A row whose every prompt was found is `cached` and loses its pixels; one
    whose template names a field the sample lacks becomes its `missing_prompt_field` error row here."""
    tpl = templates(prompt, prompts)
    rows = batch.select(["key", "text", "metadata", "sha256", "error", "error_kind"]).to_pylist()
    rendered = [render_row(tpl, r) if r["sha256"] is not None and r["error"] is None else None for r in rows]
    queries = [(r["sha256"], p) for r, ps in zip(rows, rendered) if ps for p in ps.values()]
    q = pa.table(
        {"sha256": [s for s, _ in queries], "prompt": [p for _, p in queries]},
        schema=pa.schema([HITS_SCHEMA.field("sha256"), HITS_SCHEMA.field("prompt")]),
    )
    hits = index.lookup(q) if queries else HITS_SCHEMA.empty_table()
    by_key = {(h["sha256"], h["prompt"]): h for h in hits.to_pylist()}
    found = [
        {n: by_key.get((r["sha256"], p)) for n, p in ps.items()} if ps else {}
        for r, ps in zip(rows, rendered)
    ]
    cached = pa.array([bool(f) and None not in f.values() for f in found], pa.bool_())
    for name in tpl:
        for c in CAPTION_FIELDS:
            values = [(f.get(name) or {}).get(c) for f in found]
            field = HITS_SCHEMA.field(c).with_name(prompt_column(c, name))
            batch = batch.append_column(field, pa.array(values, field.type))
    for c in ("error", "error_kind"):
        batch = batch.set_column(
            batch.schema.get_field_index(c), c, pa.array([r[c] for r in rows], pa.string())
        )
    gone = pc.or_(cached, pc.is_valid(batch.column("error")))  # neither goes to the engine
    pixels = pc.if_else(gone, pa.scalar(None, batch.schema.field("pixels").type), batch.column("pixels"))
    batch = batch.set_column(batch.schema.get_field_index("pixels"), "pixels", pixels)
    return batch.append_column("cached", cached)
