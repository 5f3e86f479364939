"""Short engine calls: shards that Ray Data's blocks cut into more than whole batches, against shards of one batch.

The fake engine sleeps `--delay` seconds per call whatever its size, as a real engine decoding captions of fixed
length does when it is the limit; the job runs on the CPU (no GPU). Same 640x480 JPEGs, batch 256, 2 batches in
flight; the only difference is the shard size. Prints each run's engine calls (their sizes, from the fake
engine's calls log), its rate from the first batch in to the last commit, and the ratio.

    python bench/short_calls.py --images 4000 --out S.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_scale  # noqa: E402


def run(work: Path, images: int, per_shard: int, batch: int, delay: float, calls_in_flight: int) -> dict:
    shards = gpu_scale.make_shards(work / f"shards-of-{per_shard}", images, per_shard)
    out = work / f"out-{per_shard}-{time.time_ns()}"
    calls_log = work / f"calls-{per_shard}-{time.time_ns()}.txt"
    extra = {
        "engine": {"fake_delay_s": delay, "fake_calls_log": str(calls_log)},
        "scale": {"concurrent_batches": calls_in_flight},
        "preprocess": {"max_side": 448},
    }
    j = gpu_scale.job("fake", shards, out, 32, 1, 1, batch, extra=extra, backend="fake")
    sizes = [int(x) for x in calls_log.read_text().split()]
    return {
        "per_shard": per_shard,
        "images": j["images"],
        "calls": len(sizes),
        "calls_under_half": sum(1 for n in sizes if n < batch / 2),
        "call_sizes": sizes,
        "life_images_per_s": j["life_images_per_s"],
        "wall_s": j["wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--big-shards", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--delay", type=float, default=1.0, help="seconds per fake engine call")
    ap.add_argument("--calls-in-flight", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="/tmp/omnilmm-short-calls")
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.work)
    runs = []
    for _ in range(args.repeat):  # alternated, so drift on a noisy machine hits both alike
        for per_shard in (args.batch, args.big_shards):
            r = run(work, args.images, per_shard, args.batch, args.delay, args.calls_in_flight)
            print(json.dumps({k: v for k, v in r.items() if k != "call_sizes"}), flush=True)
            runs.append(r)
    best = {
        n: max(r["life_images_per_s"] for r in runs if r["per_shard"] == n)
        for n in (args.batch, args.big_shards)
    }
    res = {
        "runs": runs,
        "ratio_big_to_batch_sized_shards": best[args.big_shards] / best[args.batch],
        "machine": gpu_scale.machine(),
        "command": " ".join(["python bench/short_calls.py", *sys.argv[1:]]),
    }
    print(
        f"shards of {args.big_shards} / shards of {args.batch}: {res['ratio_big_to_batch_sized_shards']:.2f}x"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
