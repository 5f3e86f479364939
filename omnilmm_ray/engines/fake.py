"""FakeEngine: a deterministic CPU stand-in for tests, benchmarks and GPU-less demos.

Its captions are placeholders derived from the pixels (so different images give different captions and
the same image the same caption); they say nothing about what a real model would write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections import deque

import numpy as np
from PIL import Image

from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.engines.base import Caption, Prepared, per_image
from omnilmm_ray.engines.sight import check_sight
from omnilmm_ray.storage import resolve, write_bytes_atomic
from omnilmm_ray.weights import local_model

BANNER = "FAKE ENGINE: captions are placeholders computed from pixel statistics, not model output"

# engine.fake_bad_captions: what a weak model does, one kind per image (picked from its pixels' digest).
# (text, finish_reason); None = the usual placeholder caption.
BAD_CAPTIONS = {
    "repetition": ("a cat a cat a cat a cat a cat a cat a cat a cat", "stop"),
    "refusal": ("I'm sorry, but I cannot help with identifying people in this image.", "stop"),
    "empty": ("", "stop"),
    "truncated": ("[fake] a picture of a long and winding road that goes on and on past the", "length"),
    "too_short": ("ok", "stop"),
    "unexpected_script": ("[fake] кошка сидит на подоконнике у окна", "stop"),
    "good": None,
}


def bad_kind(digest: str) -> str:
    """The kind of caption the fake's quality drill gives an image with this digest."""
    return list(BAD_CAPTIONS)[int(digest, 16) % len(BAD_CAPTIONS)]


class Decoder:
    """The time a continuous-batching engine behind lmdeploy 0.18's `pipeline` takes, without the model.

    As `Pipeline._infer` does: every call's requests queue for one shared set of `slots` (its
    `asyncio.Semaphore(max_batch_size)`), first come first served; a request holds its slot until its caption is
    done; a call returns when its longest caption is done. Every `step_s` each caption in a slot gains one token.
    So an engine actor whose calls hold exactly `slots` captions leaves the slots of a call's short captions empty
    until its longest ends, as the real one would; prefill, and a step's cost growing with the batch, are left
    out. The step loop is a thread of its own, so concurrent calls share it as they share the engine."""

    def __init__(self, slots: int | None, step_s: float):
        self.slots = slots or float("inf")
        self.step_s = step_s
        self.steps = 0  # steps taken with a caption in a slot
        self.busy = 0  # sum over those steps of the slots in use
        self._cv = threading.Condition()
        self._waiting: deque[list] = deque()  # [tokens left, done]
        self._active: list[list] = []
        threading.Thread(target=self._loop, daemon=True, name="fake-decoder").start()

    def decode(self, lengths: list[int]) -> None:
        """Blocks until every caption of this call, one per length, is done."""
        captions = [[n, threading.Event()] for n in lengths]
        with self._cv:
            self._waiting.extend(captions)
            self._cv.notify()
        for _, done in captions:
            done.wait()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while len(self._active) < self.slots and self._waiting:
                    self._active.append(self._waiting.popleft())
                if not self._active:
                    self._cv.wait()
                    continue
                active = self._active
            time.sleep(self.step_s)
            with self._cv:
                self.steps, self.busy = self.steps + 1, self.busy + len(active)
                for c in active:
                    c[0] -= 1
                self._active = [c for c in active if c[0] > 0]
            for n, done in active:
                if n <= 0:
                    done.set()


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
        self.bad_captions = cfg.fake_bad_captions
        self.blind = cfg.fake_blind
        self.max_sequences = cfg.max_batch_size  # None: no limit of its own
        self.decoder = Decoder(cfg.max_batch_size, cfg.fake_decode_step_s) if cfg.fake_decode_step_s else None
        self.caption_tokens = cfg.fake_caption_tokens
        self.serial_calls = False
        # The same image check as a real engine's (its drill: fake_blind); the other drills (crash, delay,
        # calls log) see the job's batches only.
        self._probing = True
        check_sight(self, cfg.model, "the fake engine")
        self._probing = False

    def _maybe_crash(self) -> None:
        """Fault drill: die like a GPU worker hit by a CUDA error, once per job (the marker remembers)."""
        if self.crash_at is None or self.batches != self.crash_at or not self.crash_marker:
            return
        fs, path = resolve(self.crash_marker)
        if fs.exists(path):
            return
        write_bytes_atomic(fs, path, b"crashed")
        os._exit(17)

    def _drills(self, images: list) -> None:
        self.batches += 1
        self._maybe_crash()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.calls_log:
            with open(self.calls_log, "a") as f:
                f.write(f"{len(images)}\n")
        if self.crash_on_size and any(im.size == self.crash_on_size for im in images):
            os._exit(18)  # a "poison" image: kills the engine every time it is in the batch

    def caption(
        self,
        prompts: str | list[str],
        images: list[Image.Image | Prepared | None],
        gen: GenerationConfig | None = None,
    ) -> list[Caption]:
        if not self._probing:
            self._drills(images)
        out = []
        for prompt, im in zip(per_image(prompts, len(images)), images):
            p = hashlib.sha1(prompt.encode()).hexdigest()[:6]
            if im is None or self.blind:  # no image, or (drill) its placeholder tokens without its pixels
                text = f"[fake] a picture, prompt {p}"
                out.append(
                    Caption(text, len(prompt.split()) + (0 if im is None else 16), len(text.split()), "stop")
                )
                continue
            if isinstance(im, Prepared):  # patches from the CPU workers: no colours to report
                digest = hashlib.sha1(im.pixels).hexdigest()[:8]
                text = f"[fake] a {im.size[0]}x{im.size[1]} picture given as patches, id {digest}"
            else:
                a = np.asarray(im, dtype=np.float32)
                r, g, b = (int(v) for v in a.reshape(-1, 3).mean(axis=0))
                digest = hashlib.sha1(im.tobytes()).hexdigest()[:8]
                text = f"[fake] a {im.width}x{im.height} picture, mean colour ({r},{g},{b}), id {digest}"
            # the prompt shows in the text, so captions of one image for several prompts differ
            text += f", prompt {p}"
            finish = "stop"
            kind = bad_kind(digest) if self.bad_captions else "good"
            # the quality retry's settings (gen given) mend every kind but a refusal
            if BAD_CAPTIONS[kind] is not None and (gen is None or kind == "refusal"):
                text, finish = BAD_CAPTIONS[kind]
            out.append(Caption(text, len(prompt.split()) + 16, len(text.split()), finish))
        if self.decoder and not self._probing:
            lo, hi = self.caption_tokens
            # each caption's length from its text (which names its image's digest), the same on every run
            lengths = [
                lo + int(hashlib.sha1(c.text.encode()).hexdigest()[:8], 16) % (hi - lo + 1) for c in out
            ]
            self.decoder.decode(lengths)
            out = [dataclasses.replace(c, output_tokens=n) for c, n in zip(out, lengths)]
        return out
