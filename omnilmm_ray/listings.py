"""Loose-file shards in compact plans, and the loose files sealed runs already covered.

A plan stores a loose-file shard as its folder, first and last key, count and the URI of its *listing*:
`OUTPUT/_files/<digest>.listing` (Parquet: key, fingerprint, sidecars per file), named by its content.
Read tasks start before the plan is written (job.py), so the listing is written while planning; being named
by its content, a job that stopped before writing its plan leaves only files its rerun writes again.

Planning a nightly run compares each listed shard with the sealed runs' shards whose key range overlaps
it, reading their listings (a few, cached) instead of holding every fingerprint of the history.

Bookkeeping files end in `.listing`, not `.parquet`: a `OUTPUT/**/*.parquet` glob (DuckDB, pyarrow) would
read them as captions. Plans written before name their `.parquet` listings, which are read as they are.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from itertools import accumulate

from omnilmm_ray.sources import Shard, listing_bytes, load_listing, without_done
from omnilmm_ray.storage import join, resolve, write_bytes_atomic

SUFFIX = ".listing"  # Parquet content under a name that no `*.parquet` glob of the output takes for data

# Fingerprints of sealed listings kept while planning (~50 MB), counted in files rather than listings: a flat
# folder that grows every night has one small listing per night overlapping every listed shard, and a cache
# of few listings would read them all again for each listed shard.
CACHED_FILES = 250_000
LISTINGS_IN_FLIGHT = 16  # sealed listings read at once for one listed shard
UPLOADS_IN_FLIGHT = 16


def file_uri(shard: Shard, key: str) -> str:
    return f"{shard.uri.rstrip('/')}/{key}"


def key_range(shard: Shard) -> tuple[str, str]:
    """First and last file URI of a loose-file shard (of a plan made before compact shards: its members)."""
    if shard.first:
        return file_uri(shard, shard.first), file_uri(shard, shard.last)
    return min(shard.fingerprints), max(shard.fingerprints)


class ListingWriter:
    """Turns listed loose-file shards into compact ones, writing their listings under `OUTPUT/_files/`
    (`write=False`: a dry run, which writes nothing), a bounded number of uploads at a time."""

    def __init__(self, output_uri: str, storage_options: dict | None, write: bool = True):
        self.base, self.opts, self.write = join(output_uri, "_files"), storage_options or {}, write
        self.fs, self.path = resolve(self.base, self.opts)
        self.pool = ThreadPoolExecutor(UPLOADS_IN_FLIGHT) if write else None
        self.pending: list[Future] = []

    def compact(self, shard: Shard) -> Shard:
        data = listing_bytes(shard)
        name = f"{hashlib.sha256(data).hexdigest()[:32]}{SUFFIX}"
        if self.pool is not None:
            self.pending.append(self.pool.submit(write_bytes_atomic, self.fs, join(self.path, name), data))
            if len(self.pending) >= UPLOADS_IN_FLIGHT:
                self.pending.pop(0).result()
        # the shard id stays: it names the shard's output file, and resumed runs find parts by it
        return replace(
            shard,
            members=(),
            fingerprints={},
            sidecars=None,
            listing=join(self.base, name),
            listing_options=self.opts,
        )

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending:
                f.result()
            self.pool.shutdown()

    def __enter__(self) -> ListingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CoveredFiles:
    """The fingerprint each loose file had in the newest sealed run that read it, looked up per listed shard.

    Holds one entry per sealed loose-file shard (its key range and listing), and up to `CACHED_FILES`
    fingerprints of their listings.
    """

    def __init__(self, sealed: list[list[Shard]]):
        """`sealed`: the loose-file shards of each sealed run, oldest run first."""
        entries = sorted(
            (*key_range(s), order, s) for order, shards in enumerate(sealed) for s in shards if s.files
        )
        self.firsts = [e[0] for e in entries]
        self.lasts = [e[1] for e in entries]
        self.reach = list(accumulate(self.lasts, max))  # the furthest any entry up to here reaches
        self.entries = [(e[2], e[3]) for e in entries]
        self.cache: OrderedDict[str, dict[str, str]] = OrderedDict()
        self.cached_files = 0

    def _fingerprints(self, shards: list[Shard]) -> list[dict[str, str]]:
        """Each shard's file fingerprints; the listings not cached are read at once (one GET each), since a
        listed shard can overlap a sealed shard of every nightly run that added files in its key range."""
        for s in shards:  # touched first: the eviction below stops at the listings this call needs
            if s.listing in self.cache:
                self.cache.move_to_end(s.listing)
        missing = list({s.listing: s for s in shards if s.listing and s.listing not in self.cache}.values())
        if len(missing) > 1:
            with ThreadPoolExecutor(len(missing)) as pool:
                loaded = list(pool.map(load_listing, missing))
        else:
            loaded = [load_listing(s) for s in missing]
        needed = {s.listing for s in shards}
        for s in loaded:
            self.cache[s.listing] = s.fingerprints
            self.cached_files += len(s.fingerprints)
        while self.cached_files > CACHED_FILES and next(iter(self.cache)) not in needed:
            self.cached_files -= len(self.cache.popitem(last=False)[1])  # least recently used first
        return [self.cache[s.listing] if s.listing else s.fingerprints for s in shards]

    def overlapping(self, first: str, last: str) -> list[tuple[int, Shard]]:
        """(run order, shard) of sealed shards whose key range meets [first, last], oldest run first."""
        out = []
        i = bisect_right(self.firsts, last) - 1
        while i >= 0 and self.reach[i] >= first:
            if self.lasts[i] >= first:
                out.append(self.entries[i])
            i -= 1
        return sorted(out, key=lambda e: e[0])

    def new_part(self, shard: Shard, redo: set[str]) -> Shard | None:
        """The listed `shard` (with members) less the files sealed runs read with this fingerprint, except
        those in `redo` (their row failed: read again); None when nothing is left."""
        newest: dict[str, str] = {}
        sealed = [s for _, s in self.overlapping(*key_range(shard))]
        for i in range(0, len(sealed), LISTINGS_IN_FLIGHT):  # oldest run first: the newest fingerprint wins
            for fps in self._fingerprints(sealed[i : i + LISTINGS_IN_FLIGHT]):
                newest.update((u, fps[u]) for u in shard.fingerprints if u in fps)
        for u in redo & newest.keys():
            del newest[u]
        left = without_done([shard], newest)
        return left[0] if left else None
