"""Decode and resize on CPU workers: image bytes -> RGB pixels whose long side is at most `max_side`.

Runs in Ray CPU tasks, never in the GPU actor. Any failure becomes an error row.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from omnilmm_ray import schema
from omnilmm_ray.config import PreprocessConfig

# Vision towers need a few patches per side (Qwen2-VL: 28 px); a 4000x3 banner is padded, not refused.
MIN_SIDE = 28
# The raster formats the README promises, by Pillow's format id (the JPEG opener also takes MPO, the
# multi-picture JPEG many phones write). `Image.open` would otherwise try every plugin it has on untrusted bytes, among them EPS, whose
# loader runs Ghostscript in a subprocess: no format outside this list gets a decoder.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB: 16-bit and float scaled to 8 bit, alpha composited on white, CMYK converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            hi = max(float(a.max(initial=0)), 1e-9)
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def decode(data: bytes, cfg: PreprocessConfig) -> tuple[Image.Image, int, int]:
    """bytes -> (resized RGB image, original width, original height), or ImageError."""
    if not data:
        raise ImageError("empty_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's own bomb check reads a process-wide limit; make it ours (this runs in a worker process).
            Image.MAX_IMAGE_PIXELS = cfg.max_pixels
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = im.size  # header only: checked before any pixel is decoded
            if w * h > cfg.max_pixels:
                raise ImageError("too_many_pixels", f"{w}x{h} exceeds preprocess.max_pixels={cfg.max_pixels}")
            if getattr(im, "is_animated", False):
                im.seek(0)
            scale = cfg.max_side / max(w, h)
            if scale < 1 and im.format == "JPEG" and cfg.jpeg_draft:
                # JPEG draft decoding: decode at 1/2, 1/4 or 1/8 scale directly, never below the target.
                im.draft("RGB", (max(1, int(w * scale + 1)), max(1, int(h * scale + 1))))
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
            im = ImageOps.exif_transpose(im)  # loads the pixels
            if rotated:
                w, h = h, w
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"{e} (preprocess.max_pixels={cfg.max_pixels})") from None
    except UnidentifiedImageError:
        raise ImageError(
            "not_an_image", f"not an image of a supported format ({', '.join(FORMATS)}); others are refused"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None
    im = _to_rgb(im)
    im.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if min(im.size) < MIN_SIDE:
        canvas = Image.new("RGB", (max(im.width, MIN_SIDE), max(im.height, MIN_SIDE)), (255, 255, 255))
        canvas.paste(im, ((canvas.width - im.width) // 2, (canvas.height - im.height) // 2))
        im = canvas
    return im, w, h


def preprocess_batch(batch: pa.Table, cfg: PreprocessConfig, vision=None) -> pa.Table:
    """SAMPLE_SCHEMA -> PIXELS_SCHEMA. End markers and rows that already failed pass through.

    `vision` (a vision.VisionSpec): also run the model's image processor here, so `pixels` holds its patch
    tensor (bfloat16) and `pw`/`ph` the processed size; without it `pixels` is the resized RGB image.
    """
    if vision is not None:
        from omnilmm_ray.vision import patches
    out = []
    for r in batch.to_pylist():
        data = r.pop("image")
        if data is not None and r["error"] is None:
            r["sha256"] = hashlib.sha256(data).hexdigest()
            try:
                im, r["width"], r["height"] = decode(data, cfg)
                if vision is None:
                    r.update(pixels=im.tobytes(), pw=im.width, ph=im.height)
                else:
                    # the same resize the model's processor would apply to this image, then its patches
                    size = vision.target_size(*im.size)
                    im = im.resize(size, Image.Resampling.BICUBIC) if size != im.size else im
                    r.update(pixels=patches(im, vision)[0], pw=im.width, ph=im.height)
            except ImageError as e:
                r.update(schema.error(e.kind, str(e)))
            except Exception as e:  # a Pillow plugin bug must cost one row, not the job
                r.update(schema.error("decode_error", f"{type(e).__name__}: {e}"))
        out.append(r)
    return schema.table(out, schema.PIXELS_SCHEMA)


def pixels_to_image(pixels, w: int, h: int) -> Image.Image:
    """RGB bytes (or a buffer view of them) -> an image that shares the buffer where Pillow allows it."""
    return Image.frombuffer("RGB", (w, h), pixels, "raw", "RGB", 0, 1)


def binary_views(col: pa.ChunkedArray) -> list[memoryview | None]:
    """A binary column -> one zero-copy view per value (None for nulls).

    `to_pylist()` would copy every value into a Python bytes object: for a batch of pixels that is hundreds of
    MB copied in the GPU actor, on the thread that feeds the engine.
    """
    out: list[memoryview | None] = []
    for chunk in col.chunks:
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offs = np.frombuffer(offsets, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        view = memoryview(data) if data is not None else memoryview(b"")
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out.extend(view[offs[i] : offs[i + 1]] if valid[i] else None for i in range(len(chunk)))
    return out
