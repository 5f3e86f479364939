"""Prometheus metrics through `ray.util.metrics`: Ray's metrics agent on every node exports them with the
prefix `ray_` (counters also get `_total`) on the node's metrics port, which Ray's dashboard, a Prometheus
scrape and `cluster/grafana-omnilmm.json` read.

Engine side (the GPU actors, stages.py): tokens, batch latency, batches in flight per actor.
Driver side (the commit loop, progress.py): images by status and error kind, quality flags, shards committed,
planned totals.
`METRICS` lists every name once, so the dashboard's queries are checked against it (tests).
"""

from __future__ import annotations

import os
import threading
import time

# name -> (type, description, tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "omnilmm_images": (
        "counter",
        "Images the driver received from the pipeline, by status (captioned, cached, failed) and error kind.",
        ("status", "error_kind"),
    ),
    "omnilmm_images_flagged": (
        "counter",
        "Images whose caption got at least one quality flag (quality.py; a flag marks a row to look at, not a "
        "failure).",
        (),
    ),
    "omnilmm_caption_flags": (
        "counter",
        "Quality flags on captions, by flag and prompt name ('' with a single prompt); an image may carry several.",
        ("flag", "prompt"),
    ),
    "omnilmm_shards_committed": ("counter", "Shard files committed to the output.", ()),
    "omnilmm_images_planned": (
        "gauge",
        "Images this attempt of the run plans to caption (may be estimated).",
        (),
    ),
    "omnilmm_shards_planned": ("gauge", "Shards in the run.", ()),
    "omnilmm_tokens": ("counter", "Tokens through the engine, by kind (input, output).", ("kind",)),
    "omnilmm_engine_images": ("counter", "Images sent to the engine (retries included).", ()),
    "omnilmm_engine_batch_seconds": ("histogram", "Seconds per engine call (one batch).", ()),
    "omnilmm_engine_batches_in_flight": (
        "gauge",
        "Batches inside one engine actor (running or waiting for a call thread).",
        ("actor",),
    ),
}
BATCH_SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]


def make(name: str):
    """The `ray.util.metrics` object for one entry of METRICS (Ray imported here, not at module import)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    kind, description, tags = METRICS[name]
    if kind == "counter":
        return Counter(name, description, tag_keys=tags)
    if kind == "gauge":
        return Gauge(name, description, tag_keys=tags)
    return Histogram(name, description, boundaries=BATCH_SECONDS_BOUNDARIES, tag_keys=tags)


class EngineMetrics:
    """Recorded by each engine actor around its engine calls; does nothing when not `enabled`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.in_flight = 0
        self._lock = threading.Lock()
        if not enabled:
            return
        self.tokens = make("omnilmm_tokens")
        self.images = make("omnilmm_engine_images")
        self.latency = make("omnilmm_engine_batch_seconds")
        self.queue = make("omnilmm_engine_batches_in_flight")
        self.actor = str(os.getpid())  # stable for the actor's life; a restarted actor is a new series
        self.queue.set(0, tags={"actor": self.actor})

    def enter(self) -> None:
        self._queue(+1)

    def leave(self) -> None:
        self._queue(-1)

    def _queue(self, delta: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.in_flight += delta
            self.queue.set(self.in_flight, tags={"actor": self.actor})

    def engine_call(self, started: float, images: int, input_tokens: int, output_tokens: int) -> None:
        if not self.enabled:
            return
        self.latency.observe(time.perf_counter() - started)
        self.images.inc(images)
        if input_tokens:
            self.tokens.inc(input_tokens, tags={"kind": "input"})
        if output_tokens:
            self.tokens.inc(output_tokens, tags={"kind": "output"})


class DriverMetrics:
    """Recorded by the driver as batches reach the commit loop."""

    def __init__(self):
        self.images = make("omnilmm_images")
        self.images_flagged = make("omnilmm_images_flagged")
        self.flags = make("omnilmm_caption_flags")
        self.shards = make("omnilmm_shards_committed")
        self.images_planned = make("omnilmm_images_planned")
        self.shards_planned = make("omnilmm_shards_planned")

    def planned(self, images: int | None, shards: int) -> None:
        """`images` None: not known yet (only unread tars), left unset rather than exported as 0."""
        if images is not None:
            self.images_planned.set(images)
        self.shards_planned.set(shards)

    def rows(self, status: str, error_kind: str, n: int) -> None:
        self.images.inc(n, tags={"status": status, "error_kind": error_kind})

    def flagged(self, rows: int, by_flag: dict[str, int]) -> None:
        """`rows` flagged images; `by_flag`: images per flag as the `flags` column names it ("name:flag" in
        multi-prompt mode, split here into the two tags)."""
        self.images_flagged.inc(rows)
        for flag, n in by_flag.items():
            prompt, _, base = flag.rpartition(":")
            self.flags.inc(n, tags={"flag": base, "prompt": prompt})

    def committed(self, n: int) -> None:
        if n:
            self.shards.inc(n)
