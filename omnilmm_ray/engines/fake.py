"""FakeEngine: a deterministic CPU stand-in for tests, benchmarks and GPU-less demos.

Its captions are placeholders derived from the pixels (so different images give different captions and
the same image the same caption); they say nothing about what a real model would write.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
from PIL import Image

from omnilmm_ray.config import EngineConfig
from omnilmm_ray.engines import Caption, Prepared
from omnilmm_ray.storage import resolve, write_bytes_atomic
from omnilmm_ray.weights import local_model

BANNER = "FAKE ENGINE: captions are placeholders computed from pixel statistics, not model output"


class FakeEngine:
    name = "fake"

    def __init__(self, cfg: EngineConfig, crash_marker: str | None = None):
        # Fetched like the real engine's (and not used), so runs without a GPU exercise the weights path.
        self.model_path = local_model(cfg.model, cfg.cache_dir)
        self.delay_s = cfg.fake_delay_s
        self.crash_at = cfg.fake_crash_at_batch
        self.crash_marker = crash_marker
        self.crash_on_size = tuple(cfg.fake_crash_on_size) if cfg.fake_crash_on_size else None
        self.batches = 0
        self.calls_log = cfg.fake_calls_log

    def _maybe_crash(self) -> None:
        """Fault drill: die like a GPU worker hit by a CUDA error, once per job (the marker remembers)."""
        if self.crash_at is None or self.batches != self.crash_at or not self.crash_marker:
            return
        fs, path = resolve(self.crash_marker)
        if fs.exists(path):
            return
        write_bytes_atomic(fs, path, b"crashed")
        os._exit(17)

    def caption(self, prompt: str, images: list[Image.Image]) -> list[Caption]:
        self.batches += 1
        self._maybe_crash()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.calls_log:
            with open(self.calls_log, "a") as f:
                f.write(f"{len(images)}\n")
        if self.crash_on_size and any(im.size == self.crash_on_size for im in images):
            os._exit(18)  # a "poison" image: kills the engine every time it is in the batch
        out = []
        for im in images:
            if isinstance(im, Prepared):  # patches from the CPU workers: no colours to report
                digest = hashlib.sha1(im.pixels).hexdigest()[:8]
                text = f"[fake] a {im.size[0]}x{im.size[1]} picture given as patches, id {digest}"
            else:
                a = np.asarray(im, dtype=np.float32)
                r, g, b = (int(v) for v in a.reshape(-1, 3).mean(axis=0))
                digest = hashlib.sha1(im.tobytes()).hexdigest()[:8]
                text = f"[fake] a {im.width}x{im.height} picture, mean colour ({r},{g},{b}), id {digest}"
            out.append(Caption(text, len(prompt.split()) + 16, len(text.split()), "stop"))
        return out
