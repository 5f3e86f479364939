"""The snapshot: `OUTPUT/captions`, a Delta Lake table with one row per image present in the inputs of the
newest published run, holding its newest caption; one Delta commit per sealed run.

    OUTPUT/captions/_delta_log/             Delta's log (delta-rs: no catalog; Spark, Trino, DuckDB... read it)
    OUTPUT/captions/part-<run>-*.parquet    data files, each sorted by image_id

Columns: `image_id` (a tar/Parquet image: `<source>#<sample_index>`; a loose file: its URI), `shard` (the
shard file's URI, or the loose file's folder), `run`, `settings` (that run's settings fingerprint, compact
JSON), then the output table's columns (schema.output_schema: one row per image, each named prompt's
caption in its own columns). The `run=` partitions stay the exactly-once log; the snapshot is derived from
them and from the newest runs' present records (present.py), so the newest run's publish can always be
redone (a full write).

Publishing run R when the snapshot holds R's predecessor P is incremental: tonight's rows are R's shard
files; what left the inputs comes from one streaming pass over P's and R's present records. Candidate files
come from the Delta log's per-file image_id/shard ranges and are confirmed by reading their key columns; a
file is rewritten only when a row of it is replaced or deleted (its kept rows plus tonight's rows in its
range, sorted); tonight's other rows go to new files. Anything else (a first publish, a snapshot behind by
more than one run, an image back in the inputs unchanged, so its rows are in an older run, a night of more
than INCREMENTAL_ROWS rows) is a full write streamed from the latest view (table.iter_latest) filtered by R's
present record, holding one shard's history and one data file.

A publish is one Delta commit carrying R in its commit info and as the Delta transaction version of app
APP_ID (R's id as a number), which a publish reads first: a rerun publishes a run once. Data files are
written before the commit that names them, so a kill leaves last night's version or tonight's, plus files no
version names, which the next publish of that run removes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from omnilmm_ray.deltafiles import DataFiles, delta_options, read_file
from omnilmm_ray.faults import kill_point
from omnilmm_ray.lease import LeaseLost
from omnilmm_ray.present import PRESENT_DIR, PresentLookup, diff_present
from omnilmm_ray.storage import join, read_json, resolve
from omnilmm_ray.table import OutputTable

log = logging.getLogger(__name__)

TABLE_DIR = "captions"
APP_ID = "omnilmm-caption"  # Delta's transaction id: its version is the published run (run_number)
PUBLISH_ATTEMPTS = 8  # a storage error: the whole publish again, after 1, 2, 4, ... 30 s
INCREMENTAL_ROWS = 1_000_000  # a bigger night is a full write, streamed, rather than held in memory
KEYS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("run", pa.string(), nullable=False),
    pa.field("settings", pa.string()),
]
SHARD_FILE = r"(?i)\.(tar|parquet)$"  # an input shard file; any other source with a key is a loose file


def snapshot_uri(output_uri: str) -> str:
    return join(output_uri, TABLE_DIR)


def run_number(run_id: str) -> int:
    """A run id (its UTC start, `%Y%m%dT%H%M%S%fZ`) as microseconds since 1970: Delta's transaction version."""
    t = dt.datetime.strptime(run_id, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=dt.timezone.utc)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


def _number(run_id: str) -> int | None:
    """run_number, or None for a folder named otherwise (not written by this job)."""
    try:
        return run_number(run_id)
    except ValueError:
        return None


def snapshot_schema(output: pa.Schema) -> pa.Schema:
    return pa.schema(KEYS + [f for f in output if f.name != "run"])


def identify(t: pa.Table, settings: dict[str, str], schema: pa.Schema) -> pa.Table:
    """Output rows with a `run` column -> snapshot rows (`schema`). An image of a tar/Parquet shard is its
    row number in one reading of the file (keys may repeat there); a loose file is its own image. A row
    without a key (reading stopped there) is numbered in its source, as a shard's images are."""
    src, sample = t.column("source"), pc.cast(t.column("sample_index"), pa.string())
    invalid = pc.equal(pc.fill_null(t.column("error_kind"), ""), "invalid_name")  # its own one-row shard
    loose = pc.and_(
        pc.and_(pc.is_valid(t.column("key")), pc.invert(pc.match_substring_regex(src, SHARD_FILE))),
        pc.invert(invalid),
    )
    numbered = pc.binary_join_element_wise(src, sample, "#")
    names = pc.unique(t.column("run"))
    runs = pc.index_in(t.column("run"), value_set=names)
    runs = runs.combine_chunks() if isinstance(runs, pa.ChunkedArray) else runs
    per_run = pa.array([settings[r] for r in names.to_pylist()], pa.string())
    cols = {
        "image_id": pc.if_else(loose, src, numbered),
        "shard": pc.if_else(loose, pc.replace_substring_regex(src, "/[^/]*$", ""), src),
        "run": pa.DictionaryArray.from_arrays(runs, names),  # deltafiles.memory_schema
        "settings": pa.DictionaryArray.from_arrays(runs, per_run),
    }
    return pa.table(
        [cols.get(n, t.column(n) if n in t.column_names else None) for n in schema.names], schema=schema
    )


