"""The commit protocol: exactly one output row per input image, whatever Ray retried underneath.

Only the driver writes output data. It collects each shard's captioned rows, drops repeats of a
`sample_index` (a retried read or map task may deliver a row twice), and once the shard's end marker and
all its rows are in, writes the shard's Parquet file in one atomic put. A shard file is therefore either
complete or absent, so a rerun after any crash skips exactly the committed shards. `verify_run` checks
every planned shard before the run's `_SUCCESS` marker is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnilmm_ray import schema
from omnilmm_ray.faults import kill_point
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import join, resolve, write_parquet_atomic

log = logging.getLogger(__name__)


def shard_file(run_uri: str, shard_id: str) -> str:
    return join(run_uri, f"{shard_id}.parquet")


@dataclass
class _Pending:
    tables: list[pa.Table] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    expected: int | None = None
    skipped: int = 0


class ShardCommitter:
    """Collects ENGINE_SCHEMA batches (any order, any repeats) and commits whole shards."""

    def __init__(self, run_uri: str, shards: list[Shard], storage_options: dict | None = None):
        self.fs, self.run_path = resolve(run_uri, storage_options)
        self.run_uri = run_uri
        self.shards = {s.shard_id: s for s in shards}
        self.pending: dict[str, _Pending] = {}
        self.committed: set[str] = set()
        self.duplicates_dropped = 0

    def add(self, batch: pa.Table) -> None:
        ends = pa.array(schema.is_end(batch))
        for sid in pc.unique(batch.column("shard_id")).to_pylist():
            mine = batch.filter(pc.equal(batch.column("shard_id"), sid))
            if sid in self.committed:  # a late repeat of a shard already written
                self.duplicates_dropped += sum(1 for e in schema.is_end(mine) if not e)
                continue
            mine_ends = pa.array(schema.is_end(mine)) if len(mine) != len(batch) else ends
            p = self.pending.setdefault(sid, _Pending())
            for r in mine.filter(mine_ends).select(["shard_rows", "shard_skipped"]).to_pylist():
                p.expected, p.skipped = r["shard_rows"], r["shard_skipped"] or 0
            rows = mine.filter(pc.invert(mine_ends))
            fresh = [i not in p.seen for i in rows.column("sample_index").to_pylist()]
            if not all(fresh):
                self.duplicates_dropped += fresh.count(False)
                rows = rows.filter(pa.array(fresh))
            p.seen.update(rows.column("sample_index").to_pylist())
            if len(rows):
                p.tables.append(rows)
            if p.expected is not None and len(p.seen) >= p.expected:
                self._commit(sid, p)

    def _commit(self, sid: str, p: _Pending) -> None:
        shard = self.shards[sid]
        t = pa.concat_tables(p.tables) if p.tables else schema.ENGINE_SCHEMA.empty_table()
        t = t.sort_by("sample_index").select(schema.OUTPUT_SCHEMA.names).cast(schema.OUTPUT_SCHEMA)
        if t.column("sample_index").to_pylist() != list(range(p.expected)):
            raise RuntimeError(
                f"shard {shard.uri}: rows do not number 0..{p.expected - 1}; refusing to commit"
            )
        meta = {
            b"omnilmm.shard_uri": shard.uri.encode(),
            b"omnilmm.shard_rows": str(p.expected).encode(),
            b"omnilmm.shard_skipped": str(p.skipped).encode(),
        }
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), **meta})
        write_parquet_atomic(self.fs, shard_file(self.run_path, sid), t)
        del self.pending[sid]
        self.committed.add(sid)
        log.info("committed shard %s (%d rows)", shard.uri, p.expected)
        kill_point(f"commit:{len(self.committed)}")

    def uncommitted(self) -> list[str]:
        return sorted(self.pending)


def committed_shards(run_uri: str, storage_options: dict | None = None) -> set[str]:
    """Shard ids whose file exists in the run (a file exists only when complete)."""
    fs, path = resolve(run_uri, storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {
        n.rsplit("/", 1)[-1][: -len(".parquet")]
        for n in names
        if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith((".", "_"))
    }


def verify_run(run_uri: str, shards: list[Shard], storage_options: dict | None = None) -> pa.Table:
    """Check that every planned shard is committed with rows 0..n-1 exactly once; return the run's rows
    (the columns the summary needs). Raises RuntimeError naming the first shard that is wrong."""
    fs, path = resolve(run_uri, storage_options)
    cols = ["source", "key", "sample_index", "error_kind", "cached", "input_tokens", "output_tokens"]
    parts, skipped = [], 0
    for s in shards:
        f = shard_file(path, s.shard_id)
        try:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                md = pf.schema_arrow.metadata or {}
                t = pf.read(columns=cols)
        except FileNotFoundError:
            raise RuntimeError(f"shard {s.uri} has no committed file {f}") from None
        n = int(md[b"omnilmm.shard_rows"])
        skipped += int(md.get(b"omnilmm.shard_skipped", b"0"))
        if sorted(t.column("sample_index").to_pylist()) != list(range(n)):
            raise RuntimeError(
                f"shard {s.uri}: committed file {f} does not hold rows 0..{n - 1} exactly once"
            )
        parts.append(t)
    t = pa.concat_tables(parts) if parts else schema.OUTPUT_SCHEMA.empty_table().select(cols)
    return t.replace_schema_metadata({b"skipped": str(skipped).encode()})
