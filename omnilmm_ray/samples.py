"""Build small sample inputs (WebDataset tars, a Parquet file, a folder of files) from drawn images.

Used by `make demo` and the tests; deterministic for a given seed.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "stripes"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}


def draw(seed: int, size: tuple[int, int] = (320, 240), mark: bool = False) -> tuple[Image.Image, str]:
    """A picture of a coloured shape on a coloured background, and a text saying what it shows.

    Seeds repeat pictures (six colours, four shapes, and stripes ignore the box: a quarter of 4,096 seeds draw
    a picture an earlier seed drew). `mark` writes the seed's low 24 bits along the top edge as black and white
    8x8 blocks (192 px), so every seed below 2**24 draws its own picture, and its JPEG differs too: what a
    benchmark needs, since the job captions an in-run duplicate once."""
    rnd = random.Random(seed)
    (bg_name, bg), (fg_name, fg) = rnd.sample(sorted(COLOURS.items()), 2)
    shape = rnd.choice(SHAPES)
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    w, h = size
    box = (w // 4 + rnd.randint(-20, 20), h // 4 + rnd.randint(-20, 20), 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fg)
    else:
        for x in range(0, w, 24):
            d.rectangle((x, 0, x + 11, h), fill=fg)
    if mark:
        for bit in range(24):
            d.rectangle((8 * bit, 0, 8 * bit + 7, 7), fill=(255, 255, 255) if seed >> bit & 1 else (0, 0, 0))
    return im, f"a {fg_name} {shape} on a {bg_name} background"


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """samples: (key, {ext: bytes}) in img2dataset's layout (KEY.jpg, KEY.json, KEY.txt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def build_samples(root: str | Path, shards: int = 3, per_shard: int = 16, seed: int = 0) -> list[Path]:
    """`shards` WebDataset tars, one Parquet file and a folder of loose images under `root`."""
    root = Path(root)
    out, n = [], seed * 100_000
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            im, text = draw(n)
            key = f"{s:05d}{i:04d}"
            samples.append(
                (
                    key,
                    {
                        "jpg": encode(im),
                        "txt": text.encode(),
                        "json": json.dumps({"key": key, "caption": text}).encode(),
                    },
                )
            )
            n += 1
        out.append(write_tar(root / "webdataset" / f"{s:05d}.tar", samples))
    rows = []
    for i in range(per_shard):
        im, text = draw(n)
        rows.append(
            {
                "key": f"pq{i:04d}",
                "jpg": encode(im, "PNG"),
                "url": f"https://example.com/{i}.png",
                "caption": text,
            }
        )
        n += 1
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "parquet" / "part-00000.parquet")
    out.append(root / "parquet" / "part-00000.parquet")
    for i in range(per_shard // 2):
        im, _ = draw(n)
        p = root / "files" / f"album{i % 2}" / f"photo_{i:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode(im))
        out.append(p)
        n += 1
    return out