class Publisher:
    """Brings `OUTPUT/captions` up to the newest sealed run of an output. Only the lease holder runs it."""

    def __init__(self, table: OutputTable):
        self.table = table
        self.uri = snapshot_uri(table.uri)
        self.delta_opts = delta_options(self.uri, table.opts)
        self.plans: dict[str, dict] = {}

    def plan(self, rid: str) -> dict:
        if rid not in self.plans:
            self.plans[rid] = self.table.plan_of(rid)
        return self.plans[rid]

    def settings(self, rid: str) -> str:
        return json.dumps(self.plan(rid)["fingerprint"], sort_keys=True, separators=(",", ":"))

    def delta(self):
        """The snapshot's Delta table, None before its first publish. Not `DeltaTable.is_deltatable`: it
        holds the GIL while it waits on the store (deltalake 1.6), which stops the lease's heartbeat."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri, storage_options=self.delta_opts)
        except TableNotFoundError:
            return None

    def publish(self, guard=lambda: None) -> dict | None:
        """Publish the newest sealed run, unless the snapshot holds it already; None when no sealed run has
        a present record (runs planned before this snapshot existed: the next new run publishes). `guard()`
        runs before the first write and before the commit (the job's lease check)."""
        sealed = self.table.sealed_runs()
        rid = sealed[-1] if sealed else None
        if rid is None or not self._recorded(rid):
            if rid is not None:
                log.warning(
                    "snapshot: run %s has no present record (planned before it existed); not published", rid
                )
            return None
        d = self.delta()
        number = d.transaction_version(APP_ID) if d is not None else None
        if number == run_number(rid):
            return {"run": rid, "version": d.version(), "mode": "already published"}
        guard()
        kill_point("publish")
        before = next((r for r in sealed if _number(r) == number), None)
        output = self.table.output_schema()
        files = DataFiles(self.table, self.uri, rid, snapshot_schema(output))
        files.remove_orphans(d)
        mode = "full"
        if d is not None and len(sealed) > 1 and before == sealed[-2] and self._recorded(before):
            mode = "incremental" if self._incremental(d, before, rid, output, files) else "full"
        if mode == "full":
            self._full(rid, output, files)
        kill_point("publish-files")
        guard()
        version = files.commit(d, mode, run_number(rid), APP_ID)
        log.info("snapshot: run %s published as version %d of %s (%s)", rid, version, self.uri, mode)
        self._forget_older_records(rid)
        return {"run": rid, "version": version, "mode": mode, **files.counts()}

    def _recorded(self, rid: str) -> bool:
        """Whether run `rid` has its present record (plans made before it existed have none)."""
        uri = self.plan(rid).get("present")
        return bool(uri) and self.table.fs.exists(resolve(uri, self.table.opts)[1])

    def _tonight(self, rid: str, output: pa.Schema, schema: pa.Schema) -> pa.Table:
        """Run `rid`'s rows as snapshot rows, sorted by image_id, one per image."""
        parts = [schema.empty_table()]
        for d in self.plan(rid)["shards"]:
            t = read_file(self.table.fs, join(self.table._run_path(rid), f"{d['shard_id']}.parquet"))
            t = t.replace_schema_metadata(None).cast(pa.schema([f for f in output if f.name != "run"]))
            t = t.append_column("run", pa.array([rid] * len(t), pa.string()))
            parts.append(identify(t, {rid: self.settings(rid)}, schema))
        t = pa.concat_tables(parts).sort_by("image_id")
        if len(t) and len(pc.unique(t.column("image_id"))) < len(t):  # one file listed by two inputs
            rows = t.append_column("_i", pa.array(np.arange(len(t))))
            first = rows.group_by("image_id", use_threads=False).aggregate([("_i", "min")])
            t = t.take(np.sort(first.column("_i_min").to_numpy()))
        return t

    def _incremental(self, d, before: str, rid: str, output: pa.Schema, files: DataFiles) -> bool:
        """Write what changes from `before` to `rid`; False when it takes a full write instead."""
        plan = self.plan(rid)
        summary = read_json(self.table.fs, join(self.table._run_path(rid), "_summary.json")) or {}
        if summary.get("rows", 0) > INCREMENTAL_ROWS:
            return False
        tonight = self._tonight(rid, output, files.mem)
        ids = set(tonight.column("image_id").to_pylist())
        read = {s["uri"] for s in plan["shards"] if s["format"] != "files"}
        whole = {s["uri"] for s in plan["shards"] if s["format"] != "files" and not s.get("retry")}
        retried = {s["uri"]: self.table.shard(s).retry for s in plan["shards"] if s.get("retry")}
        roots = {s["uri"] for s in plan["shards"] if s["format"] == "files"}
        gone: set[str] = set()
        old, new = self.plan(before)["present"], plan["present"]
        for uri, was, now in diff_present(old, new, self.table.opts):
            if now is None:  # left the inputs: a shard's rows by `shard`, a loose file's by its id
                (gone if was[2] else whole).add(uri)
            elif uri not in (ids if now[2] else read):  # back unchanged, or never read: rows of older runs
                log.info(
                    "snapshot: %s is in the inputs again unchanged; a full write brings its rows back", uri
                )
                return False
        files.rewrite(d, tonight, ids | gone, whole, retried, roots)
        return True

    def _full(self, rid: str, output: pa.Schema, files: DataFiles) -> None:
        present = PresentLookup(self.plan(rid)["present"], self.table.opts)
        settings: dict[str, str] = {}
        try:
            for t in self.table.iter_latest():
                for r in pc.unique(t.column("run")).to_pylist():
                    settings.setdefault(r, self.settings(r))
                t = identify(t, settings, files.mem)
                # keyless rows of loose files (their source is a folder) stay, as in the latest view
                src = t.column("source").combine_chunks()
                folder = pc.and_(
                    pc.is_null(t.column("key")), pc.invert(pc.match_substring_regex(src, SHARD_FILE))
                )
                t = t.filter(pc.or_(present.holds(src), folder))
                files.add(t)
            files.flush()
        finally:
            present.close()

    def _forget_older_records(self, rid: str) -> None:
        """Present records of runs before the published one `rid`: no publish reads them again (the next
        one compares `rid`'s with its own; a full write reads its own), so at most a few are kept. Also
        those of jobs that stopped before writing their plan."""
        fs, base = self.table.fs, join(self.table.path, PRESENT_DIR)
        try:
            names = [os.path.basename(p) for p in fs.ls(base, detail=False)]
        except FileNotFoundError:
            return
        for n in names:
            m = re.fullmatch(r"(\d{8}T\d{12}Z)\.listing", n)
            if m and m.group(1) < rid:
                fs.rm_file(join(base, n))


class PublishFailed(RuntimeError):
    pass


def publish(table: OutputTable, guard=lambda: None) -> dict | None:
    """Publish the newest sealed run of `table` to its snapshot (Publisher.publish). A failure other than a
    lost lease is a PublishFailed that says a rerun publishes: the run stays sealed either way.

    A storage error (OSError) is tried again whole, PUBLISH_ATTEMPTS times: a publish is idempotent (the
    committed run is checked first; files an attempt wrote and did not commit are removed). delta-rs retries
    a request that fails, but not a listing whose body is cut off (object_store 0.13)."""
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            return Publisher(table).publish(guard)
        except LeaseLost:
            raise
        except Exception as e:
            if isinstance(e, OSError) and attempt < PUBLISH_ATTEMPTS:
                log.warning(
                    "snapshot: publish attempt %d failed (%s: %s); trying again", attempt, type(e).__name__, e
                )
                time.sleep(min(30, 2 ** (attempt - 1)))
                continue
            raise PublishFailed(
                f"snapshot: publishing the newest sealed run to {snapshot_uri(table.uri)} failed "
                f"({type(e).__name__}: {e}); its rows are committed and it stays sealed: rerun the same command "
                "to publish it"
            ) from e
