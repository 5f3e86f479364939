"""Decoding and resizing, one test per hostile input kind (no Ray)."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from omnilmm_ray import schema
from omnilmm_ray.config import PreprocessConfig
from omnilmm_ray.preprocess import ImageError, decode, pixels_to_image, preprocess_batch
from omnilmm_ray.samples import draw, encode
from tests import hostile

CFG = PreprocessConfig(max_side=64)


@pytest.mark.parametrize("name", [n for n, (_, kind) in hostile.CASES.items() if kind])
def test_bad_images_raise_their_kind(name):
    make, kind = hostile.CASES[name]
    with pytest.raises(ImageError) as e:
        decode(make(), CFG)
    assert e.value.kind == kind


def test_bomb_is_refused_from_the_header_alone():
    with pytest.raises(ImageError, match="max_pixels=10000000"):
        decode(hostile.bomb(), PreprocessConfig(max_pixels=10_000_000))


def test_cmyk_becomes_rgb():
    im, w, h = decode(hostile.cmyk(), CFG)
    assert im.mode == "RGB" and (w, h) == (320, 240) and max(im.size) == 64


def test_sixteen_bit_is_scaled_not_clipped():
    im, w, h = decode(hostile.sixteen_bit(), PreprocessConfig(max_side=64))
    a = np.asarray(im)
    assert im.mode == "RGB" and (w, h) == (64, 48)
    assert a.min() < 10 and a.max() > 245 and 100 < a.mean() < 155  # a full ramp, not all-white


def test_palette_alpha_composited_on_white():
    im, _, _ = decode(hostile.palette_alpha(), PreprocessConfig(max_side=40))
    assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert im.getpixel((20, 15)) == (255, 0, 0)


def test_animated_takes_first_frame():
    im, w, h = decode(hostile.animated(), CFG)
    assert (w, h) == (50, 40) and im.getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_applied_and_reported():
    im, w, h = decode(hostile.exif_rotated(), CFG)
    assert (w, h) == (40, 80) and im.height > im.width


def test_extreme_aspect_is_padded_to_a_usable_size():
    im, w, h = decode(hostile.extreme_aspect(), CFG)
    assert (w, h) == (6000, 3) and im.width == 64 and im.height >= 28


def test_resize_keeps_aspect_and_uses_jpeg_draft():
    big = encode(draw(3, size=(2000, 1000))[0])
    im, w, h = decode(big, PreprocessConfig(max_side=448))
    assert (w, h) == (2000, 1000) and im.size == (448, 224)
    small = encode(draw(3, size=(100, 50))[0])
    assert decode(small, PreprocessConfig(max_side=448))[0].size == (100, 50)  # never upscaled


def test_preprocess_batch_turns_failures_into_rows_and_passes_markers():
    good = encode(draw(4)[0])
    rows = [
        {"source": "s", "shard_id": "a", "sample_index": 0, "key": "ok", "image": good},
        {"source": "s", "shard_id": "a", "sample_index": 1, "key": "bad", "image": b"xx"},
        {
            "source": "s",
            "shard_id": "a",
            "sample_index": 2,
            "key": "nul",
            "image": None,
            **schema.error("missing_image", "null image bytes"),
        },
        {"source": "s", "shard_id": "a", "sample_index": -1, "shard_rows": 3, "shard_skipped": 0},
    ]
    out = preprocess_batch(schema.table(rows, schema.SAMPLE_SCHEMA), CFG)
    assert out.schema == schema.PIXELS_SCHEMA
    r = out.to_pylist()
    assert r[0]["error"] is None and r[0]["width"] == 320 and len(r[0]["sha256"]) == 64
    assert pixels_to_image(r[0]["pixels"], r[0]["pw"], r[0]["ph"]).size == (64, 48)
    assert r[1]["error_kind"] == "not_an_image" and r[1]["pixels"] is None
    assert r[2]["error_kind"] == "missing_image"
    assert r[3]["shard_rows"] == 3
    assert isinstance(out, pa.Table)


def test_decode_never_leaks_other_exceptions():
    # A PNG with a valid header but garbage data: Pillow fails while loading.
    buf = io.BytesIO()
    Image.new("RGB", (30, 30)).save(buf, "PNG")
    data = buf.getvalue()
    corrupt = data[:40] + b"\x00" * 20 + data[60:]
    with pytest.raises(ImageError):
        decode(corrupt, CFG)
