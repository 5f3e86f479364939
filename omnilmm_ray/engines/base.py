"""The engine interface (see engines/__init__.py): what an engine takes and returns, and how it fails."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from omnilmm_ray.config import GenerationConfig


@dataclass
class Caption:
    text: str | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # per-request failure; the row becomes an error row


@dataclass
class Prepared:
    """An image already through the model's processor on a CPU worker (vision.py): the engine skips its own.

    `pixels`: patch rows in `dtype` (a buffer, shared with the batch it came in), `size`: the processed
    (width, height), `fingerprint`: identifies the pixels (the image's sha256 and the processing settings)
    so the engine need not hash them.
    """

    pixels: memoryview | bytes
    size: tuple[int, int]
    fingerprint: bytes
    dtype: str  # of `pixels` (vision.VisionSpec.dtype); no default: float16 bytes read as bfloat16 are noise


class EngineDied(RuntimeError):
    """The engine is no longer usable (CUDA error, OOM, crashed worker): the actor must exit."""


class Engine(Protocol):
    name: str
    max_sequences: int | None  # sequences it decodes at once (None: no limit of its own)
    serial_calls: bool  # its calls take turns, so only a larger call gives it more sequences

    def caption(
        self,
        prompts: str | list[str],
        images: list[Image.Image | Prepared | None],
        gen: GenerationConfig | None = None,
    ) -> list[Caption]: ...


def per_image(prompts: str | list[str], n: int) -> list[str]:
    """One prompt per image; a list must be as long as the images."""
    if isinstance(prompts, str):
        return [prompts] * n
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    return list(prompts)
