"""Ray-facing adapters for the pipeline's map stages. Each converts a batch and delegates to pure logic.

Nothing here imports Ray; pipeline.py decides placement (CPU tasks, GPU actor pool).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
from PIL import Image

from omnilmm_ray import schema
from omnilmm_ray.config import JobConfig
from omnilmm_ray.engines import Caption, EngineDied, Prepared, make_engine
from omnilmm_ray.faults import FlightRecorder
from omnilmm_ray.preprocess import binary_views, pixels_to_image
from omnilmm_ray.readers import read_shard
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import join

log = logging.getLogger(__name__)


def _ids(todo: list[tuple[dict, Image.Image]]) -> list[str]:
    return [f"{r['shard_id']}:{r['sample_index']}" for r, _ in todo]


def read_shards(batch: pa.Table, cfg: JobConfig) -> Iterator[pa.Table]:
    """One row per shard (its JSON plan entry, indices to skip) -> SAMPLE_SCHEMA blocks, streamed."""
    for d, skip in zip(batch.column("shard").to_pylist(), batch.column("skip").to_pylist()):
        yield from read_shard(Shard.from_dict(json.loads(d)), cfg.input, set(json.loads(skip)))


class StageTimer:
    """Where an engine actor's time goes, per thread of calls: waiting for a batch, converting it, in the
    engine, building the output. Logged every `every_s` so the next bottleneck shows without a profiler."""

    def __init__(self, every_s: float = 15.0):
        self.every_s = every_s
        self.totals: dict[str, float] = {"wait": 0.0, "convert": 0.0, "engine": 0.0, "return": 0.0}
        self.images = self.batches = 0
        self.t0 = self.last_log = time.perf_counter()
        self._local = threading.local()
        self._lock = threading.Lock()

    def start(self, phase: str) -> None:
        now = time.perf_counter()
        prev, since = getattr(self._local, "phase", ("wait", self.t0))
        with self._lock:
            self.totals[prev] += now - since
        self._local.phase = (phase, now)

    def stop(self, images: int) -> None:
        self.start("wait")
        with self._lock:
            self.images += images
            self.batches += 1
            now = self._local.phase[1]
            if now - self.last_log < self.every_s:
                return
            self.last_log = now
            wall = now - self.t0
            log.info(
                "engine actor: %d batches, %d images, %.1f images/s; seconds per call thread: %s",
                self.batches,
                self.images,
                self.images / wall,
                ", ".join(f"{k} {v:.1f}" for k, v in self.totals.items()),
            )


def _caption_row(r: dict, cfg: JobConfig, c: Caption, cached: bool) -> dict:
    r.update(
        caption=c.text,
        input_tokens=c.input_tokens,
        output_tokens=c.output_tokens,
        finish_reason=c.finish_reason,
        cached=cached,
    )
    if c.error:
        r.update(caption=None, **schema.error("engine_error", c.error))
    elif not (c.text or "").strip():
        r.update(schema.error("empty_caption", f"engine returned no text ({c.finish_reason})"))
    return r


class CaptionStage:
    """The GPU actor: builds one engine in `__init__`, captions fixed-size batches in `__call__`.

    Rows an earlier run already captioned arrive with `cached` set and their caption (reuse.apply_reuse,
    a CPU stage before this one); they skip the engine. An engine that dies takes the actor down with it; Ray restarts the actor and retries
    the batch, which the flight recorder then splits so that an image that kills engines by itself ends
    as an `engine_crash` error row instead of killing actors forever.
    """

    def __init__(self, cfg: JobConfig, run_uri: str, vision=None):
        self.cfg = cfg
        self.vision = vision  # vision.VisionSpec: pixels arrive as the model's patches (preprocess_batch)
        # What besides the image bytes determines the patches: fixed for the job, so built once, not per image.
        self._fingerprint_settings = f"|{cfg.preprocess.max_side}|{vision}"
        self.engine = make_engine(cfg.engine, cfg.generation, crash_marker=join(run_uri, "_drill_crashed"))
        self.flight = FlightRecorder()
        # Image-by-image retries run alone in the actor (scale.concurrent_batches > 1): a death during one
        # must be that image's alone, or an innocent image retried beside the culprit is counted too.
        self._calls = threading.Condition()
        self._active, self._alone = 0, False
        self.timer = StageTimer()
        pkg = logging.getLogger("omnilmm_ray")
        if not pkg.handlers:  # Ray workers leave the root logger at WARNING: show this actor's INFO lines
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            pkg.addHandler(handler)
            pkg.setLevel(logging.INFO)

    def _image(self, r: dict, pixels, pw: int, ph: int) -> Image.Image | Prepared:
        if self.vision is None:
            return pixels_to_image(pixels, pw, ph)
        key = f"{r['sha256']}|{pw}x{ph}{self._fingerprint_settings}".encode()
        return Prepared(pixels, (pw, ph), hashlib.sha256(key).digest())

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.timer.start("convert")
        pixels = binary_views(batch.column("pixels"))
        rows = batch.drop_columns(["pixels"]).to_pylist()  # the pixels stay in the batch's buffers
        todo = []
        for r, px in zip(rows, pixels):
            pw, ph = r.pop("pw"), r.pop("ph")
            if r["shard_rows"] is not None:  # end marker
                continue
            hit = r.get("cached")
            r.update(model=self.cfg.model_label, prompt=self.cfg.prompt, cached=False)
            if r["error"] is not None:
                continue
            if hit:
                c = Caption(r["caption"], r["input_tokens"], r["output_tokens"], r["finish_reason"])
                _caption_row(r, self.cfg, c, cached=True)
            else:
                todo.append((r, self._image(r, px, pw, ph)))
        self.timer.start("engine")
        if todo and self.flight.begin(_ids(todo)) == 0:
            self._caption(todo)
        elif todo:
            # An engine already died on this batch: caption image by image so only the culprit is lost.
            log.warning("batch of %d killed an engine before; retrying it image by image", len(todo))
            for item in todo:
                if self.flight.begin(_ids([item])) >= self.cfg.engine.max_crashes_per_image:
                    n = self.cfg.engine.max_crashes_per_image
                    item[0].update(
                        schema.error("engine_crash", f"the engine died {n} time(s) on this image alone")
                    )
                else:
                    self._caption([item], alone=True)
                self.flight.end(_ids([item]))
        if todo:
            self.flight.end(_ids(todo))
        self.timer.start("return")
        out = schema.table(rows, schema.ENGINE_SCHEMA)
        self.timer.stop(len(todo))
        return out

    def _caption(self, todo: list[tuple[dict, Image.Image]], alone: bool = False) -> None:
        with self._calls:
            self._calls.wait_for(lambda: not self._alone and (self._active == 0 or not alone))
            self._alone, self._active = alone, self._active + 1
        try:
            self._call_engine(todo)
        finally:
            with self._calls:
                self._active -= 1
                self._alone = False if alone else self._alone
                self._calls.notify_all()

    def _call_engine(self, todo: list[tuple[dict, Image.Image]]) -> None:
        try:
            captions = self.engine.caption(self.cfg.prompt, [im for _, im in todo])
        except EngineDied as e:
            log.error("engine died, exiting the actor so Ray replaces it: %s", e)
            os._exit(1)
        if len(captions) != len(todo):
            log.error(
                "engine returned %d captions for %d images; exiting the actor", len(captions), len(todo)
            )
            os._exit(1)
        for (r, _), c in zip(todo, captions):
            _caption_row(r, self.cfg, c, cached=False)
