"""Does the engine caption from the image? Asked once per engine, when it is built, before it captions.

An engine can take an image and still not use it. lmdeploy 0.18's PyTorch engine serves MiniCPM-V with
only its language model: the prompt keeps the image's placeholder tokens, the pixels are dropped
("Do not support Multimodal inputs.", lmdeploy/pytorch/engine/engine.py `_on_add_message`) and the
captions read fine while describing nothing; a job would seal them. Two signs show it from outside, for
any engine and model: an image must add input tokens to the same prompt without it, and different
images must change the greedy answer. Both are asked here with a few short requests (one at a time, so
that no batching difference can make a blind engine's answers differ), and an engine failing either is
refused like a model no engine serves (gate.py: exit 2, no run left behind). One image is asked twice: an
engine whose greedy answer varies run to run (seen with TurboMind's int4 kernels on a random model) could
give a blind engine different answers by chance, so that is logged and returned (`reproducible`).
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw

from omnilmm_ray.config import GenerationConfig
from omnilmm_ray.models import INSTEAD

log = logging.getLogger(__name__)

PROMPT = "Describe this image."
# Greedy and a fixed length: a seeing model's answers to these images differ somewhere in 16 tokens, a
# blind engine's are the same tokens every time.
GEN = GenerationConfig(max_new_tokens=16, min_new_tokens=16, temperature=0.0, top_k=1, repetition_penalty=1.0)


class ImageBlind(ValueError):
    """The engine does not caption from the image; the message names the model and what to use."""


def probe_images(size: int = 224) -> list[Image.Image]:
    """Four images as unlike each other as a captioner can see: dark, a light grid, colour halves, noise."""
    dark = Image.new("RGB", (size, size), (10, 10, 10))
    grid = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(grid)
    for x in range(0, size, size // 8):
        draw.line([(x, 0), (x, size)], fill=(0, 0, 0), width=3)
        draw.line([(0, x), (size, x)], fill=(0, 0, 0), width=3)
    halves = Image.new("RGB", (size, size), (220, 30, 30))
    ImageDraw.Draw(halves).rectangle([0, size // 2, size, size], fill=(30, 160, 60))
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [dark, grid, halves, Image.fromarray(noise)]


def check_sight(engine, model: str, served_by: str) -> dict:
    """Ask `engine` (an engines.Engine) the probe; raises ImageBlind naming `model` and `served_by` (e.g.
    "lmdeploy 0.18.0's pytorch engine"), else returns what was measured (logged by the caller)."""
    images = probe_images()
    text = engine.caption(PROMPT, [None], GEN)[0]
    seen = [engine.caption(PROMPT, [im], GEN)[0] for im in images]
    again = engine.caption(PROMPT, images[:1], GEN)[0]
    failed = [c.error for c in (text, *seen, again) if c.error]
    if failed:
        raise ImageBlind(
            f"engine.model: {model!r}: {served_by} failed the image check ({failed[0]}); {INSTEAD}"
        )
    added = [(c.input_tokens or 0) - (text.input_tokens or 0) for c in seen]
    answers = len({c.text for c in seen})
    # Some kernels (int4 GEMMs) are not bit-reproducible: where one image's answer varies run to run, different
    # answers to different images may be that noise, and only the token counts (and all-equal answers) count.
    found = {
        "image_tokens_added": added,
        "distinct_answers": answers,
        "of": len(seen),
        "reproducible": again.text == seen[0].text,
    }
    why = []
    if min(added) <= 0:
        why.append(f"an image adds {min(added)} input tokens to the prompt")
    if answers == 1:
        why.append(f"{len(seen)} different images get the same answer")
    if not found["reproducible"]:
        log.warning("image check: %s's greedy answers vary run to run; judged on token counts", model)
    if why:
        raise ImageBlind(
            f"engine.model: {model!r} is not captioned from the image by {served_by}: {' and '.join(why)}; "
            f"{INSTEAD}"
        )
    return found
