"""The driver's progress line, when the pipeline starts and then every `report.progress_s` seconds:

    progress: 1,204/~20,480 images (6%), shards 3/80 committed, 412.5 images/s (last 60s), ETA ~47m, errors: decode_error 2, flagged: 31 (too_short 20, refusal 11), memory: driver 612 MB (431 MB private), object store 1.2/18.0 GB, spilled 0 B

Images are this attempt's work (a resumed run does not count what earlier attempts committed); shards are
the run's. Planned counts come from the plan where that is cheap (loose files: the file count; Parquet: the
footer's row count) and are estimated from bytes per image elsewhere (tars: their member count is only
known once read), marked `~`, and replaced by the exact count as each shard's end marker arrives; with
nothing to estimate from yet (only tars, none read) the count is `?`.

The rate, and the ETA from it, count only since the first rows came back and over the last RATE_WINDOW_S at
most: an average since the start would include the engine's start-up and overstate the time left.

`memory` is the driver's resident memory, its private part, and the cluster's object store (memory.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnilmm_ray import schema
from omnilmm_ray.memory import memory_text
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import resolve

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
GPU_SAMPLE_S = 5.0  # GPUs in use are sampled (and gauges re-exported) this often
MAX_FOOTERS = 256  # Parquet footers read at plan time (one ranged GET each); the rest are estimated


def _parquet_rows(uri: str, storage_options: dict) -> int | None:
    try:
        fs, path = resolve(uri, storage_options)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:  # an unreadable shard becomes an error row when read; here it is just not counted
        return None


def _wanted(shard: Shard, rows: int | None) -> int | None:
    """Images of `shard` this run reads, given the file's sample count (None: unknown)."""
    r = shard.retry
    if r is None:
        return rows
    if r.start is None:
        return len(r.indices)
    if rows is None:
        return None
    return len({i for i in r.indices if i < rows} | set(range(r.start, rows)))


def plan_counts(shards: list[Shard], storage_options: dict | None = None) -> dict[str, int | None]:
    """Shard id -> images it holds for this run where cheap to know (None: estimate it)."""
    opts = storage_options or {}
    counts: dict[str, int | None] = {}
    parquet = [s for s in shards if s.format == "parquet"][:MAX_FOOTERS]
    with ThreadPoolExecutor(16) as pool:
        rows = dict(
            zip([s.shard_id for s in parquet], pool.map(lambda s: _parquet_rows(s.uri, opts), parquet))
        )
    for s in shards:
        if s.format == "files":
            counts[s.shard_id] = s.files  # read whole: a loose-file retry plans the files themselves
        else:
            counts[s.shard_id] = _wanted(s, rows.get(s.shard_id))
    return counts


def _duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _count_flags(flags: pa.ChunkedArray) -> tuple[int, dict[str, int]]:
    """(rows with any flag, rows per flag) of a batch's `flags` column, in Arrow: every caption passes here
    on the one driver. A row holds each flag once (quality.caption_flags)."""
    lengths = pc.fill_null(pc.list_value_length(flags), 0)
    flagged = pc.sum(pc.greater(lengths, 0)).as_py() or 0
    if not flagged:
        return 0, {}
    counts = pc.value_counts(pc.list_flatten(flags)).to_pylist()
    return flagged, {c["values"]: c["counts"] for c in counts}


