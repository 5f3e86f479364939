"""CPU preprocessing: decode + resize of camera-sized JPEGs with and without JPEG draft decoding.

Both variants run interleaved in one process on the same images (machines here are noisy), so the ratio
is what to read. Also checks that the two outputs look alike (mean absolute pixel difference).

    python bench/preprocess_bench.py --images 40 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnilmm_ray.config import PreprocessConfig  # noqa: E402
from omnilmm_ray.preprocess import decode  # noqa: E402
from omnilmm_ray.samples import draw, encode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--max-side", type=int, default=448)
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    data = [encode(draw(i, size=(w, h))[0], quality=90) for i in range(args.images)]
    variants = {
        "draft": PreprocessConfig(max_side=args.max_side),
        "full_decode": PreprocessConfig(max_side=args.max_side, jpeg_draft=False),
    }
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, cfg in variants.items():  # interleaved: both see the same machine state
            t0 = time.perf_counter()
            for d in data:
                decode(d, cfg)
            times[name].append(time.perf_counter() - t0)
    diffs = [
        np.abs(
            np.asarray(decode(d, variants["draft"])[0], dtype=np.int16)
            - np.asarray(decode(d, variants["full_decode"])[0], dtype=np.int16)
        ).mean()
        for d in data[:5]
    ]
    best = {k: min(v) for k, v in times.items()}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{args.images} JPEGs {w}x{h} q90 -> long side {args.max_side}; best of {args.rounds} rounds"
    )
    for name, t in best.items():
        print(f"  {name:12s} {args.images / t:8.1f} images/s per core")
    print(
        f"  draft / full_decode speed-up: {best['full_decode'] / best['draft']:.2f}x; "
        f"mean |pixel difference| {np.mean(diffs):.2f} / 255"
    )


if __name__ == "__main__":
    main()
