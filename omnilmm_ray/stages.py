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
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pyarrow as pa
from PIL import Image

from omnilmm_ray import gate, schema
from omnilmm_ray.config import JobConfig, PreprocessConfig
from omnilmm_ray.engines import Caption, EngineDied, Prepared, make_engine, resolve
from omnilmm_ray.faults import FlightRecorder
from omnilmm_ray.metrics import EngineMetrics
from omnilmm_ray.models import PATCH_BACKENDS
from omnilmm_ray.preprocess import binary_views, pixels_to_image, preprocess_batch
from omnilmm_ray.prompts import render_row, templates
from omnilmm_ray.quality import caption_flags
from omnilmm_ray.readers import read_shard
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import join

log = logging.getLogger(__name__)
# In-run duplicates served per engine actor: ~30 MB of (sha256, prompt, caption) at most.
RECENT_CAPTIONS = 65_536


def _ids(todo: list[tuple[dict, Image.Image, dict]]) -> list[str]:
    return [f"{r['shard_id']}:{r['sample_index']}" for r, _, _ in todo]


def read_shards(batch: pa.Table, cfg: JobConfig, gate_key: str | None = None) -> Iterator[pa.Table]:
    """One row per shard (its JSON plan entry, indices to skip) -> SAMPLE_SCHEMA blocks, streamed.

    Nothing is read before an engine actor resolved the model's backend (gate.py)."""
    if gate_key:
        gate.wait_open(gate_key, cfg.engine.start_timeout_s)
    for d, skip in zip(batch.column("shard").to_pylist(), batch.column("skip").to_pylist()):
        shard = Shard.from_dict(json.loads(d))
        if shard.listing:  # a compact shard's file list lives in the output (sources.load_listing)
            shard = replace(shard, listing_options=cfg.sink.storage_options)
        yield from read_shard(shard, cfg.input, set(json.loads(skip)))


def preprocess_stage(
    batch: pa.Table, cfg: PreprocessConfig, vision=None, gate_key: str | None = None
) -> pa.Table:
    """`vision` is used only when the resolved backend takes patches (the gate is open: reads waited)."""
    takes_patches = vision is not None and (not gate_key or gate.wait_open(gate_key, 0) in PATCH_BACKENDS)
    return preprocess_batch(batch, cfg, vision if takes_patches else None)


class EngineSlots:
    """Which calls may be in the engine at once. Calls are admitted while the images in the engine stay within
    `budget` (scale.batch_size x scale.concurrent_batches), not by count: Ray Data cuts a batch at the end of
    each bundle of blocks, and a short call admitted as a whole slot would leave the engine that much emptier
    for a whole caption's decoding. A call is always admitted into an empty engine. An `alone` call (an
    image-by-image retry) waits for the engine to empty and keeps every other call out while it runs, so an
    engine death during it is that image's alone."""

    def __init__(self, budget: int):
        self.budget = budget
        self._cv = threading.Condition()
        self._active = self._images = 0
        self._alone = False

    @contextmanager
    def call(self, images: int, alone: bool = False) -> Iterator[None]:
        def admitted() -> bool:
            if self._alone:
                return False
            return self._active == 0 or (not alone and self._images + images <= self.budget)

        with self._cv:
            self._cv.wait_for(admitted)
            self._alone, self._active, self._images = alone, self._active + 1, self._images + images
        try:
            yield
        finally:
            with self._cv:
                self._active, self._images = self._active - 1, self._images - images
                self._alone = False if alone else self._alone
                self._cv.notify_all()


def budget_hint(engine_max: int | None, cfg: JobConfig, serial_calls: bool = False) -> str | None:
    """What to change when the engine could decode more sequences at once than the actor gives it.

    `engine_max`: the engine's own limit (lmdeploy fills in `max_batch_size` by GPU when it is unset: 1,024 on
    H100/H200, 384 on A100, 128 on others); an engine given fewer decodes smaller batches, which is throughput
    lost where the GPU is the limit. None (not known) or enough: no hint. `serial_calls`: the engine takes one
    call at a time (lmdeploy's PyTorch engine), so only a larger batch gives it more."""
    per_image = len(cfg.prompt_names or [None])
    calls = 1 if serial_calls else cfg.scale.concurrent_batches
    held = cfg.scale.batch_size * calls * per_image
    if not engine_max or held >= engine_max:
        return None
    if serial_calls:
        given = f"scale.batch_size {cfg.scale.batch_size}, one call at a time"
        fix = f"scale.batch_size: {-(-engine_max // per_image)}"
    else:
        given = f"scale.batch_size {cfg.scale.batch_size} x scale.concurrent_batches {calls}"
        fix = f"scale.concurrent_batches: {-(-engine_max // (cfg.scale.batch_size * per_image))}"
    return (
        f"the engine decodes up to {engine_max} sequences at once; this actor gives it at most {held} ({given}"
        + (f" x {per_image} prompts" if per_image > 1 else "")
        + f"). Where the GPU is the limit, {fix} keeps it full (README, Tuning)"
    )