class ProgressReporter:
    """Fed from the commit loop (`observe`); between `start` and `stop` a daemon thread logs the line every
    `every_s` seconds, so it also shows while nothing arrives (engine start-up, a stalled stage)."""

    def __init__(
        self,
        shards: list[Shard],
        counts: dict[str, int | None],
        done_indices: dict[str, set[int]],
        shards_before: int,
        shards_total: int,
        every_s: float,
        metrics=None,
        gpus=None,
        memory=None,
        clock=time.monotonic,
    ):
        """`gpus`: a function returning the GPUs in use now, sampled to add up `gpu_seconds`; `memory`: one
        returning `cluster_memory()`'s dict, sampled for each line (None: the line has no memory part)."""
        self.shards = {s.shard_id: s for s in shards}
        self.done_before = {sid: len(done_indices.get(sid, ())) for sid in self.shards}
        self.counts = dict(counts)  # sid -> images of the shard this run wants (None: not known yet)
        self.shards_before, self.shards_total = shards_before, shards_total
        self.committed = 0
        self.images = 0
        self.errors: Counter[str] = Counter()
        self.flagged = 0  # rows with any quality flag
        self.flags: Counter[str] = Counter()  # rows per flag ("name:flag" in multi-prompt mode)
        self.every_s = every_s
        self.metrics = metrics
        self.clock = clock
        self.gpus = gpus
        self.memory = memory
        self.gpu_seconds = 0.0
        self.t0 = clock()
        # (time, images so far) per batch, from the first batch on: the time before it is start-up
        self.samples: deque[tuple[float, int]] = deque()
        self.batches = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._export_planned()

    def _export_planned(self) -> None:
        # Ray's metrics agent drops a gauge not reported again within two export intervals (~20 s): re-set
        # it on every tick, which also publishes counts that became exact.
        if self.metrics is not None:
            with self._lock:  # `observe` updates the counts from the commit loop's thread
                planned = self.planned()[0]
            self.metrics.planned(planned, self.shards_total)

    def planned(self) -> tuple[int | None, bool]:
        """(images this attempt plans, whether that is an estimate). Unknown shards get the bytes per image
        of shards of the same format whose count is known (any format when none is); with no count known
        at all there is nothing to estimate from: (None, True)."""
        per_byte: dict[str | None, list[int]] = {}
        for sid, n in self.counts.items():
            s = self.shards[sid]
            if n is not None and s.retry is None and s.size:
                for fmt in (s.format, None):
                    acc = per_byte.setdefault(fmt, [0, 0])
                    acc[0], acc[1] = acc[0] + n, acc[1] + s.size
        total, estimated = 0, False
        for sid, n in self.counts.items():
            s = self.shards[sid]
            if n is None:
                estimated = True
                images, size = per_byte.get(s.format) or per_byte.get(None) or (0, 0)
                n = round(s.size * images / size) if size else 0
                if s.retry is not None and s.retry.start is not None:
                    n = max(0, n - s.retry.start) + len(s.retry.indices)
            total += max(0, n - self.done_before[sid])
        if estimated and not per_byte:
            return None, True
        return total, estimated

    def observe(self, batch: pa.Table, committed: int) -> None:
        """One batch from the pipeline (ENGINE_SCHEMA rows and end markers); `committed`: shards committed so
        far by this attempt."""
        ends = pa.array(schema.is_end(batch))
        rows = batch.filter(pc.invert(ends))
        kinds = Counter(rows.column("error_kind").to_pylist())
        cached = pc.sum(pc.fill_null(rows.column("cached"), False)).as_py() or 0
        flagged, flags = _count_flags(rows.column("flags"))
        with self._lock:
            for r in batch.filter(ends).select(["shard_id", "shard_rows", "error_kind"]).to_pylist():
                s = self.shards.get(r["shard_id"])
                if s is not None:
                    self.counts[s.shard_id] = len(s.expected(r["shard_rows"], r["error_kind"] is not None))
            self.images += len(rows)
            self.errors.update({k: c for k, c in kinds.items() if k})
            self.flagged += flagged
            self.flags.update(flags)
            if len(rows):
                self.samples.append((self.clock(), self.images))
                self.batches += 1
        self.commits(committed)
        if self.metrics is not None:
            ok = kinds.pop(None, 0)
            if ok - cached > 0:
                self.metrics.rows("captioned", "", ok - cached)
            if cached:
                self.metrics.rows("cached", "", cached)
            for kind, n in kinds.items():
                self.metrics.rows("failed", kind, n)
            if flagged:
                self.metrics.flagged(flagged, flags)

    def commits(self, committed: int) -> None:
        """Shards committed so far by this attempt (the output writes finish after their batch came in)."""
        with self._lock:
            new, self.committed = committed - self.committed, committed
        if self.metrics is not None and new:
            self.metrics.committed(new)

    def rate(self, now: float) -> tuple[float | None, float]:
        """(images/s over the window, the window's length): since the first batch came back, the last
        RATE_WINDOW_S at most; None until two batches are in. Call with the lock held."""
        while len(self.samples) > 1 and self.samples[1][0] <= now - RATE_WINDOW_S:
            self.samples.popleft()
        if self.batches < 2 or now <= self.samples[0][0]:  # one batch alone is no rate; a stall is 0
            return None, 0.0
        t_first, n_first = self.samples[0]
        return (self.images - n_first) / (now - t_first), now - t_first

    def line(self, memory: dict[str, int | None] | None = None) -> str:
        """`memory`: `cluster_memory()`'s dict, shown at the end of the line."""
        with self._lock:
            now = self.clock()
            rate, span = self.rate(now)
            planned, estimated = self.planned()
            images, errors = self.images, sorted(self.errors.items(), key=lambda kv: -kv[1])
            flagged, flags = self.flagged, self.flags.most_common(3)
            shards = self.shards_before + self.committed
        mark = "~" if estimated else ""
        share = f" ({min(100, 100 * images // planned)}%)" if planned else ""
        left = planned - images if planned is not None else None
        if left is not None and left <= 0 and shards >= self.shards_total:
            eta = "done"
        else:
            eta = mark + _duration(max(0, left) / rate) if rate and left is not None else "?"
        speed = f"{rate:.1f} images/s (last {span:.0f}s)" if rate is not None else "? images/s"
        total = "?" if planned is None else f"{mark}{planned:,}"
        quality = (f"{flagged:,} (" + ", ".join(f"{k} {n:,}" for k, n in flags) + ")") if flagged else "none"
        return (
            f"progress: {images:,}/{total} images{share}, shards {shards}/{self.shards_total} committed, "
            f"{speed}, ETA {eta}, errors: "
            + (", ".join(f"{k} {n:,}" for k, n in errors) if errors else "none")
            + f", flagged: {quality}"
            + (f", memory: {memory_text(memory)}" if memory is not None else "")
        )

    def _memory(self) -> dict[str, int | None] | None:
        return self.memory() if self.memory is not None else None

    def _sample_gpus(self, fresh: bool = True) -> None:
        """Add the GPUs in use since the last sample times the time since; `fresh=False` (at the end, when
        the pipeline's actors are already gone) counts the last interval at the last sample's value."""
        now = self.clock()
        in_use = self._gpus_last
        if self.gpus is not None and fresh:
            try:
                in_use = self.gpus()
            except Exception as e:  # a GCS hiccup must not stop the progress line
                log.debug("could not sample GPUs in use: %s", e)
        self.gpu_seconds += max(in_use, self._gpus_last) * (now - self._gpu_t)
        self._gpu_t, self._gpus_last = now, in_use

    def _loop(self) -> None:
        last_line = self.clock()
        while not self._stop.wait(min(self.every_s, GPU_SAMPLE_S)):
            self._sample_gpus()
            self._export_planned()
            if self.clock() - last_line >= self.every_s:
                last_line = self.clock()
                log.info("%s", self.line(self._memory()))

    def start(self) -> None:
        self._gpu_t, self._gpus_last = self.clock(), 0.0
        log.info("%s", self.line(self._memory()))  # at once: what is planned, before the engine's start-up
        self._thread = threading.Thread(target=self._loop, name="omnilmm-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join()
        self._sample_gpus(fresh=False)
        log.info("%s", self.line(self._memory()))
