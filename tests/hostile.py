"""Hostile inputs, one builder per kind: (bytes, expected error_kind or None when it must caption)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from omnilmm_ray.samples import draw, encode


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def truncated() -> bytes:
    good = encode(draw(1)[0])
    return good[: len(good) // 3]


def bomb(side: int = 20_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (decoding it would need gigabytes)."""
    raw = zlib.compress(b"\x00" * (side // 8 + 1) * 8, 9)  # never read: the header check refuses first

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def cmyk() -> bytes:
    return _save(draw(2)[0].convert("CMYK"), "JPEG")


def sixteen_bit() -> bytes:
    a = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return _save(Image.fromarray(a), "PNG")  # uint16 -> mode I;16


def palette_alpha() -> bytes:
    im = Image.new("P", (40, 30), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (10, 10, 30, 20))
    return _save(im, "PNG", transparency=0)  # index 0 transparent: must become white, not black


def animated() -> bytes:
    frames = [Image.new("RGB", (50, 40), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    """Stored 80x40 (landscape) with EXIF orientation 6: displays as 40x80 (portrait)."""
    im = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(im, "JPEG", exif=exif.tobytes())


def extreme_aspect() -> bytes:
    return _save(Image.new("RGB", (6000, 3), (200, 30, 30)), "PNG")


CASES = {
    "truncated": (truncated, "decode_error"),
    "empty": (lambda: b"", "empty_image"),
    "not_image": (lambda: b"<html>404 not found</html>", "not_an_image"),
    "bomb": (bomb, "too_many_pixels"),
    "cmyk": (cmyk, None),
    "sixteen_bit": (sixteen_bit, None),
    "palette_alpha": (palette_alpha, None),
    "animated": (animated, None),
    "exif_rotated": (exif_rotated, None),
    "extreme_aspect": (extreme_aspect, None),
}
