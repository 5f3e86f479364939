"""The model's image processor, run on the CPU workers: pixels -> the exact patch tensor the engine wants.

lmdeploy runs a VLM's Hugging Face image processor inside the engine process, on one thread, for every
request; with TurboMind it also hashes each image's float32 patches on the engine's event-loop thread. At
a few hundred images/s per GPU that Python work competes with the loop that feeds the GPU (measured:
bench/results/engine-profile-*.json). For the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL: the same
Qwen2VLImageProcessor) the processor is simple and fully described by its `preprocessor_config.json`, so the
CPU workers compute it here, bit-exact in layout and within bfloat16 rounding in value, and the engine actor
hands the result to lmdeploy untouched (engines/lmdeploy_engine.py). Which models use which processor is
decided in models.py (`PROCESSORS` names them); other families keep lmdeploy's own processor.

Pure numpy: no torch or transformers on the CPU workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    width: int, height: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 448 * 448
) -> tuple[int, int]:
    """The size Qwen2-VL's image processor resizes to: both sides multiples of `factor` (patch 14 x merge 2),
    area within [min_pixels, max_pixels], aspect ratio kept. Same rounding as transformers'
    `qwen2_vl.image_processing_qwen2_vl.smart_resize` (which takes and returns (height, width)); done on the
    CPU workers, the engine's processor finds nothing left to resize."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


@dataclass(frozen=True)
class VisionSpec:
    """What the CPU workers need to reproduce the model's image processor."""

    arch: str
    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    dtype: str = "bfloat16"  # the model's: TurboMind runs the ViT in it, float16 for AWQ checkpoints

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def target_size(self, w: int, h: int) -> tuple[int, int]:
        return smart_resize(w, h, self.factor, self.min_pixels, self.max_pixels)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def qwen2_vl_spec(arch: str, processor: dict, dtype: str = "bfloat16") -> VisionSpec | None:
    """A Qwen2-VL-family preprocessor_config.json -> a spec, or None when it is configured differently from
    the processor reproduced here (the engine then runs the model's own)."""
    size = processor.get("size") or {}
    min_pixels = processor.get("min_pixels") or size.get("shortest_edge")
    max_pixels = processor.get("max_pixels") or size.get("longest_edge")
    if not (min_pixels and max_pixels):
        return None
    if not all(processor.get(k, True) for k in ("do_resize", "do_rescale", "do_normalize")):
        return None
    return VisionSpec(
        arch=arch,
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
        patch_size=int(processor.get("patch_size", 14)),
        merge_size=int(processor.get("merge_size", 2)),
        temporal_patch_size=int(processor.get("temporal_patch_size", 2)),
        image_mean=tuple(processor.get("image_mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(processor.get("image_std", OPENAI_CLIP_STD)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        dtype=dtype,
    )


# models.Family.processor -> (architecture, preprocessor_config.json, model dtype) -> VisionSpec | None
PROCESSORS = {"qwen2_vl": qwen2_vl_spec}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even like torch's `.to(bfloat16)`."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def patches(im: Image.Image, spec: VisionSpec) -> tuple[bytes, int, int]:
    """An RGB image already at `spec.target_size` -> (patch bytes in `spec.dtype`, grid_h, grid_w).

    Same steps as transformers' Qwen2VLImageProcessor: rescale, normalise, repeat the frame to fill the
    temporal patch, then lay out patches merge-group by merge-group; rows are patches of `patch_dim` values.
    """
    w, h = im.size
    if w % spec.factor or h % spec.factor:
        raise ValueError(f"{w}x{h} is not a multiple of {spec.factor}; resize to spec.target_size first")
    x = (np.asarray(im, dtype=np.float64) * spec.rescale_factor).astype(np.float32)
    x = (x - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # C, H, W
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = np.broadcast_to(x[None], (t, 3, h, w))  # one frame repeated to the temporal patch size
    x = x.reshape(1, t, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(gh * gw, spec.patch_dim)
    # float16 rounds to nearest even in numpy as in torch's `.to(float16)`
    bits = x.astype(np.float16).view(np.uint16) if spec.dtype == "float16" else _bf16_bits(x)
    return bits.tobytes(), gh, gw