class StageTimer:
    """Where an engine actor's time goes, per thread of calls: waiting for a batch, converting it, in the
    engine, building the output. Logged every `every_s` so the next bottleneck shows without a profiler."""

    def __init__(self, batch_size: int, every_s: float = 15.0):
        self.every_s = every_s
        self.totals: dict[str, float] = {"wait": 0.0, "convert": 0.0, "engine": 0.0, "return": 0.0}
        self.images = self.batches = 0
        # Engine calls of less than half a batch: Ray Data cuts a batch at the end of each bundle of blocks, so
        # shards whose blocks do not add up to whole batches give the engine short calls (EngineSlots admits
        # them beside full ones).
        self.batch_size, self.short = batch_size, 0
        self.t0 = self.last_log = time.perf_counter()
        self.first_in: float | None = None  # when the first batch reached a call thread (start-up timeline)
        self._local = threading.local()
        self._lock = threading.Lock()

    def start(self, phase: str) -> None:
        now = time.perf_counter()
        prev, since = getattr(self._local, "phase", ("wait", self.t0))
        with self._lock:
            self.totals[prev] += now - since
            if self.first_in is None and phase == "convert":
                self.first_in = now
        self._local.phase = (phase, now)

    def stop(self, images: int) -> None:
        self.start("wait")
        if not images:  # end markers or captions served without the engine: no engine call
            return
        with self._lock:
            self.images += images
            self.batches += 1
            self.short += images < self.batch_size / 2
            now = self._local.phase[1]
            if self.batches == 1:
                log.info(
                    "engine actor: first batch (%d images) arrived %.1fs after the actor was ready, done %.1fs later",
                    images,
                    self.first_in - self.t0,
                    now - self.first_in,
                )
            if now - self.last_log < self.every_s:
                return
            self.last_log = now
            wall = now - self.t0
            log.info(
                "engine actor: %d batches, %d images, %.1f images/s; %d under half of scale.batch_size; "
                "seconds per call thread: %s",
                self.batches,
                self.images,
                self.images / wall,
                self.short,
                ", ".join(f"{k} {v:.1f}" for k, v in self.totals.items()),
            )


# One engine request: the row it answers, its prompt's name ("" in single-prompt mode) and rendered text.
Request = tuple[dict, str, str]


def _answer(r: dict, name: str, prompt: str, c: Caption, cfg: JobConfig, first=None) -> None:
    """Put one engine answer (and, when retried, the first attempt `(Caption, flags)`) into its row."""
    flags = [] if c.error else caption_flags(c.text, c.finish_reason, prompt, cfg.quality, name)

    def col(column: str) -> str:
        return schema.prompt_column(column, name)

    r.update(
        {
            col("caption"): None if c.error else c.text,
            col("prompt"): prompt,
            col("input_tokens"): c.input_tokens,
            col("output_tokens"): c.output_tokens,
            col("finish_reason"): c.finish_reason,
            col("flags"): flags,
            col("first_caption"): first[0].text if first else None,
            col("first_flags"): first[1] if first else None,
        }
    )
    where = f"prompt {name!r}: " if name else ""
    if r["error"] is not None:
        pass  # an earlier prompt of this row already failed: keep the first reason
    elif c.error:
        r.update(schema.error("engine_error", where + c.error))
    elif not (c.text or "").strip():
        r.update(schema.error("empty_caption", f"{where}engine returned no text ({c.finish_reason})"))
    if name:  # the row's own columns: flags of every prompt, token sums
        r["flags"] = (r.get("flags") or []) + [f"{name}:{f}" for f in flags]
        for k in ("input_tokens", "output_tokens"):
            if getattr(c, k) is not None:
                r[k] = (r.get(k) or 0) + getattr(c, k)


def _served(r: dict, prompts: dict[str, str]) -> dict[str, Caption]:
    """The captions of the row's prompts that reuse.apply_reuse found in earlier runs, by prompt name: it
    fills a prompt's caption columns only for those, and nothing else sets them before this stage."""
    out = {}
    for name in prompts:
        cols = [schema.prompt_column(f, name) for f in schema.CAPTION_FIELDS]
        if r.get(cols[0]) is not None:
            out[name] = Caption(*(r[c] for c in cols))
    return out


