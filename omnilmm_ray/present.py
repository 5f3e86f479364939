"""What a run's inputs held when it was planned: its *present record*.

    OUTPUT/_inputs/<run id>.listing    (Parquet) every tar/Parquet shard file and loose image file the
                                       run's planning listed: URI, fingerprint, loose or not, section

Plans list only the shards a run reads (new, changed, retried); this record lists everything, as planning
streams the listing anyway, so that publishing the snapshot (snapshot.py) tells what left the inputs since
the night before with one streaming pass over two records (`diff_present`), holding neither. A plan names
its record (`present`); plans made before have none. Once a run is published, snapshot.py removes the
records of earlier runs (and of jobs that stopped before writing their plan): no publish reads them again.
A record costs ~22 bytes per file with S3 ETags as fingerprints, ~4 with local modification times.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnilmm_ray.listings import SUFFIX
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import join, open_atomic, resolve

PRESENT_DIR = "_inputs"
PRESENT_SCHEMA = pa.schema(
    [("uri", pa.string()), ("fingerprint", pa.string()), ("loose", pa.bool_()), ("section", pa.int32())]
)
PRESENT_ROWS = 65_536  # entries per row group: what a reader holds of each section


class PresentWriter:
    """Streams the files a new run's planning listed (a tar/Parquet shard's file, each loose file) into
    `OUTPUT/_inputs/<run id>.listing`: URI, fingerprint, loose or not, section.

    One input is listed in sorted order (sources.py walks folders that way), but a group of loose files is
    handed over when full, after the shard files listed among them: shard files and loose files are two
    streams, each sorted. A URI below the one before it in its stream starts a new *section* (the next
    input), so every section is sorted and readers merge them back into one sorted stream, one row group per
    section in memory: about two sections per input. `write=False` (a dry run) writes nothing."""

    def __init__(self, output_uri: str, run_id: str, storage_options: dict | None, write: bool = True):
        self.uri = join(output_uri, PRESENT_DIR, f"{run_id}{SUFFIX}") if write else None
        self.opts = storage_options or {}
        self.rows: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}  # by stream: loose?
        self.last: dict[bool, str | None] = {False: None, True: None}
        self.section = {False: 0, True: 1}
        self.sections = 2
        self._file = self._writer = None

    def add(self, shard: Shard) -> None:
        if self.uri is None:
            return
        loose = shard.format == "files"
        rows, last = self.rows[loose], self.last[loose]
        for uri, fp in shard.fingerprints.items():  # a tar/Parquet shard's one file, a "files" one's members
            if last is not None and uri <= last:
                if uri == last:  # the same file named by two inputs: one entry
                    continue
                self._flush(loose)
                self.section[loose], self.sections = self.sections, self.sections + 1
            rows[0].append(uri)
            rows[1].append(fp)
            last = uri
            if len(rows[0]) >= PRESENT_ROWS:
                self._flush(loose)
        self.last[loose] = last

    def _flush(self, loose: bool) -> None:
        if self._writer is None:
            fs, path = resolve(self.uri, self.opts)
            self._file = open_atomic(fs, path)
            self._writer = pq.ParquetWriter(self._file.__enter__(), PRESENT_SCHEMA, compression="zstd")
        uris, fps = self.rows[loose]
        if uris:
            n = len(uris)
            cols = [
                pa.array(uris),
                pa.array(fps),
                pa.array([loose] * n),
                pa.array([self.section[loose]] * n, pa.int32()),
            ]
            self._writer.write_table(pa.table(cols, schema=PRESENT_SCHEMA), row_group_size=n)
            uris.clear()
            fps.clear()

    def close(self) -> None:
        if self.uri is None:
            return
        self._flush(False)  # inputs with nothing in them still get their (empty) record
        self._flush(True)
        self._writer.close()
        self._file.__exit__(None, None, None)

    def __enter__(self) -> PresentWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # a failed planning leaves no record (a local temporary file goes)
            self._writer.close()
            self._file.__exit__(exc_type, *exc)


class _Record:
    """A present record's row groups by section, with each group's URI range (row group statistics)."""

    def __init__(self, uri: str, storage_options: dict | None):
        fs, path = resolve(uri, storage_options)
        self.file = fs.open(path, "rb")
        self.pf = pq.ParquetFile(self.file)
        self.sections: dict[int, list[tuple[str, str, int]]] = {}
        meta = self.pf.metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            uri_st, sec_st = rg.column(0).statistics, rg.column(3).statistics
            if uri_st is None or not uri_st.has_min_max or sec_st is None or not sec_st.has_min_max:
                t = self.pf.read_row_group(g, columns=["uri", "section"])  # a writer without statistics
                lo, hi, sec = pc.min(t.column(0)).as_py(), pc.max(t.column(0)).as_py(), t.column(1)[0].as_py()
            else:
                lo, hi, sec = uri_st.min, uri_st.max, sec_st.min
            self.sections.setdefault(sec, []).append((lo, hi, g))

    def rows(self, groups: list[int]) -> Iterator[tuple[str, str, bool]]:
        for g in groups:
            t = self.pf.read_row_group(g, columns=["uri", "fingerprint", "loose"])
            yield from zip(*(c.to_pylist() for c in t.columns))

    def close(self) -> None:
        self.file.close()


def iter_present(uri: str, storage_options: dict | None) -> Iterator[tuple[str, str, bool]]:
    """(URI, fingerprint, loose) of a present record, sorted by URI, each URI once."""
    rec = _Record(uri, storage_options)
    try:
        last = None
        merged = heapq.merge(*(rec.rows([g for *_, g in s]) for s in rec.sections.values()))
        for row in merged:
            if row[0] != last:
                yield row
                last = row[0]
    finally:
        rec.close()


def diff_present(
    before: str, after: str, storage_options: dict | None
) -> Iterator[tuple[str, tuple | None, tuple | None]]:
    """(URI, its entry before or None, its entry after or None) of each URI that differs between two
    present records: one streaming pass over both (a merge of two sorted streams)."""
    a, b = iter_present(before, storage_options), iter_present(after, storage_options)
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            yield x[0], x, None
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            yield y[0], None, y
            y = next(b, None)
        else:
            if x != y:
                yield x[0], x, y
            x, y = next(a, None), next(b, None)


class PresentLookup:
    """Which of some URIs a present record holds; reads only the row groups whose URI range holds one of
    them, and keeps a few (`cached`) for the next call (callers ask in roughly sorted order)."""

    def __init__(self, uri: str, storage_options: dict | None, cached: int = 8):
        self.rec = _Record(uri, storage_options)
        self.starts = {s: [lo for lo, _, _ in groups] for s, groups in self.rec.sections.items()}
        self.cache: OrderedDict[int, pa.Array] = OrderedDict()
        self.cached = cached

    def _groups(self, uri: str) -> Iterator[int]:
        for s, groups in self.rec.sections.items():
            i = bisect_right(self.starts[s], uri) - 1
            if i >= 0 and groups[i][1] >= uri:
                yield groups[i][2]

    def holds(self, uris: pa.Array) -> pa.Array:
        """A boolean per URI of `uris` (a string array)."""
        needed = sorted({g for u in pc.unique(uris).to_pylist() for g in self._groups(u)})
        for g in needed:
            if g not in self.cache:
                self.cache[g] = self.rec.pf.read_row_group(g, columns=["uri"]).column(0).combine_chunks()
            self.cache.move_to_end(g)
        values = pa.concat_arrays([self.cache[g] for g in needed]) if needed else pa.array([], pa.string())
        while len(self.cache) > max(self.cached, len(needed)):
            self.cache.popitem(last=False)
        return pc.is_in(uris, value_set=values)

    def close(self) -> None:
        self.rec.close()
