"""Ray-facing adapters for the pipeline's map stages. Each converts a batch and delegates to pure logic.

Nothing here imports Ray; pipeline.py decides placement (CPU tasks, GPU actor pool).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import pyarrow as pa
from PIL import Image

from omnilmm_ray import schema
from omnilmm_ray.config import JobConfig
from omnilmm_ray.engines import Caption, EngineDied, make_engine
from omnilmm_ray.faults import FlightRecorder
from omnilmm_ray.preprocess import pixels_to_image
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

    `reuse` maps image sha256 -> an earlier run's caption (same model, prompt and settings); those rows
    skip the engine. An engine that dies takes the actor down with it; Ray restarts the actor and retries
    the batch, which the flight recorder then splits so that an image that kills engines by itself ends
    as an `engine_crash` error row instead of killing actors forever.
    """

    def __init__(self, cfg: JobConfig, run_uri: str, reuse=None):
        if reuse is not None and not isinstance(reuse, dict):  # an ObjectRef: shared once, fetched per actor
            import ray

            reuse = ray.get(reuse)
        self.cfg = cfg
        self.reuse = reuse or {}
        self.engine = make_engine(cfg.engine, cfg.generation, crash_marker=join(run_uri, "_drill_crashed"))
        self.flight = FlightRecorder()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = []
        for r in rows:
            pixels, pw, ph = r.pop("pixels"), r.pop("pw"), r.pop("ph")
            if r["shard_rows"] is not None:  # end marker
                continue
            r.update(model=self.cfg.model_label, prompt=self.cfg.prompt, cached=False)
            if r["error"] is not None:
                continue
            hit = self.reuse.get(r["sha256"])
            if hit is not None:
                _caption_row(r, self.cfg, Caption(**hit), cached=True)
            else:
                todo.append((r, pixels_to_image(pixels, pw, ph)))
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
                    self._caption([item])
                self.flight.end(_ids([item]))
        if todo:
            self.flight.end(_ids(todo))
        return schema.table(rows, schema.ENGINE_SCHEMA)

    def _caption(self, todo: list[tuple[dict, Image.Image]]) -> None:
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
