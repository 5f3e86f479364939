"""The data files of one publish of the snapshot (snapshot.py), and the one Delta commit that names them.

Files are written here with pyarrow through the output's fsspec filesystem, each sorted by image_id, with
Delta statistics (min/max/null count) of STATS, which readers use to skip files and a publish uses to find
the few files a night touches; delta-rs makes the commit (`create_write_transaction`), so the log, its
checkpoints and the protocol are its own.

Commits are safe on S3 without a lock service: delta-rs creates `_delta_log/<version>.json` with a
put-if-absent, on S3 a conditional PUT (`If-None-Match: *`), the default since deltalake 0.23
(delta-io/delta-rs#3091); the DynamoDB locking provider and `AWS_S3_ALLOW_UNSAFE_RENAME` are for stores
without it, and deltalake 1.0 dropped the former (delta-io/delta-rs#4464). moto's server honours the
header. The job's lease (lease.py) keeps one writer anyway: a conflict means a lost lease and fails the
commit, never overwriting a version.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from bisect import bisect_left, bisect_right

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnilmm_ray.sources import Retry
from omnilmm_ray.storage import join, read_whole, resolve, write_bytes_atomic

STATS = ["image_id", "shard", "run", "source", "sample_index"]
CONFIG = {
    "delta.dataSkippingStatsColumns": ",".join(STATS),  # the same columns when another writer adds files
    "delta.enableExpiredLogCleanup": "false",  # time travel reaches every published night
}
FILE_ROWS = 100_000  # rows per data file: what a publish holds per file it writes or rewrites
MIN_ROWS = FILE_ROWS // 8  # a new file is cut at another file's range only when it holds this many already
ROW_GROUP = 32_768
KEY_COLUMNS = ["image_id", "shard", "key", "sample_index"]
# Held as dictionaries while a publish works (the same few runs and settings JSON on every row: ~280 of ~770
# bytes a row), written as the table's plain strings.
DICTIONARY = ("run", "settings")


def memory_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(
        [f.with_type(pa.dictionary(pa.int32(), f.type)) if f.name in DICTIONARY else f for f in schema]
    )


def delta_options(uri: str, opts: dict) -> dict[str, str]:
    """The output's fsspec storage options as delta-rs's (object_store's): S3 keys, endpoint, region. Other
    stores (gs://, az://) use what delta-rs finds in the environment."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    client = opts.get("client_kwargs") or {}
    endpoint = opts.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    out = {
        "AWS_ACCESS_KEY_ID": opts.get("key"),
        "AWS_SECRET_ACCESS_KEY": opts.get("secret"),
        "AWS_SESSION_TOKEN": opts.get("token"),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": region or ("us-east-1" if endpoint else None),
        "AWS_ALLOW_HTTP": "true" if (endpoint or "").startswith("http://") else None,
    }
    return {k: str(v) for k, v in out.items() if v is not None}


def read_file(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    if columns is None:  # the whole file: one GET
        return pq.read_table(pa.BufferReader(read_whole(fs, path)), read_dictionary=DICTIONARY)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _stats(t: pa.Table) -> str:
    lo, hi = {}, {}
    for c in STATS:
        col = t.column(c)
        mm = pc.min_max(col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col)
        if mm["min"].is_valid:
            lo[c], hi[c] = mm["min"].as_py(), mm["max"].as_py()
    nulls = {c: t.column(c).null_count for c in STATS}
    return json.dumps({"numRecords": len(t), "minValues": lo, "maxValues": hi, "nullCount": nulls})


def _meets(values: list[str], lo: str | None, hi: str | None) -> bool:
    """Whether sorted `values` hold one in [lo, hi] (a file without statistics may hold anything)."""
    if lo is None or hi is None:
        return True
    i = bisect_left(values, lo)
    return i < len(values) and values[i] <= hi


class DataFiles:
    """The files one publish of run `rid` writes, the files it removes, and its commit."""

    def __init__(self, table, uri: str, rid: str, schema: pa.Schema):
        self.fs, self.path = resolve(uri, table.opts)
        self.uri, self.rid, self.schema, self.mem = uri, rid, schema, memory_schema(schema)
        self.delta_opts = delta_options(uri, table.opts)
        self.adds: list = []
        self.removes: list = []
        self.pending: list[pa.Table] = []
        self.rows = 0

    def _write(self, t: pa.Table) -> None:
        from deltalake.transaction import AddAction

        buf = io.BytesIO()
        # without Arrow's schema in the footer, the dictionary columns read back as the table's strings
        pq.write_table(t, buf, compression="zstd", row_group_size=ROW_GROUP, store_schema=False)
        name = f"part-{self.rid}-{uuid.uuid4().hex}.zstd.parquet"  # the run: remove_orphans finds them
        write_bytes_atomic(self.fs, join(self.path, name), buf.getvalue())
        now = int(time.time() * 1000)
        self.adds.append(AddAction(name, buf.tell(), {}, now, True, _stats(t)))
        self.rows += len(t)

    def _write_sorted(self, t: pa.Table, cuts: list[str] = ()) -> None:
        """Sorted rows as files of up to FILE_ROWS, also cut where another file's range starts (`cuts`), so
        that files keep apart and a later night's change meets few of them."""
        ids = t.column("image_id").to_pylist()
        at = sorted({bisect_left(ids, c) for c in cuts} | set(range(0, len(t), FILE_ROWS)) | {len(t)})
        start = 0
        for end in at[1:]:
            if end - start >= MIN_ROWS or end == len(t):
                while start < end:
                    n = min(FILE_ROWS, end - start)
                    self._write(t.slice(start, n))
                    start += n

    def add(self, t: pa.Table) -> None:
        """Rows of a full write, in any order; written sorted, FILE_ROWS at a time."""
        self.pending.append(t)
        if sum(len(p) for p in self.pending) >= FILE_ROWS:
            self.flush()

    def flush(self) -> None:
        t = pa.concat_tables([self.mem.empty_table(), *self.pending]).sort_by("image_id")
        self.pending = []
        if len(t):
            self._write_sorted(t)

    def remove_orphans(self, delta) -> None:
        """Files an earlier, killed publish of this run wrote: no version names them."""
        named = (
            set(pa.table(delta.get_add_actions()).column("path").to_pylist()) if delta is not None else set()
        )
        try:
            names = [os.path.basename(p) for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return
        for n in names:
            if n.startswith(f"part-{self.rid}-") and n not in named:
                self.fs.rm_file(join(self.path, n))

    def rewrite(
        self,
        delta,
        tonight: pa.Table,
        ids: set[str],
        whole: set[str],
        retried: dict[str, Retry],
        roots: set[str],
    ) -> None:
        """Replace, in the files of `delta` that hold them, every row whose image_id is in `ids`, of a shard
        in `whole`, or keyless of a shard in `retried` (the indices the retry read) or a folder in `roots`;
        `tonight` (sorted by image_id) goes into the rewritten files whose range holds it, or to new files."""
        from deltalake.transaction import RemoveAction

        files = pa.table(delta.get_add_actions(flatten=True)).to_pylist()
        id_list, shards = sorted(ids), sorted(whole | set(retried) | roots)
        id_set = pa.array(id_list, pa.string())
        whole_set, roots_set = pa.array(sorted(whole), pa.string()), pa.array(sorted(roots), pa.string())
        tonight_ids = tonight.column("image_id").to_pylist()
        placed = np.zeros(len(tonight), bool)
        kept_files = []
        for f in sorted(files, key=lambda f: f.get("min.image_id") or ""):
            lo, hi = f.get("min.image_id"), f.get("max.image_id")
            if not (_meets(id_list, lo, hi) or _meets(shards, f.get("min.shard"), f.get("max.shard"))):
                kept_files.append(f)
                continue
            path = join(self.path, f["path"])
            keys = read_file(self.fs, path, KEY_COLUMNS)
            drop = pc.or_(
                pc.is_in(keys.column("image_id"), id_set), pc.is_in(keys.column("shard"), whole_set)
            )
            keyless = pc.is_null(keys.column("key"))
            drop = pc.or_(drop, pc.and_(keyless, pc.is_in(keys.column("shard"), roots_set))).to_numpy(False)
            for uri, retry in retried.items():  # few rows: the shards whose reading stopped midway
                where = np.flatnonzero(pc.and_(keyless, pc.equal(keys.column("shard"), uri)).to_numpy(False))
                for i in where:
                    drop[i] |= retry.wants(keys.column("sample_index")[int(i)].as_py())
            if not drop.any():
                kept_files.append(f)
                continue
            old = read_file(self.fs, path).filter(pa.array(~drop)).cast(self.mem)
            a = bisect_left(tonight_ids, lo) if lo is not None else 0
            b = bisect_right(tonight_ids, hi) if hi is not None else len(tonight)
            mine = np.flatnonzero(~placed[a:b]) + a
            placed[mine] = True
            self._write_sorted(pa.concat_tables([old, tonight.take(mine)]).sort_by("image_id"))
            self.removes.append(RemoveAction(f["path"], True, int(time.time() * 1000), f["size_bytes"]))
        rest = tonight.filter(pa.array(~placed))
        if len(rest):
            self._write_sorted(rest, [f["min.image_id"] for f in kept_files if f.get("min.image_id")])

    def commit(self, delta, mode: str, number: int, app_id: str) -> int:
        """One Delta commit: a new table, all files replaced (`mode` "full"), or files removed and added;
        the run goes into the commit info and as the transaction version of `app_id`."""
        from deltalake import CommitProperties, Schema, Transaction
        from deltalake.transaction import create_table_with_add_actions

        # No commit retries at another version: with one writer, a version that exists already is this
        # publish's own commit whose answer was lost, and committing the same files again would duplicate
        # rows; the failure makes snapshot.publish start over, and that finds the run published.
        props = CommitProperties(
            custom_metadata={"omnilmm_run": self.rid, "omnilmm_publish": mode},
            app_transactions=[Transaction(app_id, number)],
            max_commit_retries=0,
        )
        if delta is None:
            create_table_with_add_actions(
                self.uri,
                Schema.from_arrow(self.schema),
                self.adds,
                name="captions",
                configuration=CONFIG,
                storage_options=self.delta_opts,
                commit_properties=props,
            )
        elif mode == "full":
            delta.create_write_transaction(self.adds, "overwrite", self.schema, commit_properties=props)
        else:
            delta.create_write_transaction(
                self.removes + self.adds, "append", self.schema, commit_properties=props
            )
        return 0 if delta is None else delta.version() + 1  # one writer (the lease): the next version

    def counts(self) -> dict:
        return {"files_added": len(self.adds), "files_removed": len(self.removes), "rows_written": self.rows}
