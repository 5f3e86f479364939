"""The commit protocol: exactly one output row per input image, whatever Ray retried underneath.

Only the driver writes output data. It collects each shard's captioned rows and drops repeats of a
`sample_index` (a retried read or map task may deliver a row twice). Every `commit_rows` new rows of a
shard go to a *part* file (`<shard>.part-NNNNN.parquet`, one atomic put each); once the shard's end marker
and all its rows are in, parts and remaining rows are merged into the shard's file (one atomic put), and
the parts are removed. A rerun after any crash skips complete shards unread and re-reads a partial shard
skipping the indices its parts hold, so no row is captioned into the output twice; what a crash redoes
per shard is the rows not yet in a part: up to `commit_rows` that reached the driver, plus those still in
the pipeline. `verify_run` checks every planned shard before the
run's `_SUCCESS` marker is written.

The driver decides what to write as batches arrive; the writes themselves (`writers` > 1) run on a few
threads, so one driver keeps up with many GPUs on an object store that takes tens of milliseconds per put:
one shard's writes stay in order (its parts before the merge that reads them back), different shards' run
side by side, and a failed write fails the job at the next batch or at `flush`. Every write and removal
first calls `guard` (the job's lease.ensure) on the thread that makes it, so a job that lost its output
lease touches nothing more, writes it had queued before the loss included: a queued merge would remove
part files that the job which took over has loaded.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnilmm_ray import schema
from omnilmm_ray.faults import kill_point
from omnilmm_ray.quality import count_flags
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import TMP_PREFIX, join, read_whole, resolve, write_parquet_atomic

log = logging.getLogger(__name__)


PART = ".part-"
WRITERS = 8  # output writes in flight in the job's driver (commit.py docstring)


def shard_file(run_uri: str, shard_id: str) -> str:
    return join(run_uri, f"{shard_id}.parquet")


@dataclass
class Progress:
    """What earlier attempts of a run left: complete shards, and the parts of incomplete ones."""

    complete: set[str] = field(default_factory=set)
    parts: dict[str, list[str]] = field(default_factory=dict)  # shard id -> part paths
    done_indices: dict[str, set[int]] = field(default_factory=dict)  # shard id -> indices in its parts
    # parts of complete shards (crash before their removal) and temporary files of interrupted local writes
    orphans: list[str] = field(default_factory=list)


def load_progress(run_uri: str, storage_options: dict | None = None) -> Progress:
    fs, path = resolve(run_uri, storage_options)
    try:
        names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return Progress()
    # a local write a crash interrupted (the writer threads may be mid-write when the driver dies)
    prog = Progress(orphans=[join(path, n) for n in names if n.startswith(TMP_PREFIX)])
    names = [n for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]
    prog.complete = {n[: -len(".parquet")] for n in names if PART not in n}
    for n in sorted(n for n in names if PART in n):
        sid = n.split(PART)[0]
        if sid in prog.complete:
            prog.orphans.append(join(path, n))
            continue
        prog.parts.setdefault(sid, []).append(join(path, n))
        with fs.open(join(path, n), "rb") as f:
            idx = pq.read_table(f, columns=["sample_index"]).column("sample_index").to_pylist()
        prog.done_indices.setdefault(sid, set()).update(idx)
    return prog


@dataclass
class _Pending:
    tables: list[pa.Table] = field(default_factory=list)  # rows not yet in any file
    seen: set[int] = field(default_factory=set)
    parts: list[str] = field(default_factory=list)
    rows: int | None = None  # from the end marker: samples the reader passed
    failed: str | None = None  # from the end marker: the kind of a shard-level error row
    expected: list[int] | None = None
    skipped: int = 0


class ShardCommitter:
    """Collects ENGINE_SCHEMA batches (any order, any repeats); writes part files, then whole shards."""

    def __init__(
        self,
        run_uri: str,
        shards: list[Shard],
        storage_options: dict | None = None,
        commit_rows: int = 1024,
        progress: Progress | None = None,
        out_schema: pa.Schema = schema.OUTPUT_SCHEMA,
        writers: int = 1,
        guard: Callable[[], None] | None = None,
    ):
        """`out_schema`: the output table's schema (schema.output_schema: per-prompt columns in multi-prompt
        mode). `writers`: writes in flight; with more than one, call `flush` before reading what was written.
        `guard`: called right before each write or removal; what it raises drops that write (and the
        shard's later ones, which wait for it) and fails the job like a failed write."""
        self._guard = guard
        self.fs, self.run_path = resolve(run_uri, storage_options)
        self.out_schema = out_schema
        self.run_uri = run_uri
        self.shards = {s.shard_id: s for s in shards}
        self.commit_rows = commit_rows
        self.parts_written = 0
        self.pending: dict[str, _Pending] = {}
        for sid, parts in (progress.parts if progress else {}).items():
            if sid in self.shards:
                self.pending[sid] = _Pending(seen=set(progress.done_indices[sid]), parts=list(parts))
        self.sealed: set[str] = set()  # shards whose merge is decided: every row after is a repeat
        self.committed: set[str] = set()  # shards whose file is written
        self.duplicates_dropped = 0
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="commit") if writers > 1 else None
        self._writers = writers
        self._inflight: deque[Future] = deque()  # writes not yet known to have succeeded, oldest first
        self._last: dict[str, Future] = {}  # per shard: its latest write, which the next one waits for
        self._lock = threading.Lock()

    def _write(self, sid: str, fn, *args) -> None:
        """Run a write of shard `sid`: now, or on a writer thread after the shard's earlier writes. At most
        twice `writers` writes wait at once (the driver then waits for the oldest: memory stays bounded
        when the store is slow); a failed one raises here or in `flush`."""
        if self._pool is None:
            return fn(*args)
        while self._inflight and (self._inflight[0].done() or len(self._inflight) >= 2 * self._writers):
            self._inflight.popleft().result()
        prev = self._last.get(sid)

        def run():
            if prev is not None:
                prev.result()  # submitted earlier, so running or done: never waits on a queued write
            fn(*args)

        self._last[sid] = f = self._pool.submit(run)
        self._inflight.append(f)
        for k in [k for k, v in self._last.items() if v.done() and k in self.sealed]:
            del self._last[k]  # a merged shard writes nothing more (a failure still raises from _inflight)

    def flush(self) -> None:
        """Wait for every write in flight; raises the first that failed."""
        while self._inflight:
            self._inflight.popleft().result()
        self._last.clear()

    def close(self) -> None:
        """Let the writes in flight finish (they hold rows the driver already has), then stop the threads;
        raises nothing, so an error the caller is handling stays the one reported."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def add(self, batch: pa.Table) -> None:
        for sid in pc.unique(batch.column("shard_id")).to_pylist():
            mine = batch.filter(pc.equal(batch.column("shard_id"), sid))
            mine_ends = pa.array(schema.is_end(mine))
            if sid in self.sealed:  # a late repeat of a shard already merged
                self.duplicates_dropped += len(mine) - pc.sum(mine_ends).as_py()
                continue
            p = self.pending.setdefault(sid, _Pending())
            for r in mine.filter(mine_ends).select(["shard_rows", "shard_skipped", "error_kind"]).to_pylist():
                p.rows, p.skipped, p.failed = r["shard_rows"], r["shard_skipped"] or 0, r["error_kind"]
                p.expected = self.shards[sid].expected(p.rows, p.failed is not None)
            rows = mine.filter(pc.invert(mine_ends))
            fresh = [i not in p.seen for i in rows.column("sample_index").to_pylist()]
            if not all(fresh):
                self.duplicates_dropped += fresh.count(False)
                rows = rows.filter(pa.array(fresh))
            p.seen.update(rows.column("sample_index").to_pylist())
            if len(rows):
                p.tables.append(rows)
            if p.expected is not None and len(p.seen) >= len(p.expected):
                self._commit(sid, p)
            elif sum(len(t) for t in p.tables) >= self.commit_rows:
                self._write_part(sid, p)

    def _rows(self, tables: list[pa.Table]) -> pa.Table:
        if not tables:
            return self.out_schema.empty_table()
        t = pa.concat_tables(tables)
        return t.select(self.out_schema.names).cast(self.out_schema)

    def _write_part(self, sid: str, p: _Pending) -> None:
        path = join(self.run_path, f"{sid}{PART}{len(p.parts):05d}.parquet")
        p.parts.append(path)
        tables, p.tables = p.tables, []
        self._write(sid, self._put_part, path, tables)

    def _touch(self, op, *args) -> None:
        """Every write and removal of output files goes through here."""
        if self._guard is not None:
            self._guard()
        op(*args)

    def _put_part(self, path: str, tables: list[pa.Table]) -> None:
        self._touch(write_parquet_atomic, self.fs, path, self._rows(tables).sort_by("sample_index"))
        with self._lock:
            self.parts_written += 1
            n = self.parts_written
        kill_point(f"part:{n}")

    def _commit(self, sid: str, p: _Pending) -> None:
        del self.pending[sid]
        self.sealed.add(sid)
        self._write(sid, self._merge, sid, p)

    def _merge(self, sid: str, p: _Pending) -> None:
        shard = self.shards[sid]
        written = []
        for part in p.parts:
            with self.fs.open(part, "rb") as f:
                written.append(pq.read_table(f).cast(self.out_schema))
        t = pa.concat_tables([*written, self._rows(p.tables)]).sort_by("sample_index")
        if t.column("sample_index").to_pylist() != p.expected:
            raise RuntimeError(
                f"shard {shard.uri}: rows are not {_describe(shard, p.rows)}; refusing to commit"
            )
        meta = {
            b"omnilmm.shard_uri": shard.uri.encode(),
            b"omnilmm.shard_rows": str(p.rows).encode(),
            b"omnilmm.shard_skipped": str(p.skipped).encode(),
            b"omnilmm.shard_failed": (p.failed or "").encode(),
        }
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), **meta})
        self._touch(write_parquet_atomic, self.fs, shard_file(self.run_path, sid), t)
        # A crash (or a lost lease) before this leaves orphans that load_progress reports.
        self._touch(remove_files, self.fs, p.parts)
        with self._lock:
            self.committed.add(sid)
            n = len(self.committed)
        log.info("committed shard %s (%d rows)", shard.uri, len(p.expected))
        kill_point(f"commit:{n}")

    def uncommitted(self) -> list[str]:
        """Shards still waiting for rows (after `flush`, every other one is written)."""
        return sorted(self.pending)


def remove_files(fs, paths: list[str]) -> None:
    for path in paths:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _describe(shard: Shard, rows: int) -> str:
    return f"0..{rows - 1} exactly once" if shard.retry is None else f"the retried rows of 0..{rows - 1} once"


@dataclass
class RunCounts:
    """What the summary needs of a verified run, as counters: nothing grows with the run's size but the
    (at most 3) example rows per error kind."""

    rows: int = 0
    skipped: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    quality: Counter = field(default_factory=Counter)  # quality.count_flags: rows per flag, retries

    def add(self, other: RunCounts) -> None:
        self.rows += other.rows
        self.skipped += other.skipped
        self.cached += other.cached
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.errors.update(other.errors)
        self.quality.update(other.quality)
        for k, ex in other.examples.items():
            mine = self.examples.setdefault(k, [])
            mine.extend(ex[: 3 - len(mine)])


VERIFY_COLUMNS = ["source", "key", "sample_index", "error_kind", "cached", "input_tokens", "output_tokens"]
VERIFY_THREADS = 32  # reads in flight: object stores answer each GET in tens of milliseconds


def _verify_shard(fs, path: str, s: Shard, quality_cfg=None) -> RunCounts:
    f = shard_file(path, s.shard_id)
    try:  # one GET per shard file (opening it would cost a HEAD and ranged GETs)
        pf = pq.ParquetFile(pa.BufferReader(read_whole(fs, f)))
        md = pf.schema_arrow.metadata or {}
        flag_cols = [n for n in pf.schema_arrow.names if n.startswith(("flags", "first_flags"))]
        t = pf.read(columns=VERIFY_COLUMNS + flag_cols)
    except FileNotFoundError:
        raise RuntimeError(f"shard {s.uri} has no committed file {f}") from None
    n = int(md[b"omnilmm.shard_rows"])
    if sorted(t.column("sample_index").to_pylist()) != s.expected(n, bool(md.get(b"omnilmm.shard_failed"))):
        raise RuntimeError(f"shard {s.uri}: committed file {f} does not hold rows {_describe(s, n)}")
    c = RunCounts(
        rows=len(t),
        skipped=int(md.get(b"omnilmm.shard_skipped", b"0")),
        cached=pc.sum(pc.cast(t.column("cached"), pa.int64())).as_py() or 0,
        input_tokens=pc.sum(t.column("input_tokens")).as_py() or 0,
        output_tokens=pc.sum(t.column("output_tokens")).as_py() or 0,
        quality=count_flags(t, quality_cfg) if quality_cfg is not None else Counter(),
    )
    bad = t.filter(pc.is_valid(t.column("error_kind")))
    if len(bad):
        c.errors.update(
            {r["values"]: r["counts"] for r in pc.value_counts(bad.column("error_kind")).to_pylist()}
        )
        for kind, src, key in zip(*bad.select(["error_kind", "source", "key"]).to_pydict().values()):
            if len(c.examples.setdefault(kind, [])) < 3:
                c.examples[kind].append(f"{src}#{key}")
    return c


def verify_run(
    run_uri: str, shards: list[Shard], storage_options: dict | None = None, quality_cfg=None
) -> RunCounts:
    """Check that every planned shard is committed with rows 0..n-1 exactly once (a retried shard: exactly
    the indices its plan wants, and its shard-level error row); return the counters the summary needs.
    Shard files are read in parallel and dropped once counted. Raises RuntimeError naming the first shard
    (in plan order) that is wrong. `quality_cfg` (config.QualityConfig): also count the quality flags."""
    fs, path = resolve(run_uri, storage_options)
    total = RunCounts()
    with ThreadPoolExecutor(VERIFY_THREADS) as ex:
        for i in range(0, len(shards), 10 * VERIFY_THREADS):  # bounded futures, merged in plan order
            batch = shards[i : i + 10 * VERIFY_THREADS]
            for c in ex.map(lambda s: _verify_shard(fs, path, s, quality_cfg), batch):
                total.add(c)
    return total


def reopen_failed_shards(
    run_uri: str,
    shards: list[Shard],
    kinds: set[str],
    progress: Progress,
    storage_options: dict | None = None,
) -> list[str]:
    """Turn committed shards of an unsealed run that end in a shard-level error of `kinds` back into
    partial shards: their good rows become a part file, their file is removed, so this attempt reads them
    again from the failed sample on. Returns the shard ids reopened.

    Called when a run that failed its error budget is resumed (the rerun after an outage or a fix); a crash
    between the part's write and the file's removal leaves the part as an orphan of a complete shard, which
    the next attempt removes before reopening the shard again.
    """
    fs, path = resolve(run_uri, storage_options)
    kinds = kinds & schema.SHARD_KINDS
    reopened = []
    for s in shards:
        if s.shard_id not in progress.complete or not kinds:
            continue
        f = shard_file(path, s.shard_id)
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if not pc.any(
                pc.is_in(pf.read(columns=["error_kind"]).column(0), pa.array(sorted(kinds)))
            ).as_py():
                continue
            # the run's own columns (per-prompt ones too), without the shard file's commit metadata
            t = pf.read().replace_schema_metadata(None)
        bad = pc.is_in(t.column("error_kind"), pa.array(sorted(kinds)))
        good = t.filter(pc.invert(pc.fill_null(bad, False)))
        if len(good):
            part = join(path, f"{s.shard_id}{PART}00000.parquet")
            write_parquet_atomic(fs, part, good)
            progress.parts[s.shard_id] = [part]
            progress.done_indices[s.shard_id] = set(good.column("sample_index").to_pylist())
        fs.rm_file(f)
        progress.complete.discard(s.shard_id)
        reopened.append(s.shard_id)
        log.info("shard %s ended in a shard-level error; reading it again from there", s.uri)
    return reopened