class CaptionStage:
    """The GPU actor: builds one engine in `__init__`, captions fixed-size batches in `__call__`.

    Captions earlier runs made for a row's (image bytes, rendered prompt) arrive in the row
    (reuse.apply_reuse, a CPU stage before this one): only the row's other prompts go to the engine, and a
    row with all of them served skips it (`cached`). An engine that dies takes the actor down with it; Ray
    restarts the actor and retries the batch, which the flight recorder then splits so that an image that
    kills engines by itself ends as an `engine_crash` error row instead of killing actors forever.
    """

    def __init__(self, cfg: JobConfig, run_uri: str, vision=None, gate_key: str | None = None):
        """`run_uri`: where the fake engine's crash drill leaves its marker ("" outside a job);
        `gate_key`: the gate (gate.py) this actor opens once its engine captions from the image (at once
        for a family proven so on a GPU), or shuts with the reason."""
        t0 = time.monotonic()
        pkg = logging.getLogger("omnilmm_ray")
        if not pkg.handlers:  # Ray workers leave the root logger at WARNING: show this actor's INFO lines
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            pkg.addHandler(handler)
            pkg.setLevel(logging.INFO)
        try:
            route = resolve(cfg.engine)
        except ValueError as e:
            if gate_key:  # the driver fails the job with this reason; no shard was read
                gate.shut_gate(gate_key, str(e))
            raise
        backend = route.backend
        if gate_key and route.proven:  # seen to caption from the image on a GPU: read while the engine builds
            gate.open_gate(gate_key, backend)
        resolved_s = time.monotonic() - t0
        self.cfg = cfg
        self.templates = templates(cfg.prompt, cfg.prompts)
        self.out_schema = schema.engine_schema(cfg.prompt_names)
        self.retry_flags = set(cfg.quality.retry_flags)
        self.retry_gen = cfg.quality.retry_config(cfg.generation) if self.retry_flags else None
        # vision.VisionSpec: pixels arrive as the model's patches (preprocess_stage), if this backend takes them
        self.vision = vision if backend in PATCH_BACKENDS else None
        # What besides the image bytes determines the patches: fixed for the job, so built once, not per image.
        self._fingerprint_settings = f"|{cfg.preprocess.max_side}|{vision}"
        marker = join(run_uri, "_drill_crashed") if run_uri else None
        try:  # the engine checks that it captions from the image (engines/sight.py)
            self.engine = make_engine(cfg.engine, cfg.generation, crash_marker=marker, backend=backend)
        except ValueError as e:
            if gate_key:
                gate.shut_gate(gate_key, str(e))
            raise
        if gate_key and not route.proven:
            gate.open_gate(gate_key, backend)
        self.flight = FlightRecorder()
        # Image-by-image retries run alone in the actor: a death during one must be that image's alone, or an
        # innocent image retried beside the culprit is counted too.
        self.slots = EngineSlots(cfg.scale.batch_size * cfg.scale.concurrent_batches)
        self.timer = StageTimer(cfg.scale.batch_size)
        self.metrics = EngineMetrics(cfg.report.metrics)
        # Captions this actor made in this run by (sha256, rendered prompt): a duplicate image later in the
        # night is served from here instead of the engine (bounded; earlier runs' captions: reuse.py).
        self._recent: OrderedDict[tuple[str, str], Caption] = OrderedDict()
        self._lock = threading.Lock()
        log.info(
            "engine actor ready in %.1fs (backend %s resolved after %.1fs)",
            time.monotonic() - t0,
            backend,
            resolved_s,
        )
        if hint := budget_hint(self.engine.max_sequences, cfg, self.engine.serial_calls):
            log.warning(hint)

    def _image(self, r: dict, pixels, pw: int, ph: int) -> Image.Image | Prepared:
        if self.vision is None:
            return pixels_to_image(pixels, pw, ph)
        key = f"{r['sha256']}|{pw}x{ph}{self._fingerprint_settings}".encode()
        return Prepared(pixels, (pw, ph), hashlib.sha256(key).digest(), self.vision.dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.metrics.enter()  # batches in this actor: running, or waiting for a call thread
        try:
            return self._call(batch)
        finally:
            self.metrics.leave()

    def _call(self, batch: pa.Table) -> pa.Table:
        self.timer.start("convert")
        pixels = binary_views(batch.column("pixels"))
        rows = batch.drop_columns(["pixels"]).to_pylist()  # the pixels stay in the batch's buffers
        todo = []
        for r, px in zip(rows, pixels):
            pw, ph = r.pop("pw"), r.pop("ph")
            if r["shard_rows"] is not None:  # end marker
                continue
            r.update(model=self.cfg.model_label, cached=False)
            if r["error"] is not None:
                continue
            prompts = render_row(self.templates, r)
            if prompts is None:
                continue
            served = _served(r, prompts)
            with self._lock:  # this run already captioned the same bytes and prompt (an in-run duplicate)
                served.update({n: c for n, p in prompts.items() if (c := self._recent.get((r["sha256"], p)))})
            for name, c in served.items():
                _answer(r, name, prompts[name], c, self.cfg)
            r["cached"] = len(served) == len(prompts)
            rest = {name: p for name, p in prompts.items() if name not in served}
            if rest:  # a row with every caption served lost its pixels in apply_reuse
                todo.append((r, self._image(r, px, pw, ph), rest))
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
        out = schema.table(rows, self.out_schema)
        self.timer.stop(len(todo))
        return out

    def _caption(self, todo: list[tuple[dict, Image.Image, dict]], alone: bool = False) -> None:
        with self.slots.call(len(todo), alone):
            self._call_engine(todo)

    def _engine(self, requests: list[Request], images: list, gen=None) -> list[Caption]:
        started = time.perf_counter()
        try:
            prompts = [p for _, _, p in requests]
            captions = (
                self.engine.caption(prompts, images, gen) if gen else self.engine.caption(prompts, images)
            )
        except EngineDied as e:
            log.error("engine died, exiting the actor so Ray replaces it: %s", e)
            os._exit(1)
        if len(captions) != len(requests):
            log.error(
                "engine returned %d captions for %d requests; exiting the actor", len(captions), len(requests)
            )
            os._exit(1)
        tokens = [sum(getattr(c, k) or 0 for c in captions) for k in ("input_tokens", "output_tokens")]
        self.metrics.engine_call(started, len(requests), *tokens)
        return captions

    def _call_engine(self, todo: list[tuple[dict, Image.Image, dict]]) -> None:
        # every prompt of an image in the same engine call, the image decoded once; a (bytes, prompt) pair
        # that repeats in the batch is asked once and its answer copied (`cached` on the copies)
        requests = [(r, name, p) for r, _, prompts in todo for name, p in prompts.items()]
        images = [im for _, im, prompts in todo for _ in prompts]
        origin: dict[tuple[str, str], int] = {}  # (bytes, prompt) -> its first request
        for i, (r, _, p) in enumerate(requests):
            origin.setdefault((r["sha256"], p), i)
        unique = sorted(origin.values())
        captions, firsts = self._answer_all([requests[i] for i in unique], [images[i] for i in unique])
        answers = dict(zip(unique, captions))
        firsts = dict(zip(unique, firsts))
        asked = set()  # rows with a prompt the engine answered for them, not for an earlier copy
        for i, (r, name, p) in enumerate(requests):
            j = origin[(r["sha256"], p)]
            _answer(r, name, p, answers[j], self.cfg, firsts[j])
            if i == j:
                asked.add(id(r))
        for r, _, _ in todo:
            r["cached"] = r["cached"] or id(r) not in asked

    def _answer_all(self, requests: list[Request], images: list) -> tuple[list[Caption], list]:
        """The engine's answers to `requests`, and for each the first attempt `(Caption, flags)` when the
        quality retry asked again (else None)."""
        captions = self._engine(requests, images)
        firsts: list = [None] * len(requests)
        if self.retry_flags:
            again = []
            for i, ((_, name, p), c) in enumerate(zip(requests, captions)):
                flags = [] if c.error else caption_flags(c.text, c.finish_reason, p, self.cfg.quality, name)
                if self.retry_flags.intersection(flags):
                    again.append(i)
                    firsts[i] = (c, flags)
            if again:
                retried = self._engine(
                    [requests[i] for i in again], [images[i] for i in again], self.retry_gen
                )
                for i, c in zip(again, retried):
                    captions[i] = c
        with self._lock:
            for (r, _, p), c in zip(requests, captions):
                if not c.error and (c.text or "").strip():
                    self._recent[(r["sha256"], p)] = c
                    self._recent.move_to_end((r["sha256"], p))
            while len(self._recent) > RECENT_CAPTIONS:
                self._recent.popitem(last=False)
        return captions, firsts
